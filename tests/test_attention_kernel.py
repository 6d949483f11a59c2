"""The compiled CPU decode attention (csrc/attention_cpu.cpp): each row attends to its own
positions of the KV cache, matches exact attention, and gives a row the same bits whatever
shares its call (other rows, other lengths, another cache row, one thread or two)."""

from __future__ import annotations

import pytest
import torch

from hatrack.server.engine import cpu_kernel

kernel = cpu_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the CPU kernel cannot be built here (see the log)")

KV, REP, D, CAP = 3, 3, 64, 320
SCALE = D**-0.5


# head sizes: a multiple of 16 takes the vector path, another the plain loops
HEAD_SIZES = [D, 40]


def _inputs(n: int, dtype: torch.dtype, seed: int = 0, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    # the cache holds more rows and positions than the batch uses, as the engine's does
    k = torch.randn(n + 2, KV, CAP, d, generator=gen).to(dtype)
    v = torch.randn(n + 2, KV, CAP, d, generator=gen).to(dtype)
    q = (torch.randn(n, KV, REP, d, generator=gen) * 2).to(dtype)
    return q, k, v


def _attend(q, k, v, lengths, min_work: int = 1 << 18) -> torch.Tensor:
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    kernel.attend_decode(q.contiguous(), k, v, torch.tensor(lengths, dtype=torch.int64), out, scale, min_work)
    return out


def _exact(q, k, v, lengths) -> torch.Tensor:
    rows = []
    for i, n in enumerate(lengths):
        scores = q[i].double() @ k[i, :, :n].double().transpose(-1, -2) * q.shape[-1] ** -0.5
        rows.append(torch.softmax(scores, dim=-1) @ v[i, :, :n].double())
    return torch.stack(rows)


@pytest.mark.parametrize("d", HEAD_SIZES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_matches_exact_attention_over_each_rows_own_positions(dtype, tolerance, d):
    lengths = [1, 2, 17, 64, 65, 200, CAP]
    q, k, v = _inputs(len(lengths), dtype, d=d)
    out = _attend(q, k, v, lengths)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.allclose(out.double(), _exact(q, k, v, lengths), atol=tolerance, rtol=tolerance)
    # what lies past a row's length (another request's old keys) is never read
    k2, v2 = k.clone(), v.clone()
    for i, n in enumerate(lengths):
        k2[i, :, n:] = float("nan")
        v2[i, :, n:] = float("inf")
    assert torch.equal(_attend(q, k2, v2, lengths), out)


@pytest.mark.parametrize("d", HEAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_its_company(dtype, d):
    lengths = [5, 90, 33, 250, 128, 7, 300, 64]
    q, k, v = _inputs(len(lengths), dtype, seed=1, d=d)
    together = _attend(q, k, v, lengths)
    one_thread = _attend(q, k, v, lengths, min_work=1 << 40)
    per_pair = _attend(q, k, v, lengths, min_work=1)  # every (row, head) may go to another thread
    assert torch.equal(together, one_thread) and torch.equal(together, per_pair)
    for i, n in enumerate(lengths):
        # alone, in cache row 0 of a fresh cache that is longer than the row needs
        k1 = torch.zeros(1, KV, CAP + 64, d, dtype=dtype)
        v1 = torch.zeros_like(k1)
        k1[0, :, :n], v1[0, :, :n] = k[i, :, :n], v[i, :, :n]
        alone = _attend(q[i : i + 1], k1, v1, [n])
        assert torch.equal(alone[0], together[i]), f"row {i} (length {n}) changed bits alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_new_key_and_value_are_written_to_each_rows_last_position_first(dtype):
    lengths = [1, 40, 129]
    q, k, v = _inputs(len(lengths), dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    k_new, v_new = (torch.randn(len(lengths), KV, D, generator=gen).to(dtype) for _ in range(2))
    written_k, written_v = k.clone(), v.clone()
    for i, n in enumerate(lengths):
        written_k[i, :, n - 1], written_v[i, :, n - 1] = k_new[i], v_new[i]
    want = _attend(q, written_k, written_v, lengths)
    out = torch.empty_like(q)
    kernel.attend_decode(q, k, v, torch.tensor(lengths), out, SCALE, 1 << 18, k_new=k_new, v_new=v_new)
    assert torch.equal(out, want)
    assert torch.equal(k, written_k) and torch.equal(v, written_v)  # and nothing else moved


def test_bad_input_is_refused_with_what_was_expected():
    q, k, v = _inputs(2, torch.float32)
    with pytest.raises(RuntimeError, match="outside its cache"):
        _attend(q, k, v, [1, CAP + 1])
    with pytest.raises(RuntimeError, match="one dtype"):
        _attend(q, k.bfloat16(), v, [1, 1])
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        kernel.attend_decode(q, k, v, torch.tensor([1, 1], dtype=torch.int32), torch.empty_like(q), SCALE, 1)
