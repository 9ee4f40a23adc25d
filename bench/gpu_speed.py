"""go_fast on the GPU: the project's library path beside plain diffusers, measured in one run.

    python bench/gpu_speed.py [--tiny] [--out DIR] [--budget SECONDS] [--baseline PATH] [--no-baseline]

Full size (default): the FLUX.1 architecture with random weights, built directly on the GPU in bf16
(compute does not depend on the values), tokenizers built locally. Measured through flux.generate():
schnell 4 steps and dev 28 steps at 1024x1024, go_fast false/true; go_fast setup (fp8 copies + regional
compile + warm-up); dev with a rank-16 LoRA on every block Linear; LoRA switch time (fuse + fp8
refresh); one transformer forward per path; the quality guard (fast vs bf16 eager transformer output,
relative error per step); step caching at each level and setup with a saved compile cache (gpu_caching.py);
on a machine with several GPUs, training on all of them (gpu_train_processes.py).
It first runs ../shared/bench/diffusers_baseline.py in a subprocess (same
GPU, before the project's models take memory), then prints a table of ratios and writes
DIR/gpu_speed.json (DIR/baseline.json from the baseline).

--tiny runs everything on the CPU at toy size in about 30 s (a smoke test of the script); there the
fast path is the float32 emulation of the fp8 math (CPUs have no fp8 tensor cores).

On the lent H200 (no diffusers or bitsandbytes there, no network, ../shared does not travel):
`bash bench/prepare_gpu_run.sh` here fills the ignored folders .whl/ and .gpu/ and prints the device
command (carry both; pip install the wheels into /tmp/site, then this script with --out $OUT).

Training (bench/gpu_train.py, last): the project's loop (train_lora, default optimizer adamw8bit) at
512x512 and 1024x1024, gradient checkpointing off and on, step time and peak memory, beside the peft
baseline's training steps from the same run. --train-only runs the baseline and training alone;
--plans-only the baseline and the memory plan rows (bench/gpu_memory_plans.py), which the whole run
reaches only with budget to spare.

Results are written to DIR/gpu_speed.json before every section and at the end (a run stopped by its
timeout keeps what it had); a section that fails is recorded and the next one runs; torch.compile
recompiles are logged (TORCH_LOGS recompiles) and counted in the JSON.
"""

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_caching import compile_cache_section, step_cache_section  # noqa: E402
from gpu_caching import table_rows as caching_rows  # noqa: E402
from gpu_memory_plans import plans_section  # noqa: E402
from gpu_memory_plans import table_rows as plan_rows  # noqa: E402
from gpu_train import table_rows as train_rows  # noqa: E402
from gpu_train import train_section  # noqa: E402
from gpu_train_processes import multi_gpu_section  # noqa: E402
from gpu_train_processes import table_rows as multi_gpu_rows  # noqa: E402

from flux.attention import configure_attention_backends  # noqa: E402
from flux.full_size import FULL  # noqa: E402

BASELINE_CANDIDATES = (
    ROOT.parent / "shared" / "bench" / "diffusers_baseline.py",
    ROOT / "shared" / "bench" / "diffusers_baseline.py",
    ROOT / ".gpu" / "diffusers_baseline.py",  # where a device run carries a copy (../shared does not travel)
)
PROMPT = "A woman in a serene garden setting, holding a yoga pose on a mat, surrounded by lush greenery, photo of TOK"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.results: dict = {
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tiny": args.tiny,
            "skipped": [],
        }

    def save(self) -> None:
        """Write what was measured so far (called before every section and at the end)."""
        self.results["total_s"] = time.perf_counter() - self.started
        self.results["recompiles"] = RECOMPILES.count
        path = Path(self.args.out) / "gpu_speed.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.results, indent=1, default=str))
        path.with_suffix(".tmp").replace(path)  # never a half-written file

    def attempt(self, name: str, fn, *args) -> None:
        """Run one section; a failure is recorded and the run goes on to the next."""
        try:
            fn(*args)
        except Exception as exc:
            self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            self.log(f"{name} failed: {type(exc).__name__}: {exc}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def log(self, *parts) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s]", *parts, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeat: int) -> list[float]:
        times = []
        for _ in range(repeat):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return times

    def section(self, name: str, need_s: float) -> bool:
        """Run a section only if the budget leaves `need_s` seconds; record skips."""
        if self.left() < need_s:
            self.results["skipped"].append(name)
            self.log(f"budget: skipping {name} ({self.left():.0f} s left, needs ~{need_s:.0f})")
            return False
        self.save()
        self.log(name)
        return True


