"""Push a trained LoRA to the Hugging Face Hub with a model card.

A failed push (bad token, network, quota) is logged and returns None: the trained weights are in
the tar either way. The token never enters a log line, the config or the card: exception texts are
scrubbed of it before they are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from training.config import TrainingConfig
from training.export import BASE_MODEL_REPO, LORA_FILE, SOFTWARE_NAME
from training.training_state import STATE_FILE

log = logging.getLogger(__name__)

LICENSE_NAME = "flux-1-dev-non-commercial-license"
LICENSE_LINK = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"


def model_card(config: TrainingConfig, previews: list[tuple[str, str]]) -> str:
    """README.md for the repo: YAML header the Hub reads (base model, license, widget), then usage."""
    repo = config.hf_repo_id or "<your-name>/<repo>"
    trigger = config.trigger_word
    widget = "".join(
        f"  - text: {_yaml_str(prompt)}\n    output:\n      url: {_yaml_str(path)}\n"
        for path, prompt in previews
    )
    header = (
        "---\n"
        f"base_model: {BASE_MODEL_REPO}\n"
        "license: other\n"
        f"license_name: {LICENSE_NAME}\n"
        f"license_link: {LICENSE_LINK}\n"
        "library_name: diffusers\n"
        "pipeline_tag: text-to-image\n"
        "tags:\n  - flux\n  - lora\n  - diffusers\n  - text-to-image\n"
        f"instance_prompt: {_yaml_str(trigger)}\n" + (f"widget:\n{widget}" if widget else "") + "---\n"
    )
    gallery = "".join(f"![{prompt}]({path})\n\n" for path, prompt in previews)
    trigger_line = (
        f"Use the trigger word `{trigger}` in your prompt to bring in what was trained."
        if trigger
        else "This LoRA was trained without a trigger word."
    )
    example_prompt = f"a photo of {trigger}".strip()
    return f"""{header}
# {repo.split("/")[-1]}

A LoRA for [FLUX.1 [dev]](https://huggingface.co/{BASE_MODEL_REPO}), trained with {SOFTWARE_NAME}.

## Trigger word

{trigger_line}

{gallery}## Use it with diffusers

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{BASE_MODEL_REPO}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo}", weight_name="{LORA_FILE}")
image = pipe("{example_prompt}", num_inference_steps=28, guidance_scale=3.5).images[0]
image.save("out.png")
```

## Use it with this container

Pass the repo as `lora_weights`:

```
cog predict -i prompt="{example_prompt}" -i lora_weights="{repo}"
```

## Training

Steps: {config.steps}, LoRA rank: {config.lora_rank} (alpha {config.lora_alpha}), learning rate:
{config.learning_rate:g}, optimizer: {config.optimizer}, resolutions: {", ".join(map(str, config.resolutions))},
batch size: {config.batch_size}, seed: {config.seed}. `config.json` has every setting.

## License

The weights follow the license of the base model, the
[FLUX.1 [dev] Non-Commercial License]({LICENSE_LINK}).
"""


def push_to_hub(
    folder: Path, repo_id: str, token: str, api_factory: Callable[..., object] | None = None
) -> str | None:
    """Create the repo if needed and upload the folder; the repo URL, or None when the push failed."""
    try:
        if api_factory is None:
            from huggingface_hub import HfApi

            api_factory = HfApi
        api = api_factory(token=token)
        url = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            ignore_patterns=[STATE_FILE],  # the training state is for continuing, not for the model repo
            commit_message=f"Upload FLUX.1-dev LoRA trained with {SOFTWARE_NAME}",
        )
    except Exception as exc:  # never lose the training to the Hub: any failure is logged and returned
        message = f"{type(exc).__name__}: {exc}".replace(token, "***") if token else str(exc)
        log.error(
            "pushing to the Hugging Face Hub (%s) failed; the weights are still returned: %s",
            repo_id,
            message,
        )
        return None
    log.info("pushed the LoRA to https://huggingface.co/%s", repo_id)
    return str(url)


def _yaml_str(text: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML)."""
    import json

    return json.dumps(text)
