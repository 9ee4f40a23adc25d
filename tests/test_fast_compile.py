"""go_fast's blocks compiled for real: fullgraph, backend aot_eager, torch._scaled_mm in the graph.

How many graphs a full setup plus a request of every size makes is counted on the `meta` device: Dynamo
traces and guards exactly as on a GPU (sizes and strides do not depend on the device), and running the
compiled graphs costs nothing there, so every size of the table can be requested (fp8 casts on the CPU
take ~1 s per tiny forward at 1024x1024). A graph more per size or stride would reach Dynamo's recompile
limit on the 57-block FLUX.1, where a block falls back to eager (or, with fullgraph, the request fails).
The values are checked on the CPU, where torch._scaled_mm runs fp8 rowwise products for real.
"""

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

import flux.fast.path as fast_path
from flux.fast.capability import FastSupport
from flux.fast.compiled import block_call, compile_region, dense, raise_recompile_limit
from flux.fast.path import WARMUP_SHAPES, setup_fast, warm_up
from flux.fast.transformer import FastTransformer
from flux.sizes import ASPECT_RATIOS
from flux.variants import VARIANTS
from toys.tiny import build_transformer

# Batch 1 and batch >= 2, for each of the two block classes (double, single): see flux/fast/compiled.py.
EXPECTED_GRAPHS = 4


class CountingBackend:
    """aot_eager, counting the graphs Dynamo keeps and the calls into compiled code.

    Graphs are keyed by compile id (frame / recompile number): Dynamo sometimes restarts one analysis
    and calls the backend again for the same entry, which is not a graph more.
    """

    def __init__(self):
        self.by_id: dict[tuple[int, int], torch.fx.GraphModule] = {}
        self.calls = 0
        self._aot_eager = torch._dynamo.lookup_backend("aot_eager")

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        return list(self.by_id.values())

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        compile_id = torch._guards.CompileContext.current_compile_id()
        self.by_id[(compile_id.frame_id, compile_id.frame_compile_id)] = gm
        compiled = self._aot_eager(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run

    def ops(self) -> set[str]:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes}


@pytest.fixture(scope="module")
def compiled_setup():
    """setup_fast as load_flux runs it (both variants, their text lengths, the warm-up shapes) on tiny
    bf16 transformers on `meta`, with the GPU checks answered as on an H200 and a counting backend."""
    torch._dynamo.reset()  # a graph cached by another test must not hide one compiled here
    backend = CountingBackend()
    with torch.device("meta"):
        transformers = {
            name: build_transformer(guidance_embeds=spec.uses_guidance).to(torch.bfloat16).eval()
            for name, spec in VARIANTS.items()
        }
    lengths = {name: spec.max_sequence_length for name, spec in VARIANTS.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_path, "detect_fast_support", lambda device: FastSupport(True, "test GPU"))
        patch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
        path = setup_fast(
            transformers, torch.device("meta"), lengths, mode="auto", compile_options=dict(backend=backend)
        )
    yield SimpleNamespace(path=path, backend=backend, transformers=transformers, lengths=lengths)
    torch._dynamo.reset()


