"""The compiled RMSNorm (csrc/layer_cpu.cpp) against Hugging Face's: the same values for
bf16 rows, each row's bits independent of the rows beside it, the residual add rounded
as torch rounds it; and a bf16 engine that uses it answers as Hugging Face's ops do."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import randomized_tiny
from hatrack.server.engine import Engine, SamplingParams, cpu_kernel

kernel = cpu_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the CPU kernels cannot be built here (see the log)")


def _norm(d: int, dtype: torch.dtype, seed: int = 0) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm


def _rows(n: int, d: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("d", [576, 64, 100])  # the default base's width, a small one, one off the 16 lanes
def test_bf16_rows_get_hugging_faces_values(d):
    norm, x = _norm(d, torch.bfloat16), _rows(300, d, 1)
    with torch.no_grad():
        want = norm(x)
    got = kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # the sum of squares runs in the kernel's own order: a last-bit difference in an element
    # is allowed, more is a bug
    differ = (got != want).float().mean().item()
    assert differ < 0.001, f"{differ:.2%} of the elements differ"
    assert torch.allclose(got.float(), want.float(), rtol=1 / 128, atol=0)


def test_a_rows_bits_do_not_depend_on_the_rows_beside_it():
    norm, x = _norm(576, torch.bfloat16), _rows(400, 576, 2)
    together = kernel.rms_norm(x, norm.weight, norm.variance_epsilon)  # split between threads
    for i in (0, 1, 57, 199, 399):
        alone = kernel.rms_norm(x[i : i + 1].contiguous(), norm.weight, norm.variance_epsilon)
        assert torch.equal(alone[0], together[i]), i
    assert torch.equal(kernel.rms_norm(x[:8].contiguous(), norm.weight, 1e-5), together[:8])


def test_the_residual_add_is_rounded_as_torchs_and_then_normalised():
    norm, x, a = _norm(576, torch.bfloat16), _rows(40, 576, 3), _rows(40, 576, 4, 1.0)
    total, normed = kernel.add_rms_norm(x, a, norm.weight, norm.variance_epsilon)
    assert torch.equal(total, x + a)
    assert torch.equal(normed, kernel.rms_norm(x + a, norm.weight, norm.variance_epsilon))


def test_bad_input_is_refused_with_a_message():
    norm = _norm(576, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"contiguous \[n, d\] rows"):
        kernel.rms_norm(_rows(8, 576, 5).t(), norm.weight, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        kernel.rms_norm(_rows(8, 576, 5), norm.weight.float(), 1e-5)
    with pytest.raises(RuntimeError, match="residual must be like x"):
        kernel.add_rms_norm(_rows(8, 576, 5), _rows(4, 576, 6), norm.weight, 1e-5)


def test_a_bf16_engine_uses_it_and_answers_as_with_torchs_norms(tiny_base_dir, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompts = [tok(t)["input_ids"] for t in ("The weather in Paris is", "Once upon a time", "def add(a, b):")]

    def answers(engine: Engine) -> list[list[int]]:
        engine.start()
        try:
            handles = [engine.submit(p, None, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]
            return [h.result(timeout=120)[0] for h in handles]
        finally:
            engine.stop()

    calls = []
    fast = Engine(randomized_tiny(tiny_base_dir).to(torch.bfloat16), tok, max_batch=4)
    assert fast.runner.layer_kernel is not None
    real = fast.runner.layer_kernel
    fast.runner.layer_kernel = type("Counting", (), {
        "rms_norm": lambda self, *a: calls.append("norm") or real.rms_norm(*a),
        "add_rms_norm": lambda self, *a: calls.append("add") or real.add_rms_norm(*a)})()
    got = answers(fast)
    assert "norm" in calls and "add" in calls
    plain = Engine(randomized_tiny(tiny_base_dir).to(torch.bfloat16), tok, max_batch=4)
    plain.runner.layer_kernel = None  # Hugging Face's RMSNorm modules and torch's add
    assert answers(plain) == got
    assert all(len(a) == 12 for a in got)
