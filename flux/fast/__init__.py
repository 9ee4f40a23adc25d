"""go_fast: fp8 rowwise matmuls and regionally compiled blocks for the transformer, beside the bf16 path.

    capability.py   can this device run the fast path? (CUDA, compute capability >= 8.9, torch._scaled_mm)
    fp8.py          rowwise fp8 quantization, the _scaled_mm product and its CPU emulation, Fp8Linear
    transformer.py  FastTransformer: installs Fp8Linear in the blocks, refreshes after LoRA changes, compiles
    path.py         FastPath: per-model setup at load time and the per-request switch used by generate()
    compile_cache.py  torch.compile's artifacts saved after the first setup, loaded by the next (no compile)
    step_cache.py   opt-in step caching with cache-dit (the step_cache input), switched on per request

The bf16 weights stay the master copy: go_fast=false runs exactly the eager bf16 path, go_fast=true runs
fp8 copies quantized from those same weights (refreshed when a LoRA changes them).
"""