def requests():
    """(variant, height, width, batch): every aspect ratio at both megapixel settings, each once (a
    compiled forward on meta still costs ~0.3 s of Python), spread over both variants and over batch 1
    and batch >= 2 so that each variant sees both batch graphs at sizes it was not warmed up at."""
    sizes = [(h // d, w // d) for w, h in ASPECT_RATIOS.values() for d in (1, 2)]
    for i, (height, width) in enumerate(sizes):
        yield ("schnell", "dev")[i % 2], height, width, (1, 1, 4, 4)[i % 4]


def test_setup_compiles_fp8_blocks_into_four_graphs_with_the_real_scaled_mm(compiled_setup):
    backend = compiled_setup.backend
    assert set(compiled_setup.path.transformers) == {"dev", "schnell"}
    assert len(backend.graphs) == EXPECTED_GRAPHS
    assert any("_scaled_mm" in op for op in backend.ops())  # the fp8 product, not the bf16 one, is compiled
    # Every block of every warm-up forward ran compiled: 3 blocks x 2 shapes x 2 variants.
    assert backend.calls == 3 * len(WARMUP_SHAPES) * 2


def test_every_size_batch_and_variant_reuses_the_setup_graphs(compiled_setup):
    backend, path = compiled_setup.backend, compiled_setup.path
    graphs, calls, forwards = len(backend.graphs), backend.calls, 0
    seen = set()
    for name, height, width, batch in requests():
        with path.session(name, go_fast=True) as fast:
            assert fast is True
            warm_up(compiled_setup.transformers[name], height, width, batch, compiled_setup.lengths[name])
        forwards += 1
        seen.add((name, batch))
    assert seen == {(n, b) for n in VARIANTS for b in (1, 4)}
    assert len(backend.graphs) == graphs, "a request compiled a new graph"
    assert backend.calls - calls == 3 * forwards  # no block fell back to eager
    with path.session("dev", go_fast=False):
        warm_up(compiled_setup.transformers["dev"], 512, 512, 1, 512)
    assert backend.calls - calls == 3 * forwards  # go_fast=false runs the blocks eagerly


def test_compiled_fp8_blocks_compute_the_eager_fp8_result_on_the_cpu():
    """Dense strides and the compiled region change no value: the same fp8 math, compiled or not, with
    the CPU's real torch._scaled_mm. Only the single blocks are compiled (one graph, to keep the test
    short): at batch 2 the second one gets truly strided slices from the first."""
    backend = CountingBackend()
    transformer = build_transformer(guidance_embeds=False).to(torch.bfloat16).eval()
    fast = FastTransformer(transformer)
    singles = list(transformer.single_transformer_blocks)
    region = compile_region(backend=backend)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 64, 64, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g).to(torch.bfloat16),
        pooled_projections=torch.randn(2, 32, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.3, 0.9], dtype=torch.bfloat16),
        img_ids=torch.randn(64, 3, generator=g).to(torch.bfloat16),
        txt_ids=torch.zeros(7, 3, dtype=torch.bfloat16),
        return_dict=False,
    )
    with torch.inference_mode():
        standard = transformer(**inputs)[0]
        fast.set_fast(True)  # fp8 in every block
        try:
            eager = transformer(**inputs)[0]
            for block in singles:
                block._compiled_call_impl = block_call(region, block)
            compiled = transformer(**inputs)[0]
        finally:
            for block in singles:
                block._compiled_call_impl = None
            fast.set_fast(False)
    assert backend.calls == len(singles) and len(backend.graphs) == 1
    assert any("_scaled_mm" in op for op in backend.ops())
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)
    assert not torch.equal(eager, standard)  # the fp8 path really ran


def test_dense_gives_standard_strides_even_on_size_one_dimensions():
    batch_one = torch.randn(1, 10, 4)[:, 3:]
    assert batch_one.is_contiguous() and batch_one.stride() == (40, 4, 1)  # torch calls it contiguous
    assert dense(batch_one).stride() == (28, 4, 1)
    assert dense(batch_one).data_ptr() == batch_one.data_ptr()  # no copy was needed
    strided = torch.randn(2, 10, 4)[:, 3:]
    out = dense({"x": (strided, None)})
    assert out["x"][0].stride() == (28, 4, 1) and torch.equal(out["x"][0], strided)
    assert out["x"][1] is None


def test_recompile_limit_is_raised_under_either_name(monkeypatch):
    new, old = SimpleNamespace(recompile_limit=8), SimpleNamespace(cache_size_limit=8)
    for config, name in ((new, "recompile_limit"), (old, "cache_size_limit")):
        monkeypatch.setattr(torch._dynamo, "config", config)
        assert raise_recompile_limit(64) == name and getattr(config, name) == 64
        setattr(config, name, 100)
        raise_recompile_limit(64)
        assert getattr(config, name) == 100  # never lowered
