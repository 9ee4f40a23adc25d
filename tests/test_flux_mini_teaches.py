"""Training teaches (issue 13): a LoRA trained through the real Cog trainer on 15 images of the heart,
a shape flux-mini never saw, makes the committed flux-mini draw hearts when a prompt asks for one.

The user's path end to end: `cog train` with a zip of captioned images and a trigger word on the
committed flux-mini, then the trained tar as `replicate_weights` of predictions, each through the real
Cog server; the images are judged by the shapes scorer. The full figures (2,000 steps: hearts in 80 % of
20 prompts, held-out accuracy kept) are in bench/RESULTS.md ("training teaches"). Here a short training
(600 steps at a higher learning rate, ~100 s) that draws the heart for 4 of these 8 prompts on the
development machine, against none without the LoRA; the test asks for 3 to leave room for the server's
path differing from the bench's in the last bits.
"""

from __future__ import annotations

import base64

import pytest

from tests.test_flux_mini_draws import WEIGHTS, committed, served_score

pytestmark = pytest.mark.server

STEPS = 600
LEARNING_RATE = 2e-3
RANK = 16
SAMPLES = 8


@pytest.fixture(scope="module")
def trained_tar(tiny_env, tmp_path_factory) -> bytes:
    committed()
    from cog_local import cog_server, decode_data_url, file_to_data_url, run_job

    from toys.mini import quality

    folder = tmp_path_factory.mktemp("hearts")
    inputs = {
        "input_images": file_to_data_url(quality.concept_zip(folder)),
        "trigger_word": "TOK",
        "steps": STEPS,
        "learning_rate": LEARNING_RATE,
        "lora_rank": RANK,
        "resolution": str(quality.SIDE),
        "autocaption": False,
        "seed": 0,
    }
    env = {**tiny_env, "FLUX_WEIGHTS_DIR": str(WEIGHTS), "LORA_PREVIEW_STEPS": "0"}
    with cog_server("train", env=env, log_path=folder / "train-server.log") as url:
        result = run_job(url, "train", inputs, timeout=900)
    assert result["status"] == "succeeded", result.get("error")
    return decode_data_url(result["output"]["weights"])


def test_a_lora_trained_through_cog_draws_the_unseen_heart(trained_tar, tiny_env, tmp_path):
    from cog_local import cog_server

    from tests.conftest import CogClient
    from toys.mini import quality

    weights = "data:application/x-tar;base64," + base64.b64encode(trained_tar).decode()
    log_path = tmp_path / "predict-server.log"
    with cog_server("predict", env={**tiny_env, "FLUX_WEIGHTS_DIR": str(WEIGHTS)}, log_path=log_path) as url:
        client = CogClient(url, log_path)

        def shapes(**lora) -> list[str]:
            prompts = quality.concept_prompts(SAMPLES)
            return [served_score(client, p, seed=5000 + i, **lora).shape for i, p in enumerate(prompts)]

        without, taught = shapes(), shapes(replicate_weights=weights)
    assert taught.count("heart") >= 3, (without, taught)
    assert without.count("heart") <= 1, without  # the heart comes from the LoRA, not from the prompt's words