class RecompileCounter(logging.Handler):
    """Counts torch.compile recompiles (the TORCH_LOGS `recompiles` records); torch prints them too."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "ecompil" in record.getMessage():
            self.count += 1


RECOMPILES = RecompileCounter()
RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"  # torch._logging's "recompiles" artifact


def log_recompiles() -> None:
    """Count Dynamo's recompiles. set_logs gives `torch._dynamo` a handler of its own and stops its records
    there (propagate off), so a handler on `torch` sees none: the counter hangs on the artifact logger
    the recompile records are written to."""
    torch._logging.set_logs(recompiles=True)
    logging.getLogger(RECOMPILES_LOGGER).addHandler(RECOMPILES)


# ---- the baseline, in its own process ------------------------------------------------------------


def run_baseline(bench: Bench) -> None:
    args = bench.args
    path = (
        Path(args.baseline) if args.baseline else next((p for p in BASELINE_CANDIDATES if p.exists()), None)
    )
    if path is None or not path.exists():
        bench.results["skipped"].append("baseline (diffusers_baseline.py not found; pass --baseline)")
        return
    share = max(60.0, bench.left() * args.baseline_share)
    command = [sys.executable, str(path), "--out", args.out, "--budget", f"{share:.0f}"]
    command += ["--tiny"] if args.tiny else []
    command += [] if args.baseline_full else ["--skip-compile"]  # its training steps are compared
    bench.log("baseline:", " ".join(command))
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=share + 120)
    bench.results["baseline_wall_s"] = time.perf_counter() - t
    tail = (done.stdout + done.stderr)[-3000:]
    baseline_json = Path(args.out) / "baseline.json"
    if done.returncode != 0 or not baseline_json.exists():
        bench.results["baseline_error"] = tail
        bench.log("baseline failed:\n" + tail)
        return
    bench.results["baseline"] = json.loads(baseline_json.read_text())


# ---- building the models -------------------------------------------------------------------------


def build_models(bench: Bench):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux.loading import FluxModels
    from toys.tiny import SCHEDULERS, build_shared_components, build_tokenizers, build_transformer

    t = time.perf_counter()
    if bench.args.tiny:
        shared = build_shared_components(seed=0)
        transformers = {"schnell": build_transformer(False, seed=1), "dev": build_transformer(True, seed=1)}
    else:
        clip_tok, t5_tok = build_tokenizers()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(bench.dtype)  # build on the GPU in bf16: seconds, not a 90 s CPU build
        try:
            with torch.device(bench.device):
                torch.manual_seed(0)
                clip = CLIPTextModel(
                    CLIPTextConfig(
                        bos_token_id=clip_tok.bos_token_id,
                        eos_token_id=clip_tok.eos_token_id,
                        pad_token_id=clip_tok.pad_token_id,
                        **FULL["clip"],
                    )
                )
                t5 = T5EncoderModel(
                    T5Config(
                        pad_token_id=t5_tok.pad_token_id,
                        eos_token_id=t5_tok.eos_token_id,
                        decoder_start_token_id=t5_tok.pad_token_id,
                        **FULL["t5"],
                    )
                )
                vae = AutoencoderKL(
                    in_channels=3,
                    out_channels=3,
                    latent_channels=16,
                    use_quant_conv=False,
                    use_post_quant_conv=False,
                    shift_factor=0.1159,
                    scaling_factor=0.3611,
                    **FULL["vae"],
                )
                transformers = {
                    "schnell": FluxTransformer2DModel(guidance_embeds=False, **FULL["transformer"]),
                    "dev": FluxTransformer2DModel(guidance_embeds=True, **FULL["transformer"]),
                }
        finally:
            torch.set_default_dtype(previous)
        shared = dict(tokenizer=clip_tok, tokenizer_2=t5_tok, text_encoder=clip, text_encoder_2=t5, vae=vae)
    for module in (shared["text_encoder"], shared["text_encoder_2"], shared["vae"], *transformers.values()):
        module.to(bench.device, bench.dtype).eval().requires_grad_(False)
    models = FluxModels(
        transformers=transformers,
        scheduler_configs={
            n: dict(FlowMatchEulerDiscreteScheduler(**SCHEDULERS[n]).config) for n in transformers
        },
        device=bench.device,
        dtype=bench.dtype,
        **shared,
    )
    bench.results["build_s"] = time.perf_counter() - t
    bench.results["transformer_params_B"] = sum(p.numel() for p in transformers["dev"].parameters()) / 1e9
    return models


def setup_fast_path(bench: Bench, models) -> None:
    from flux.fast.capability import FastSupport
    from flux.fast.path import FastPath, setup_fast
    from flux.fast.transformer import FastTransformer
    from flux.variants import get_variant

    t = time.perf_counter()
    if bench.device.type == "cuda":
        lengths = {n: get_variant(n).max_sequence_length for n in models.transformers}
        shapes = ((1024, 1024, 1), (768, 1344, 2)) if not bench.args.no_dynamic_warmup else ((1024, 1024, 1),)
        models.fast = setup_fast(
            models.transformers, bench.device, lengths, mode=bench.args.fast_mode, warmup_shapes=shapes
        )
    else:  # CPU: exercise the same wiring with the float32 emulation of the fp8 math (no compile)
        models.fast = FastPath(
            FastSupport(True, "cpu float32 emulation of fp8 (bench --tiny)"),
            {n: FastTransformer(tr, backend="emulate") for n, tr in models.transformers.items()},
        )
    bench.results["go_fast_setup_s"] = time.perf_counter() - t
    bench.results["go_fast_available"] = bool(models.fast.transformers)
    bench.results["go_fast_reason"] = models.fast.support.reason
    if models.fast.transformers:
        fast = next(iter(models.fast.transformers.values()))
        bench.results["fp8_GB_per_transformer"] = fast.fp8_bytes / 1e9
        bench.results["fp8_linears_per_transformer"] = len(fast.linears)
    if bench.device.type == "cuda":
        bench.results["gpu_mem_after_setup_GB"] = torch.cuda.memory_allocated() / 2**30


# ---- measurements ------------------------------------------------------------------------------


def size_inputs(bench: Bench) -> dict:
    if bench.args.tiny:
        return dict(aspect_ratio="custom", width=256, height=256, megapixels="1")
    return dict(aspect_ratio="1:1", megapixels="1")


def time_generate(bench: Bench, models, model: str, steps: int, go_fast: bool, repeat: int, tag: str) -> None:
    from flux.generate import generate
    from flux.request import build_request

    counter = iter(range(10**6))

    def one(prompt: str | None = None) -> None:
        # A new prompt each time: the embedding cache must not hide text encoding (the baseline encodes).
        text = prompt or f"{PROMPT} #{tag} {next(counter)}"
        request = build_request(
            prompt=text,
            model=model,
            num_inference_steps=steps,
            guidance=3.5,
            seed=1,
            go_fast=go_fast,
            output_format="png",
            **size_inputs(bench),
        )
        generate(models, request)

    first = bench.timed(one, 1)[0]
    times = bench.timed(one, repeat)
    bench.results[f"{tag}_first_s"] = first
    bench.results[f"{tag}_s"] = {"median": statistics.median(times), "all": times}
    cached = bench.timed(lambda: one(PROMPT), 2)  # second call reuses the embeddings
    bench.results[f"{tag}_repeated_prompt_s"] = cached[-1]
    bench.log(
        tag, f"median {statistics.median(times):.3f} s (first {first:.3f}, repeated prompt {cached[-1]:.3f})"
    )


def transformer_inputs(bench: Bench, transformer, seq_len: int, timestep: float) -> dict:
    config = transformer.config
    side = 256 if bench.args.tiny else 1024
    tokens = (side // 16) ** 2
    g = torch.Generator("cpu").manual_seed(7)
    like = dict(device=bench.device, dtype=bench.dtype)
    rows = torch.arange(side // 16).repeat_interleave(side // 16)
    cols = torch.arange(side // 16).repeat(side // 16)
    kwargs = dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=g).to(**like),
        encoder_hidden_states=torch.randn(1, seq_len, config.joint_attention_dim, generator=g).to(**like),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(**like),
        timestep=torch.full((1,), timestep).to(**like),
        img_ids=torch.stack([torch.zeros(tokens), rows.float(), cols.float()], 1).to(**like),
        txt_ids=torch.zeros(seq_len, 3).to(**like),
        return_dict=False,
    )
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((1,), 3.5).to(**like)
    return kwargs


@torch.inference_mode()
def quality_and_step(bench: Bench, models) -> None:
    """Quality guard on the full-size dev transformer, and one forward's time per path."""
    transformer = models.transformers["dev"]
    fast = models.fast.transformers.get("dev")
    errors = []
    for t in (1.0, 0.75, 0.5, 0.25):
        inputs = transformer_inputs(bench, transformer, 512, t)
        reference = transformer(**inputs)[0].float()
        if fast is None:
            break
        with fast.active(True):
            out = transformer(**inputs)[0].float()
        errors.append(float((out - reference).norm() / reference.norm()))
    bench.results["quality_rel_error_per_step"] = errors
    bench.results["quality_max_rel_error"] = max(errors) if errors else None
    bench.log("quality guard (fast vs bf16 eager, per step):", [f"{e:.4f}" for e in errors])

    inputs = transformer_inputs(bench, transformer, 512, 0.5)
    repeat = 2 if bench.args.tiny else 5
    bench.timed(lambda: transformer(**inputs), 1)
    bench.results["step_eager_s"] = statistics.median(bench.timed(lambda: transformer(**inputs), repeat))
    if fast is not None:
        with fast.active(True):
            bench.timed(lambda: transformer(**inputs), 1)
            bench.results["step_fast_s"] = statistics.median(
                bench.timed(lambda: transformer(**inputs), repeat)
            )
    if bench.device.type == "cuda":
        # The attention backend, eager bf16 (a compiled graph may keep the backend it was traced with):
        # production turns cuDNN attention off globally (flux/attention.py); is it faster on?
        for on in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(on)
            bench.timed(lambda: transformer(**inputs), 1)
            bench.results[f"step_eager_cudnn_sdp_{int(on)}_s"] = statistics.median(
                bench.timed(lambda: transformer(**inputs), repeat)
            )
        configure_attention_backends()  # back to what production runs
    bench.log("transformer step", {k: v for k, v in bench.results.items() if k.startswith("step_")})


