"""The FLUX.1 variants this container serves and the rules that differ between them."""

from dataclasses import dataclass

from errors import UserInputError

# Both variants accept up to 50 steps, as the public trained-version predictor does; schnell is
# step-distilled, so more than its recommended 4 is allowed but logged.
MIN_STEPS, MAX_STEPS = 1, 50


@dataclass(frozen=True)
class VariantSpec:
    name: str
    hf_repo: str  # where the diffusers-layout weights live on the Hugging Face Hub
    folder: str  # sub-folder name under a weights directory
    default_steps: int
    recommended_max_steps: int  # what the variant was distilled/tuned for; above it a warning is logged
    uses_guidance: bool  # dev is guidance-distilled; schnell ignores guidance
    max_sequence_length: int  # T5 tokens
    gated: bool  # needs HF_TOKEN to download


VARIANTS: dict[str, VariantSpec] = {
    "schnell": VariantSpec(
        name="schnell",
        hf_repo="black-forest-labs/FLUX.1-schnell",
        folder="FLUX.1-schnell",
        default_steps=4,
        recommended_max_steps=4,
        uses_guidance=False,
        max_sequence_length=256,
        gated=False,
    ),
    "dev": VariantSpec(
        name="dev",
        hf_repo="black-forest-labs/FLUX.1-dev",
        folder="FLUX.1-dev",
        default_steps=28,
        recommended_max_steps=50,
        uses_guidance=True,
        max_sequence_length=512,
        gated=True,
    ),
}


def get_variant(name: str, field: str = "model") -> VariantSpec:
    if name not in VARIANTS:
        raise UserInputError(field, name, f"allowed: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def parse_variant_list(text: str, field: str = "FLUX_VARIANTS") -> tuple[str, ...]:
    """'dev,schnell' -> ('dev', 'schnell'); used for the setting that chooses what setup loads."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise UserInputError(field, text, f"a comma-separated list of: {', '.join(VARIANTS)}")
    for name in names:
        get_variant(name, field)
    return names
