"""bf16 projections packed at start (packed_linear.py), for the engine's own product
(csrc/linear_cpu.cpp) or in oneDNN's layout: the engine packs a bf16 base on CPU, and a
packed model answers with the same bits as before packing."""

from __future__ import annotations

import pytest
import torch

from conftest import randomized_tiny
from hatrack.server.engine import Engine, packed_linear

# packing needs oneDNN's bf16 support on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT);
# the fallback where it is missing is tested on every CPU (the last test)
packs_here = pytest.mark.skipif(not packed_linear.bf16_supported(),
                                reason="oneDNN cannot pack bf16 weights on this CPU (AVX2 only)")


def _bf16_model(folder):
    return randomized_tiny(folder).to(torch.bfloat16)


def _projections(model) -> list[torch.nn.Linear]:
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def _packed(module) -> bool:
    kind = packed_linear.packed_kind(module)
    return kind == "dot" or (kind == "packed" and module.weight.is_mkldnn)


dot_here = pytest.mark.skipif(packed_linear.dot_kernel() is None,
                              reason="the engine's bf16 product needs AVX-512 BF16 and the CPU kernels")


@packs_here
def test_a_packed_model_gives_the_same_logits_and_keeps_its_modules(tiny_base_dir):
    model = _bf16_model(tiny_base_dir)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11]])
    with torch.no_grad():
        before = model(ids).logits
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    modules = [*model.model.layers, model.lm_head]
    packed = packed_linear.pack(modules, torch.device("cpu"), torch.bfloat16)
    projections = _projections(model)
    assert packed == len(projections) + 1 > 1
    assert all(type(m) is torch.nn.Linear and _packed(m) for m in [*projections, model.lm_head])
    if tied:  # the LM head got a packed copy; the embedding reads the plain weight
        assert model.model.embed_tokens.weight is not model.lm_head.weight
        assert not model.model.embed_tokens.weight.is_mkldnn
    assert packed_linear.pack(modules, torch.device("cpu"), torch.bfloat16) == 0  # once only
    with torch.no_grad():
        after = model(ids).logits  # Hugging Face's own forward runs the packed products
    assert torch.equal(before, after)


def test_only_a_bf16_base_on_cpu_is_packed(tiny_base_dir):
    model = _bf16_model(tiny_base_dir).float()
    assert packed_linear.pack(model.model.layers, torch.device("cpu"), torch.float32) == 0
    assert not any(m.weight.is_mkldnn for m in _projections(model))


def _answer(model, tok, prompt, **engine_args) -> list[int]:
    from hatrack.server.engine import SamplingParams

    engine = Engine(model, tok, max_batch=4, **engine_args)
    engine.start()
    try:
        return engine.submit(prompt, None, SamplingParams(max_tokens=12, temperature=0.0)).result(timeout=120)[0]
    finally:
        engine.stop()


