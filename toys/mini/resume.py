"""Resuming a flux-mini build after its first transformer phases (build.py --resume): the earlier
build's record is checked against the spec, and its VAE, text encoders and dev transformer are read
back as the next phase needs them (fp32; the transformer was saved in fp16, as each phase ends)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from flux.variants import VARIANTS
from toys.mini.spec import MiniSpec, TransformerPhase

# The first builds (before phases) kept their one phase's numbers at the top of the spec.
_SINGLE_PHASE_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerPhase))


def spec_record(spec: MiniSpec) -> dict:
    """The spec as build_info.json holds it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def read_build_info(folder: Path) -> dict:
    path = folder / "build_info.json"
    if not path.is_file():
        raise ValueError(f"--resume {folder}: no build_info.json there, so not a flux-mini build")
    return json.loads(path.read_text(encoding="utf-8"))


def phase_runs(info: dict) -> tuple[dict, list[dict]]:
    """A build_info's spec record and the records of the phases it ran, builds from before phases
    read as their phase 1."""
    record = dict(info["spec"])
    if "phases" in record:
        return record, info["transformer_phases"]
    phase = {name: record.pop(name) for name in _SINGLE_PHASE_FIELDS}
    record["phases"] = [phase]
    run = dict(
        phase=1,
        samples=phase["steps"] * record["batch"],
        seconds=info["seconds"]["transformer"],
        final_loss=info["transformer_final_loss"],
        loss_curve=info["transformer_loss_curve"],
    )
    return record, [run]


def done_phases(earlier: dict, spec: MiniSpec) -> list[dict]:
    """The earlier build's phase records, after checking it is the start of `spec`'s build."""
    record, runs = phase_runs(earlier)
    wanted = spec_record(spec)
    done = record.pop("phases")
    # A field added to MiniSpec after the earlier build defaults to what builds did before it.
    defaults = spec_record(MiniSpec())
    differing = sorted(k for k in wanted.keys() - {"phases"} if record.get(k, defaults[k]) != wanted[k])
    if differing:
        raise ValueError(f"--resume: the earlier build's spec differs from this one in {differing}")
    if done != wanted["phases"][: len(done)]:
        raise ValueError("--resume: the earlier build's transformer phases are not the start of this spec's")
    if len(done) >= len(wanted["phases"]):
        raise ValueError(f"--resume: the earlier build has done all {len(done)} phase(s): nothing to run")
    return runs


def load_build(folder: Path):
    """(vae, clip, t5, clip_tokenizer, t5_tokenizer, dev_transformer) of a written build, in fp32."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder / VARIANTS["dev"].folder, torch_dtype=torch.float32)
    return (
        pipe.vae,
        pipe.text_encoder,
        pipe.text_encoder_2,
        pipe.tokenizer,
        pipe.tokenizer_2,
        pipe.transformer.requires_grad_(True),
    )