def rank16_lora(transformer, seed: int):
    from lora.formats import LoraUpdate

    g = torch.Generator("cpu").manual_seed(seed)
    lora = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name:
            out_f, in_f = module.weight.shape
            lora[name] = LoraUpdate(
                down=(torch.randn(16, in_f, generator=g) * 0.01).to(torch.bfloat16),
                up=(torch.randn(out_f, 16, generator=g) * 0.01).to(torch.bfloat16),
                alpha=16.0,
            )
    return lora


def lora_section(bench: Bench, models) -> None:
    from lora.apply import LoraFuser

    transformer = models.transformers["dev"]
    fuser = LoraFuser(transformer)
    a, b = rank16_lora(transformer, 1), rank16_lora(transformer, 2)
    fast = models.fast.transformers.get("dev")

    def switch(lora_list) -> tuple[float, float]:
        bench.sync()
        t = time.perf_counter()
        fuser.set_loras(lora_list)
        bench.sync()
        fused = time.perf_counter() - t
        refreshed = 0.0
        if fast is not None:
            t = time.perf_counter()
            fast.refresh_stale()
            bench.sync()
            refreshed = time.perf_counter() - t
        return fused, refreshed

    bench.results["lora_modules"] = len(a)
    bench.results["lora_first_fuse_s"], bench.results["lora_first_refresh_s"] = switch([("a", a, 1.0)])
    time_generate(
        bench, models, "dev", 2 if bench.args.tiny else 28, True, 1 if bench.args.tiny else 2, "dev_lora_fast"
    )
    fused, refreshed = switch([("b", b, 0.8)])
    bench.results["lora_switch_fuse_s"], bench.results["lora_switch_refresh_s"] = fused, refreshed
    bench.results["lora_switch_total_s"] = fused + refreshed
    bench.results["lora_clear_s"] = sum(switch([]))
    bench.results["lora_backup_GB"] = fuser.backup_bytes / 1e9
    bench.log("lora", {k: v for k, v in bench.results.items() if k.startswith("lora_")})


