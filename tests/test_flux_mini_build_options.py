"""The build options the GPU build of flux-mini uses (issue 13): spec settings from the command line,
images drawn by several processes, a transformer trained on an earlier build's encoders, and steps
cut to a deadline without changing what the steps compute."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_flux_mini import quick_spec
from tests.test_flux_mini_timesteps import DEV_SCHEDULER, tiny_world
from toys.mini.dataset import draw_examples
from toys.mini.spec import MiniSpec, with_overrides
from toys.shapes import generate_dataset


def test_settings_change_the_named_numbers_and_refuse_the_rest():
    spec = with_overrides(MiniSpec(), ["double_blocks=4", "phase.steps=123", "phase.learning_rate=2e-4"])
    assert spec.double_blocks == 4 and spec.phases[-1].steps == 123 and spec.phases[-1].learning_rate == 2e-4
    assert (
        dataclasses.replace(spec, double_blocks=MiniSpec().double_blocks, phases=MiniSpec().phases)
        == MiniSpec()
    )
    for setting, why in [
        ("nope=1", "nope is not a number field"),
        ("rope_axes=1", "rope_axes is not a number field"),
        ("phase.steps=many", "phase.steps takes a int"),
        ("phase.nope=1", "phase.nope is not a number field"),
    ]:
        with pytest.raises(ValueError, match=why):
            with_overrides(MiniSpec(), [setting])


def test_sizes_setting_leaves_the_other_sizes_out_of_the_transformer_images():
    from toys.mini.build import phase_examples

    spec = with_overrides(MiniSpec(), ["sizes=medium,large", "phase.images=30", "phase.small_images=10"])
    assert spec.sizes == ("medium", "large")
    last = len(spec.phases) - 1  # the phase `phase.*` settings change (the first draws 13,000 images)
    assert {e.attributes.size for e in phase_examples(spec, last)} == {"medium", "large"}
    with pytest.raises(ValueError, match="sizes takes a comma-separated list of small, medium, large"):
        with_overrides(MiniSpec(), ["sizes=medium,huge"])


def test_the_build_command_names_a_bad_setting():
    done = subprocess.run(
        [sys.executable, "-m", "toys.mini.build", "/nonexistent", "--set", "heads=four"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "--set heads=four: heads takes a int" in done.stderr


def same_images(a: list, b: list) -> bool:
    return [e.caption for e in a] == [e.caption for e in b] and all(
        np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True)
    )


def test_the_same_images_whatever_the_number_of_workers():
    world = dict(exclude={("red", "circle")}, two_tone=0.0)
    one = draw_examples(70, seed=5, size=32, chunk=30, workers=1, **world)
    two = draw_examples(70, seed=5, size=32, chunk=30, workers=2, **world)
    assert same_images(one, two)
    assert not any((e.attributes.color, e.attributes.shape) == ("red", "circle") for e in one)
    assert len({e.caption for e in one}) > 40  # the chunks are not copies of each other
    # Chunk 0 is the one stream the CPU builds drew, so the committed build's images are unchanged.
    assert same_images(
        draw_examples(40, 5, 32, chunk=0, **world), generate_dataset(40, seed=5, size=32, **world)
    )


def test_fit_steps_times_a_copy_and_leaves_the_transformer_untouched():
    from toys.mini.transformer_training import FIT_STEPS_ROUNDING, build_transformer, fit_steps

    spec = dataclasses.replace(MiniSpec(), double_blocks=1, single_blocks=1, batch=2)
    phase = dataclasses.replace(spec.phases[0], steps=10 * FIT_STEPS_ROUNDING)
    transformer = build_transformer(spec, guidance_embeds=True, seed=0)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    cache, samples = tiny_world()

    far = fit_steps(transformer, cache, samples, spec, phase, DEV_SCHEDULER, time.perf_counter() + 1e6)
    now = fit_steps(transformer, cache, samples, spec, phase, DEV_SCHEDULER, time.perf_counter())
    assert far == phase  # time for every step the spec asks: nothing cut
    assert now == dataclasses.replace(phase, steps=FIT_STEPS_ROUNDING)  # never below one rounding
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())


def test_a_transformer_trained_on_an_earlier_builds_encoders(tmp_path):
    from toys.mini.build import build_flux_mini

    earlier = build_flux_mini(tmp_path / "earlier", quick_spec(phases=1))
    spec = dataclasses.replace(quick_spec(phases=1), double_blocks=1, single_blocks=2)
    later = build_flux_mini(tmp_path / "later", spec, encoders_from=earlier)

    for part in ("vae", "text_encoder", "text_encoder_2"):
        a, b = (load_file(next((f / "FLUX.1-dev" / part).glob("*.safetensors"))) for f in (earlier, later))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    config = json.loads((later / "FLUX.1-dev" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"]) == (1, 2)
    info = json.loads((later / "build_info.json").read_text())
    assert info["encoders_from"]["folder"] == str(earlier) and "vae" not in info["seconds"]
    assert info["spec"]["double_blocks"] == 1

    # --retrain-clip: the VAE and T5 taken, CLIP trained afresh under a spec whose clip_placement
    # differs from the earlier build's, so the new CLIP must differ.
    placed = dataclasses.replace(spec, clip_placement=1 - quick_spec(phases=1).clip_placement)
    retrained = build_flux_mini(tmp_path / "retrained", placed, encoders_from=earlier, retrain_clip=True)
    for part, same in (("vae", True), ("text_encoder_2", True), ("text_encoder", False)):
        a, b = (
            load_file(next((f / "FLUX.1-dev" / part).glob("*.safetensors"))) for f in (earlier, retrained)
        )
        assert all(torch.equal(a[k], b[k]) for k in a) == same, part
    info = json.loads((retrained / "build_info.json").read_text())
    assert "--retrain-clip" in info["encoders_from"]["clip"] and "text" in info["seconds"]


def pooled_probe(clip, tokenizer, captions: list[str], labels: list[int]) -> float:
    """Held-out accuracy of a linear probe reading `labels` from CLIP's pooled vectors (half to fit)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        x = clip(ids.input_ids).pooler_output
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y, half = torch.tensor(labels), len(labels) // 2
    probe = torch.nn.Linear(x.shape[1], max(labels) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[:half]), y[:half]).backward()
        optimizer.step()
    return (probe(x[half:]).argmax(1) == y[half:]).float().mean().item()


