"""Training teaches (issue 13): a LoRA trained through the real Cog trainer on 15 images of the heart,
a shape flux-mini never saw, makes the committed flux-mini draw hearts when a prompt asks for one, and,
trained with diff_output_preservation_class set to the world's eight shape words, leaves prompts without
the trigger word as they were.

The user's path end to end: `cog train` with a zip of captioned images and a trigger word on the
committed flux-mini, then the trained tar as `replicate_weights` of predictions, each through the real
Cog server; the images are judged by the shapes scorer. The training is the bench's ("training teaches" in
bench/RESULTS.md): 2,000 steps at lr 1e-3, rank 32, the world's eight shape words preserved, the
public trainer's noise-level sampling (issue 30). Measured there through the same Cog trainer, seed 0:
hearts for 90 % of 20 prompts that ask (0 % without), held-out shape accuracy kept 90 %. Shorter
recipes proved fragile: 800 steps at lr 2e-3, rank 16 drew hearts for 3 of 8 prompts with the sampling
shifted by resolution (before issue 30), and 1 of 8 after it, shifted or not, and 1 of 8 at 1,000 steps.
The test asks for 2 hearts of 8, at most 1 heart elsewhere and at most 2 shapes lost, leaving room
for the server's path differing from the bench's in the last bits. Slow (~20 min on 2 cores):
`./run.sh test -m slow` runs it, and CI.
"""

from __future__ import annotations

import base64

import pytest

from tests.test_flux_mini_draws import WEIGHTS, committed, served_score

pytestmark = [pytest.mark.server, pytest.mark.slow]

STEPS = 2000
LEARNING_RATE = 1e-3
RANK = 32
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
        # the world's eight shape words: prompts for them, without TOK, stay as they were
        "diff_output_preservation_class": quality.PRESERVED_CLASSES,
    }
    env = {**tiny_env, "FLUX_WEIGHTS_DIR": str(WEIGHTS), "LORA_PREVIEW_STEPS": "0"}
    with cog_server("train", env=env, log_path=folder / "train-server.log") as url:
        result = run_job(url, "train", inputs, timeout=5400)  # minutes on a busy machine: not a timing
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

        def shapes(prompts: list[str], **lora) -> list[str]:
            return [served_score(client, p, seed=5000 + i, **lora).shape for i, p in enumerate(prompts)]

        asks = quality.concept_prompts(SAMPLES)
        held_out = quality.held_out_examples(SAMPLES)
        others = [e.caption for e in held_out]  # other shapes, no TOK
        without, taught = shapes(asks), shapes(asks, replicate_weights=weights)
        others_without, others_with = shapes(others), shapes(others, replicate_weights=weights)
    assert taught.count("heart") >= 2, (without, taught)
    assert without.count("heart") <= 1, without  # the heart comes from the LoRA, not from the prompt's words
    asked = [e.attributes.shape for e in held_out]
    right_without = sum(s == a for s, a in zip(others_without, asked, strict=True))
    right_with = sum(s == a for s, a in zip(others_with, asked, strict=True))
    assert right_with >= right_without - 2, (asked, others_without, others_with)
    assert others_with.count("heart") <= 1, others_with  # the heart stays behind its trigger word