def allocator_section(bench: Bench, models) -> None:
    """Reserved CUDA memory as a server sees it (issue 29): every size of the aspect-ratio table at both
    megapixels, with LoRA churn between them (none, A, B in turn), twice over, under PyTorch's default caching
    allocator and then with expandable_segments (switched at run time after emptying the cache, so the
    second pass allocates only segments of the new kind). What grows between the passes is what weeks of
    varied requests would grow; reserved minus allocated is the fragmentation."""
    from flux.generate import generate
    from flux.request import build_request
    from flux.sizes import ASPECT_RATIOS, MEGAPIXELS
    from lora.apply import LoraFuser

    if bench.device.type != "cuda":
        bench.results["allocator"] = "not measured: no CUDA device"
        return
    transformer = models.transformers["dev"]
    fuser = LoraFuser(transformer)
    loras = [[], [("a", rank16_lora(transformer, 1), 1.0)], [("b", rank16_lora(transformer, 2), 0.7)]]
    steps = 2  # memory, not speed: two denoising steps reach every buffer a full request allocates
    sizes = [(ratio, mp) for mp in MEGAPIXELS for ratio in ASPECT_RATIOS]

    def one_pass(setting: str) -> dict:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._set_allocator_settings(f"expandable_segments:{setting}")
        reserved = []
        for lap in range(2):
            for index, (ratio, megapixels) in enumerate(sizes):
                fuser.set_loras(loras[(index + lap) % len(loras)])
                request = build_request(
                    prompt=f"{PROMPT} {ratio}",
                    model="dev",
                    num_inference_steps=steps,
                    seed=index,
                    aspect_ratio=ratio,
                    megapixels=megapixels,
                    go_fast=False,
                    output_format="png",
                )
                generate(models, request)
                bench.sync()
                reserved.append(torch.cuda.memory_reserved() / 2**30)
        fuser.set_loras([])
        return {
            "reserved_after_first_lap_GB": round(reserved[len(sizes) - 1], 2),
            "reserved_after_second_lap_GB": round(reserved[-1], 2),
            "peak_reserved_GB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "fragmentation_GB": round(
                (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30, 2
            ),
        }

    results = {"requests_per_pass": 2 * len(sizes), "steps": steps}
    for setting in ("False", "True"):
        results[f"expandable_segments_{setting}"] = one_pass(setting)
        bench.log("allocator", setting, results[f"expandable_segments_{setting}"])
    torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    bench.results["allocator"] = results


