"""flux-mini's build resumes after a phase (build.py --resume) and gives what the whole build gives,
so the committed weights can be carried on instead of rebuilt; a build of another spec is refused."""

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_flux_mini import quick_spec


def dev_weights(folder: Path) -> dict:
    return load_file(next((folder / "FLUX.1-dev" / "transformer").glob("*.safetensors")))


def test_resumed_build_equals_the_whole_build(tmp_path):
    from toys.mini.build import build_flux_mini

    whole = build_flux_mini(tmp_path / "whole", quick_spec())
    first = build_flux_mini(tmp_path / "first", quick_spec(phases=1))
    resumed = build_flux_mini(tmp_path / "resumed", quick_spec(), resume=first, checkpoint_every=1)

    expected, got = dev_weights(whole), dev_weights(resumed)
    assert expected.keys() == got.keys()
    assert all((expected[k] == got[k]).all() for k in expected), "resuming changed the weights"
    info = json.loads((resumed / "build_info.json").read_text())
    assert [run["phase"] for run in info["transformer_phases"]] == [1, 2]
    assert info["transformer_phases"][1]["loss_curve"][-1]["samples"] == (3 + 2) * 8
    assert info["resumed_from"]["folder"] == str(first)
    # The parts loaded from `first` do not carry its folder (a path on the build machine) into the configs.
    configs = [c.read_text() for c in resumed.glob("FLUX.1-*/*/config.json")]
    assert configs and not [c for c in configs if "_name_or_path" in c]
    # The learning-curve checkpoints: the EMA after each step of phase 2, samples counted from the start.
    names = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert names == ["phase2-samples0000032.safetensors", "phase2-samples0000040.safetensors"]
    assert all((load_file(resumed / "checkpoints" / names[-1])[k] == got[k]).all() for k in got)


def test_a_checkpointed_build_writes_its_encoders_first_and_trains_the_same(tmp_path, monkeypatch):
    """With checkpoints, FLUX.1-dev/ is written before the transformer trains (the checkpoints decode
    while the build runs), and that save does not change what the build trains."""
    from toys.mini import build

    whole = build.build_flux_mini(tmp_path / "whole", quick_spec(phases=1))
    monkeypatch.setattr(build, "_save", lambda *args: None)  # keep what was written before training
    early = build.build_flux_mini(tmp_path / "early", quick_spec(phases=1), checkpoint_every=1)

    last = sorted((early / "checkpoints").iterdir())[-1]
    assert all((load_file(last)[k] == v).all() for k, v in dev_weights(whole).items())
    for part in ("vae", "text_encoder", "text_encoder_2"):
        files = [next((f / "FLUX.1-dev" / part).glob("*.safetensors")) for f in (whole, early)]
        expected, got = (load_file(f) for f in files)
        assert all((expected[k] == got[k]).all() for k in expected), part
    untrained = dev_weights(early)
    assert any((untrained[k] != v).any() for k, v in load_file(last).items()), "saved after training"


def test_resume_refuses_another_spec_or_a_finished_build(tmp_path):
    from toys.mini.build import build_flux_mini

    first = build_flux_mini(tmp_path / "first", quick_spec(phases=1))
    with pytest.raises(ValueError, match=r"differs from this one in \['clip_steps'\]"):
        build_flux_mini(tmp_path / "x", dataclasses.replace(quick_spec(), clip_steps=6), resume=first)
    with pytest.raises(ValueError, match="nothing to run"):
        build_flux_mini(tmp_path / "y", quick_spec(phases=1), resume=first)
    with pytest.raises(ValueError, match="no build_info.json"):
        build_flux_mini(tmp_path / "z", quick_spec(), resume=tmp_path)


def test_a_build_from_before_phases_counts_as_its_first_phase():
    """The first committed builds kept their one phase's numbers at the top of the spec."""
    from toys.mini.resume import done_phases, spec_record
    from toys.mini.spec import MiniSpec

    spec = MiniSpec()
    record = spec_record(spec)
    record.update(record.pop("phases")[0])
    spec = dataclasses.replace(spec, phases=spec.phases * 2)  # a second phase to run
    curve = [{"samples": 64000, "loss": 0.1}]
    earlier = dict(
        spec=record, seconds={"transformer": 9.0}, transformer_final_loss=0.1, transformer_loss_curve=curve
    )
    runs = done_phases(earlier, spec)
    samples = spec.phases[0].steps * spec.batch  # the default spec's phase, as the old record held it
    assert runs == [dict(phase=1, samples=samples, seconds=9.0, final_loss=0.1, loss_curve=curve)]


def test_the_committed_weights_are_the_default_spec_built():
    from toys.mini.resume import done_phases, read_build_info
    from toys.mini.spec import DEFAULT_DIR, MiniSpec

    if not (DEFAULT_DIR / "build_info.json").is_file():
        pytest.skip("weights/flux-mini is not committed in this checkout")
    with pytest.raises(ValueError, match="nothing to run"):
        done_phases(read_build_info(DEFAULT_DIR), MiniSpec())