@packs_here
def test_the_engine_packs_a_bf16_base_and_answers_as_unpacked(tiny_base_dir, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompt = tok("The weather in Paris is")["input_ids"]
    packed_model = _bf16_model(tiny_base_dir)
    got = _answer(packed_model, tok, prompt)
    assert all(_packed(m) for m in [*_projections(packed_model), packed_model.lm_head])
    monkeypatch.setattr(packed_linear, "pack", lambda *a, **k: 0)
    plain_model = _bf16_model(tiny_base_dir)
    want = _answer(plain_model, tok, prompt)
    assert not any(packed_linear.is_packed(m) for m in _projections(plain_model))
    assert got == want


@packs_here
def test_an_engine_with_the_cpu_kernels_off_builds_nothing_and_packs_in_onednns_layout(tiny_base_dir, monkeypatch):
    from transformers import AutoTokenizer

    from hatrack.server.engine import cpu_kernel

    def no_build():
        raise AssertionError("the CPU kernels were asked for with cpu_kernel=False")

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompt = tok("The weather in Paris is")["input_ids"]
    want = _answer(_bf16_model(tiny_base_dir), tok, prompt)
    monkeypatch.setattr(cpu_kernel, "load", no_build)
    model = _bf16_model(tiny_base_dir)
    got = _answer(model, tok, prompt, cpu_kernel=False)
    kinds = {packed_linear.packed_kind(m) for m in [*_projections(model), model.lm_head]}
    assert kinds == {"packed"}
    assert got == want


def test_row_counts_stay_few():
    # oneDNN keeps a kernel (~0.7 MB) for every row count it meets: a server meets few
    counts = {n: packed_linear.padded_rows(n) for n in range(1, 4097)}
    assert all(counts[n] == n for n in range(1, packed_linear.SMALL_ROWS + 1))
    assert all(n <= m < n * 9 / 8 for n, m in counts.items() if n > packed_linear.SMALL_ROWS)
    assert len(set(counts.values())) <= packed_linear.SMALL_ROWS + 8 * 7


@packs_here
def test_padded_products_keep_their_bits():
    linear = torch.nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(160, 96, generator=torch.Generator().manual_seed(4)))
        plain = linear.weight.detach().clone()
        assert packed_linear.pack([linear], torch.device("cpu"), torch.bfloat16) == 1
        x = torch.randn(300, 96, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        for n in (33, 57, 100, 129, 300):  # padded to 36, 64, 112, 144, 320 rows
            assert torch.equal(linear(x[:n]), torch.nn.functional.linear(x[:n], plain)), n


def test_where_the_cpu_cannot_pack_bf16_the_engine_keeps_plain_projections(tiny_base_dir, monkeypatch):
    """On a CPU without oneDNN's bf16 support (an AVX2-only EPYC: "bf16 path needs the cpu
    support avx_ne_convert or avx512bw, avx512vl and avx512dq") a bf16 base still serves,
    unpacked, with the answer of a plain model."""
    from transformers import AutoTokenizer

    def refuse(weight):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    monkeypatch.setattr(packed_linear, "_reorder", refuse)
    monkeypatch.setattr(packed_linear, "_cpu_packs_bf16", None)
    assert not packed_linear.bf16_supported()
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompt = tok("The weather in Paris is")["input_ids"]
    model = _bf16_model(tiny_base_dir)
    got = _answer(model, tok, prompt)
    assert not any(packed_linear.is_packed(m) for m in [*_projections(model), model.lm_head])
    assert len(got) == 12
    assert got == _answer(_bf16_model(tiny_base_dir), tok, prompt)


def _linear(in_dim: int, out_dim: int, seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    linear = torch.nn.Linear(in_dim, out_dim, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return linear, linear.weight.detach().clone()


@dot_here
@pytest.mark.parametrize("in_dim, out_dim", [(576, 1536), (1536, 576), (576, 192)])  # the default base's shapes
def test_the_engines_product_has_f_linears_bits_and_rows_of_their_own(in_dim, out_dim):
    linear, plain = _linear(in_dim, out_dim, seed=in_dim + out_dim)
    assert packed_linear.pack([linear], torch.device("cpu"), torch.bfloat16) == 1
    x = torch.randn(160, in_dim, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.no_grad():
        among = torch.nn.functional.linear(x, plain)  # each row's bits among others
        for n in (1, 2, 5, 8, 13, 32, 57, 160):
            if packed_linear.packed_kind(linear) == "dot":  # rows of their own: F.linear's bits among others
                assert torch.equal(linear(x[:n]), among[:n]), n
            else:  # oneDNN's layout: F.linear's bits at each row count (dense_rows pads where they differ)
                assert torch.equal(linear(x[:n]), torch.nn.functional.linear(x[:n], plain)), n
        if packed_linear.packed_kind(linear) == "dot":
            assert all(torch.equal(linear(x[i:i + 1])[0], among[i]) for i in range(0, 160, 7))
            assert torch.equal(linear(x[3:60].view(3, 19, in_dim)), among[3:60].view(3, 19, out_dim))


@dot_here
def test_a_shape_whose_sums_match_no_block_takes_onednns_layout(monkeypatch):
    """Where no sum block gives the kernel F.linear's bits (another CPU's oneDNN may sum
    otherwise), the projection keeps oneDNN's product, whose bits are F.linear's."""
    real = packed_linear.dot_kernel()

    class OneBitOff:  # the real kernel, with one output a bit away from F.linear's
        dot_available, dot_pack = real.dot_available, real.dot_pack

        @staticmethod
        def dot_linear(x, pairs, block):
            out = real.dot_linear(x, pairs, block)
            out[0, 0] = torch.nextafter(out[0, 0].float(), torch.tensor(float("inf"))).to(out.dtype) * 1.01
            return out

    monkeypatch.setattr(packed_linear, "dot_kernel", lambda: OneBitOff)
    monkeypatch.setattr(packed_linear, "_dot_blocks", {})
    linear, plain = _linear(576, 192, seed=7)
    assert packed_linear.pack([linear], torch.device("cpu"), torch.bfloat16) == 1
    assert packed_linear.packed_kind(linear) == "packed" and linear.weight.is_mkldnn
    assert packed_linear._dot_blocks == {(576, 192): None}
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(x), torch.nn.functional.linear(x, plain))