# ---- report --------------------------------------------------------------------------------------


def median(value) -> float | None:
    if isinstance(value, dict):
        return value.get("median")
    return value if isinstance(value, (int, float)) else None


def table(results: dict) -> str:
    base = results.get("baseline", {})
    rows = [
        (
            "schnell 4 steps, go_fast=false",
            median(results.get("schnell_std_s")),
            median(base.get("schnell_4step_1024_s")),
            "0.81 s",
        ),
        (
            "schnell 4 steps, go_fast=true",
            median(results.get("schnell_fast_s")),
            median(base.get("schnell_4step_1024_s")),
            "<= 0.40 s",
        ),
        (
            "dev 28 steps, go_fast=false",
            median(results.get("dev_std_s")),
            median(base.get("dev_28step_1024_s")),
            "5.03 s",
        ),
        (
            "dev 28 steps, go_fast=true",
            median(results.get("dev_fast_s")),
            median(base.get("dev_28step_1024_s")),
            "<= 2.2 s",
        ),
        (
            "dev 28, go_fast, rank-16 LoRA",
            median(results.get("dev_lora_fast_s")),
            median(results.get("dev_fast_s")),
            "<= +5 %",
        ),
        (
            "transformer step, eager",
            results.get("step_eager_s"),
            base.get("transformer_step_1024_seq512_s"),
            "floor 0.094",
        ),
        (
            "transformer step, fast",
            results.get("step_fast_s"),
            base.get("transformer_step_1024_seq512_s"),
            "floor 0.047",
        ),
        ("LoRA switch (fuse + fp8 refresh)", results.get("lora_switch_total_s"), None, "<= 1.5 s"),
        ("go_fast setup (fp8 + compile + warm-up)", results.get("go_fast_setup_s"), None, "recorded"),
        *caching_rows(results),
        *train_rows(results),
        *multi_gpu_rows(results),
        *plan_rows(results),
    ]
    lines = [f"{'what':42} {'project s':>10} {'reference s':>12} {'ratio':>7}  target"]
    for name, ours, ref, target in rows:
        ratio = f"{ref / ours:6.2f}x" if ours and ref else "      -"
        ours_s = f"{ours:10.3f}" if ours is not None else f"{'-':>10}"
        ref_s = f"{ref:12.3f}" if ref is not None else f"{'-':>12}"
        lines.append(f"{name:42} {ours_s} {ref_s} {ratio}  {target}")
    guard = results.get("quality_max_rel_error")
    lines.append(
        f"quality guard, max relative error per step: {guard if guard is None else f'{guard:.4f}'} (bar 0.03)"
    )
    lines.append(
        "ratio = reference / project (reference: diffusers baseline of this run; LoRA row: dev go_fast)"
    )
    lines.append(f"torch.compile recompiles: {results.get('recompiles')}; train rows: peak GB ours/baseline")
    if results.get("errors"):
        lines.append("errors: " + "; ".join(f"{k}: {v[:120]}" for k, v in results["errors"].items()))
    if results["skipped"]:
        lines.append("skipped: " + "; ".join(results["skipped"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="toy size on the CPU (smoke test)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument(
        "--budget", type=float, default=540.0, help="seconds for the whole run, baseline included"
    )
    parser.add_argument("--baseline", default=None, help="path of diffusers_baseline.py")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--baseline-share", type=float, default=0.3, help="part of the budget given to the baseline"
    )
    parser.add_argument(
        "--baseline-full", action="store_true", help="let the baseline also time its compiled forward"
    )
    parser.add_argument("--fast-mode", default="auto", choices=("auto", "nocompile"))
    parser.add_argument(
        "--no-dynamic-warmup", action="store_true", help="warm up one shape only (faster setup)"
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training section")
    parser.add_argument("--no-plans", action="store_true", help="skip the memory plan rows")
    parser.add_argument("--plans-only", action="store_true", help="baseline + the memory plan rows")
    parser.add_argument(
        "--train-only", action="store_true", help="baseline + training only (no inference models)"
    )
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    # The attention kernels serving and training choose (cuDNN attention off), so the times are theirs.
    configure_attention_backends()
    bench.results["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()

    log_recompiles()
    # A timeout's SIGTERM: keep what was measured, then stop.
    signal.signal(signal.SIGTERM, lambda *_: (bench.save(), sys.exit(124)))

    if not args.no_baseline and bench.section("baseline", 60):
        bench.attempt("baseline", run_baseline, bench)
    out_file = Path(args.out) / "gpu_speed.json"
    try:
        if args.train_only:
            bench.attempt("training", train_section, bench, None, FULL["transformer"])
            return
        if args.plans_only:
            bench.attempt("memory plans", plans_section, bench, None, FULL["transformer"])
            return
        models = build_models(bench)
        bench.log("built models", f"{bench.results['build_s']:.1f} s")
        bench.attempt("go_fast setup", setup_fast_path, bench, models)
        bench.log(
            "go_fast setup",
            f"{bench.results.get('go_fast_setup_s', -1):.1f} s:",
            bench.results.get("go_fast_reason"),
        )
        repeat = 1 if args.tiny else 3
        plan = [
            ("schnell", 4, False, "schnell_std", 20),
            ("schnell", 4, True, "schnell_fast", 15),
            ("dev", 28, True, "dev_fast", 40),
            ("dev", 28, False, "dev_std", 60),
        ]
        for model, steps, go_fast, tag, need in plan:
            if models.fast is None and go_fast:
                bench.results["skipped"].append(f"{tag} (no go_fast path)")
                continue
            if bench.section(tag, 5 if args.tiny else need):
                steps = 2 if args.tiny else steps  # --tiny: a smoke test of the wiring, not a measurement
                reps = repeat if model == "schnell" else (1 if args.tiny else 2)
                bench.attempt(tag, time_generate, bench, models, model, steps, go_fast, reps, tag)
        if bench.section("quality guard + transformer step", 5 if args.tiny else 30):
            bench.attempt("quality guard + transformer step", quality_and_step, bench, models)
        if models.fast is not None and bench.section("LoRA", 5 if args.tiny else 60):
            bench.attempt("LoRA", lora_section, bench, models)
        if models.fast is not None and bench.section("step cache", 10 if args.tiny else 45):
            bench.attempt("step cache", step_cache_section, bench, models)
        if bench.device.type == "cuda":
            bench.results["gpu_peak_mem_GB"] = torch.cuda.max_memory_allocated() / 2**30
        # after the peak above: this section resets the peak counters
        if bench.section("allocator", 5 if args.tiny else 40):
            bench.attempt("allocator", allocator_section, bench, models)
        if not args.no_train and bench.section("training", 10 if args.tiny else 120):
            bench.attempt("training", train_section, bench, models, FULL["transformer"])
        # Each smaller card's memory plan, emulated by capping this GPU (after training freed the models).
        if not args.no_plans and bench.section("memory plans", 10 if args.tiny else 240):
            bench.attempt("memory plans", plans_section, bench, models, FULL["transformer"])
        # Two fresh processes compiling a shallow full-width transformer; the CPU's check is tests/test_compile_cache.py.
        if bench.device.type == "cuda" and bench.section("compile cache", 100):
            bench.attempt("compile cache", compile_cache_section, bench)
        # One process per GPU where the machine has several (--tiny: two gloo processes on the CPU).
        several = args.tiny or torch.cuda.device_count() > 1
        if several and not args.no_train and bench.section("multi-GPU training", 20 if args.tiny else 150):
            bench.attempt("multi-GPU training", multi_gpu_section, bench, FULL["transformer"])
    finally:
        bench.save()
        print(table(bench.results), flush=True)
        print(f"full results: {out_file}", flush=True)


if __name__ == "__main__":
    main()
