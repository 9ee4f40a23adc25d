"""Read a FLUX.1 LoRA file in any common layout into one canonical form.

Canonical form: `{diffusers module name: LoraUpdate(down, up, alpha)}`, keyed by the name of an
`nn.Linear` in diffusers' FluxTransformer2DModel (`transformer_blocks.0.attn.to_q`,
`single_transformer_blocks.3.proj_mlp`, ...). The weight update of that module at scale 1 is

    delta_W = (alpha / rank) * up @ down        down: [rank, in], up: [out, rank]

Layouts accepted (keys may carry a `transformer.`, `diffusion_model.` or `base_model.model.` prefix):
- diffusers / PEFT / ai-toolkit: `<module>.lora_A.weight`, `.lora_B.weight`; alpha from `<module>.alpha`
  keys, else from diffusers' `lora_adapter_metadata` (lora_alpha, alpha_pattern, use_rslora), else rank.
- kohya sd-scripts: `lora_unet_<BFL name with underscores>.lora_down/.lora_up.weight` with a per-module
  `.alpha`; fused qkv / linear1 updates are split by rows onto to_q/to_k/to_v(/proj_mlp).
  Also kohya-style keys of diffusers names (`lora_transformer_<diffusers name with underscores>`).
- BFL / ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or lora_down/lora_up).
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` (no alpha: the update is used as stored).

Why not diffusers' converters at run time: `_convert_kohya_flux_lora_to_diffusers` hard-codes FLUX.1's
sizes for the single-block split (3072/12288), so it fails on the tiny test model and could not be
tested through the path production uses; it also leaves the final layer's alpha out (its "TODO: alphas")
so kohya final-layer updates load at the wrong strength; and BFL names with lora_A/lora_B pass through
it unconverted. The mapping here is checked against diffusers' kohya and XLabs converters on FLUX.1's
full-size shapes in tests/test_lora_formats.py (agreeing everywhere except that final-layer alpha).

Text-encoder keys are dropped with one log line: the pipeline applies LoRAs to the transformer only.
Every key and shape is validated here, before anything touches a model; a file that does not fit
raises UserInputError naming the field and the file.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from errors import UserInputError
from lora.flux_names import Target, bfl_table, block_counts, underscored, xlabs_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraUpdate:
    """A low-rank update of one Linear: delta_W = (alpha / rank) * up @ down.

    Tensors stay in the file's dtype on the CPU; `delta` computes in float32.
    """

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the module this update fits."""
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    def add_to(self, target: torch.Tensor, scale: float = 1.0) -> None:
        """target += scale * delta_W, in place, in target's dtype and device (float32 for fusing)."""
        up = self.up.to(device=target.device, dtype=target.dtype)
        down = self.down.to(device=target.device, dtype=target.dtype)
        target.addmm_(up, down, alpha=scale * self.alpha / self.rank)

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The float32 weight update at scale 1, on `device`."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=device)
        self.add_to(out)
        return out


CanonicalLora = dict[str, LoraUpdate]