def test_clip_placement_puts_position_and_size_into_the_pooled_vector():
    """clip_placement = 1: CLIP's pooled vector says where and how large (the way into adaLN)."""
    from toys.mini.clip_training import placement_labels, train_clip
    from toys.mini.text import build_text_encoders, build_tokenizers

    examples = generate_dataset(300, seed=3, size=32, two_tone=0.0)
    captions = [e.caption for e in examples]
    labels = [placement_labels(e.caption, e.attributes) for e in examples]
    assert placement_labels("a red circle on a blue background", examples[0].attributes) == (9, 3)
    position = [p for p, _ in labels]
    accuracies = {}
    for placement in (False, True):
        clip_tok, t5_tok = build_tokenizers()
        clip, _ = build_text_encoders(clip_tok, t5_tok, 64, 64, seed=0, clip_layers=2)
        train_clip(
            clip, clip_tok, captions, [e.attributes for e in examples], 60, seed=0, placement=placement
        )
        accuracies[placement] = pooled_probe(clip, clip_tok, captions, position)
    assert accuracies[True] > 0.8 and accuracies[True] > accuracies[False] + 0.3, accuracies


def test_held_out_prompts_ask_for_the_sizes_the_build_trained_on(tmp_path):
    from toys.mini import quality

    (tmp_path / "build_info.json").write_text(json.dumps({"spec": {"sizes": ["large"]}}))
    assert {e.attributes.size for e in quality.held_out_examples(20, tmp_path)} == {"large"}
    (tmp_path / "build_info.json").write_text(json.dumps({"spec": {}}))  # a build from before sizes
    assert quality.trained_sizes(tmp_path) == ("small", "medium", "large")