# Prefixes that only say "this belongs to the transformer"; stripped before the name is looked up.
_MODEL_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")
# Keys of text-encoder LoRAs (kohya lora_te*, diffusers text_encoder*, ComfyUI text_encoders.*).
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder")
# Suffix -> role. ".lora_down.weight" is tested before ".down.weight" (XLabs) by order.
_ROLES = (
    (".lora_A.weight", "down"),
    (".lora_down.weight", "down"),
    (".down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_up.weight", "up"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Parts of keys of adapter kinds that are not plain LoRA and cannot be expressed as up @ down.
_OTHER_KINDS = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa (LyCORIS)",
    "lokr_": "LoKr (LyCORIS)",
}
# Full-difference tensors some exporters add; harmless when all zero, unsupported otherwise.
_DIFF_SUFFIXES = (".diff", ".diff_b", ".lora_A.bias", ".lora_B.bias", ".lora_down.bias", ".lora_up.bias")
_STABLE_DIFFUSION_PARTS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks")


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every nn.Linear in the transformer."""
    return {
        name: (int(m.out_features), int(m.in_features))
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def read_lora_file(
    path: Path | str, transformer: torch.nn.Module, field: str = "lora_weights"
) -> CanonicalLora:
    """Read a local .safetensors LoRA into canonical form, validated against `transformer`."""
    return read_lora_file_for_shapes(path, linear_shapes(transformer), field)


def read_lora_file_for_shapes(
    path: Path | str,
    shapes: Mapping[str, tuple[int, int]],
    field: str = "lora_weights",
    source: str | None = None,
) -> CanonicalLora:
    """read_lora_file against linear_shapes(...) known without the model (e.g. built on the meta device)."""
    path = Path(path)
    tensors, metadata = _load_safetensors(path, field)
    return convert_state_dict(tensors, metadata, shapes, field=field, source=source or path.name)


def _load_safetensors(path: Path, field: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as exc:
        raise UserInputError(field, path.name, f"is not a readable .safetensors file ({exc})") from exc
    return tensors, metadata


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    shapes: Mapping[str, tuple[int, int]],
    field: str = "lora_weights",
    source: str = "state dict",
) -> CanonicalLora:
    """Map a LoRA state dict of any accepted layout onto the linears in `shapes` (see linear_shapes)."""

    def fail(message: str) -> UserInputError:
        return UserInputError(field, source, message)

    if not tensors:
        raise fail("the file holds no tensors")
    tensors = _drop_text_encoder_keys(tensors, field, source)
    if not tensors:
        raise fail(
            "the file holds only text-encoder LoRA keys; this container applies LoRAs to the transformer"
        )

    groups, unknown = _group_keys(tensors, fail)
    resolver = _Resolver(shapes)
    targets: dict[str, tuple[Target, str]] = {}
    for base in groups:
        found = resolver.resolve(base)
        if found is None:
            unknown.append(base)
        else:
            targets[base] = found
    if not targets:
        raise fail(
            "no key matches a FLUX.1 transformer module" + _family_hint(list(tensors)) + _examples(unknown)
        )
    if unknown:
        raise fail(f"{len(unknown)} LoRA module(s) match no FLUX.1 transformer module" + _examples(unknown))

    peft_alpha = _PeftAlpha.from_metadata(metadata, fail)
    out: CanonicalLora = {}
    given_by: dict[str, str] = {}
    layouts: set[str] = set()
    for base, parts in groups.items():
        target, layout = targets[base]
        layouts.add(layout)
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            if "down" not in parts and "up" not in parts:
                continue  # a lone alpha scalar: nothing to apply
            raise fail(f"LoRA module {base!r} has no {missing} weight")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise fail(
                f"LoRA module {base!r} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                "expected 2-D [rank, in] and [out, rank]"
            )
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().reshape(-1)[0])
        else:
            alpha = peft_alpha.alpha(target.modules[0] if layout == "diffusers/PEFT" else None, rank)
        for name, update in _split(base, target, down, up, alpha, shapes, fail).items():
            if name in given_by:
                raise fail(f"module {name} is given twice, by {given_by[name]!r} and {base!r}")
            given_by[name] = base
            out[name] = update
    ranks = sorted({u.rank for u in out.values()})
    logger.info(
        "%s: %s, layout %s, %d transformer modules, rank %s",
        field,
        source,
        "+".join(sorted(layouts)),
        len(out),
        "/".join(map(str, ranks)),
    )
    return out


def _drop_text_encoder_keys(
    tensors: Mapping[str, torch.Tensor], field: str, source: str
) -> dict[str, torch.Tensor]:
    kept = {k: v for k, v in tensors.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)}
    dropped = [k for k in tensors if k not in kept]
    if dropped:
        modules = {_split_role(k)[0] for k in dropped}
        logger.warning(
            "%s: %s: dropped %d text-encoder LoRA tensors (%d modules); "
            "this container applies LoRAs to the FLUX transformer only",
            field,
            source,
            len(dropped),
            len(modules),
        )
    return kept


def _split_role(key: str) -> tuple[str, str | None]:
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, None


def _group_keys(
    tensors: Mapping[str, torch.Tensor], fail
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group keys by LoRA module: {base name: {"down"|"up"|"alpha": tensor}}, plus unrecognised keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        for part, kind in _OTHER_KINDS.items():
            if part in key:
                raise fail(
                    f"key {key!r} belongs to a {kind} adapter; only plain LoRA (up @ down) is supported"
                )
        if key.endswith(_DIFF_SUFFIXES):
            if torch.count_nonzero(value) == 0:
                continue  # exporters write zero bias/diff tensors that change nothing
            raise fail(f"key {key!r} holds a bias or full-weight difference, which is not supported")
        base, role = _split_role(key)
        if role is None:
            unknown.append(key)
            continue
        for prefix in _MODEL_PREFIXES:
            if base.startswith(prefix):
                base = base[len(prefix) :]
                break
        slot = groups.setdefault(base, {})
        if role in slot:
            raise fail(f"LoRA module {base!r} has two {role} tensors (for example {key!r})")
        slot[role] = value
    return groups, unknown


class _Resolver:
    """Finds the diffusers module(s) a LoRA module name of any layout refers to."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]]):
        self.diffusers = {name: Target((name,)) for name in shapes}
        num_double, num_single = block_counts(list(shapes))
        self.bfl = bfl_table(num_double, num_single)
        self.xlabs = xlabs_table(num_double, num_single)
        self.kohya_bfl = underscored(self.bfl)
        self.kohya_diffusers = underscored(self.diffusers)

    def resolve(self, base: str) -> tuple[Target, str] | None:
        """(target, layout name) or None."""
        if base in self.diffusers:
            return self.diffusers[base], "diffusers/PEFT"
        if base in self.bfl:
            return self.bfl[base], "BFL"
        if base in self.xlabs:
            return self.xlabs[base], "XLabs"
        for prefix in ("lora_unet_", "lora_transformer_"):
            if base.startswith(prefix):
                rest = base[len(prefix) :]
                if rest in self.kohya_bfl:
                    return self.kohya_bfl[rest], "kohya"
                if rest in self.kohya_diffusers:
                    return self.kohya_diffusers[rest], "kohya"
        return None


def _split(
    base: str,
    target: Target,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float,
    shapes: Mapping[str, tuple[int, int]],
    fail,
) -> dict[str, LoraUpdate]:
    """Check the update's shape against its module(s) and cut a fused update into per-module rows."""
    missing = [m for m in target.modules if m not in shapes]
    if missing:
        raise fail(f"LoRA module {base!r} updates {', '.join(missing)}, which this transformer does not have")
    outs = [shapes[m][0] for m in target.modules]
    ins = {shapes[m][1] for m in target.modules}
    expected = (sum(outs), ins.pop()) if len(ins) == 1 else None
    got = (int(up.shape[0]), int(down.shape[1]))
    if got != expected:
        where = " + ".join(target.modules)
        raise fail(f"LoRA module {base!r} has shape {got}, which does not fit {where} {expected}")
    if target.swap_halves:
        half = up.shape[0] // 2
        up = torch.cat([up[half:], up[:half]])
    return {
        name: LoraUpdate(down=down, up=rows, alpha=alpha)
        for name, rows in zip(target.modules, torch.split(up, outs), strict=True)
    }


@dataclass(frozen=True)
class _PeftAlpha:
    """Alpha of PEFT-layout modules from diffusers' `lora_adapter_metadata`, when a file carries it."""

    lora_alpha: float | None = None
    pattern: tuple[tuple[str, float], ...] = ()
    rslora: bool = False

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], fail) -> _PeftAlpha:
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return cls()
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise fail(f"its lora_adapter_metadata is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise fail("its lora_adapter_metadata is not a JSON object")

        # A diffusers pipeline saves "transformer.lora_alpha"; a bare model saves "lora_alpha".
        def get(key: str):
            return config.get(f"transformer.{key}", config.get(key))

        if get("use_dora"):
            raise fail("it is a DoRA adapter (use_dora in its metadata); only plain LoRA is supported")
        alpha = get("lora_alpha")
        pattern = get("alpha_pattern") or {}
        return cls(
            lora_alpha=float(alpha) if alpha is not None else None,
            pattern=tuple((str(k), float(v)) for k, v in pattern.items()),
            rslora=bool(get("use_rslora")),
        )

    def alpha(self, module: str | None, rank: int) -> float:
        """Alpha for a module without an `.alpha` key; non-PEFT layouts (module None) use alpha = rank."""
        if module is None:
            return float(rank)
        alpha = self.lora_alpha
        for pattern, value in self.pattern:
            if _pattern_matches(pattern, module):
                alpha = value
                break
        if alpha is None:
            return float(rank)
        # rsLoRA scales by alpha / sqrt(rank); express it as alpha' / rank.
        return alpha * math.sqrt(rank) if self.rslora else alpha


def _pattern_matches(pattern: str, module: str) -> bool:
    """PEFT's rule: a pattern names the module itself or a dotted suffix of its name."""
    if module == pattern or module.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module) is not None
    except re.error:
        return False


def _family_hint(keys: list[str]) -> str:
    if any(part in key for key in keys for part in _STABLE_DIFFUSION_PARTS):
        return "; this looks like a Stable Diffusion 1.x/SDXL LoRA, use one made for FLUX.1"
    if any("joint_blocks" in key for key in keys):
        return "; this looks like a Stable Diffusion 3 LoRA, use one made for FLUX.1"
    return "; use a LoRA made for FLUX.1"


def _examples(names: list[str], limit: int = 3) -> str:
    if not names:
        return ""
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f" (for example {shown}{more})"
