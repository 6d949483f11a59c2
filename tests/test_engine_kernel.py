"""The compiled CPU decode kernel against torch's own arithmetic: the same LoRA term,
read in place from the slot bank, for fp32 and bf16 weights, rows that share slots,
rows with no adapter, adapters of a smaller rank than the bank and adapters that skip
modules."""

from __future__ import annotations

import pytest
import torch

from hatrack.server.engine import cpu_kernel
from hatrack.server.engine.lora import LoraWeights
from hatrack.server.engine.slots import GROUPS, KernelRows, RowBank, SlotBank

kernel = cpu_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the CPU kernel cannot be built here (see the log)")


class _Proj:
    def __init__(self, n_in: int, n_out: int) -> None:
        self.in_features, self.out_features = n_in, n_out


class _Layer:
    """Just the projection shapes a SlotBank reads from a decoder layer."""

    def __init__(self) -> None:
        dims = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
                "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 160), "mlp.up_proj": (64, 160),
                "mlp.down_proj": (160, 64)}
        self._mods = {k: _Proj(*v) for k, v in dims.items()}

    def get_submodule(self, name: str) -> _Proj:
        return self._mods[name]


def _adapter(seed: int, rank: int, modules: list[str], layers: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(layers):
        for suffix in modules:
            proj = _Layer().get_submodule(suffix)
            a = torch.randn(rank, proj.in_features, generator=gen) * 0.1
            b = torch.randn(proj.out_features, rank, generator=gen) * 0.1
            mods[f"model.layers.{layer}.{suffix}"] = (a, b)
    return LoraWeights(rank=rank, scaling=2.0, modules=mods)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch_ops(dtype):
    layers = [_Layer(), _Layer()]
    bank = SlotBank(layers, n_slots=3, max_rank=32, dtype=dtype, device=torch.device("cpu"))
    every = [s for _, suffixes in GROUPS for s in suffixes]
    bank.write(1, _adapter(1, 16, every, 2))
    bank.write(2, _adapter(2, 8, ["self_attn.q_proj", "self_attn.v_proj"], 2))  # smaller rank, two modules
    bank.write(3, _adapter(3, 24, every, 2))  # grows the bank's rank to 24
    row_slots = [1, 0, 2, 3, 1, 3, 0, 2, 1]
    n = len(row_slots)
    reference, fast = RowBank(bank, max_rows=16), KernelRows(bank, kernel)
    assert reference.prepare(row_slots) and fast.prepare(row_slots)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        for group, suffixes in GROUPS:
            n_in = bank.in_dim[group]
            x = torch.randn(n, n_in, generator=gen).to(dtype)
            base = [torch.randn(n, bank.out_dim[s], generator=gen).to(dtype) for s in suffixes]
            want = [t.clone() for t in base]
            got = [t.clone() for t in base]
            reference.apply(n, layer, group, x, tuple(want))
            fast.apply(n, layer, group, x, tuple(got))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for w, g, b in zip(want, got, base):
                assert torch.allclose(g.float(), w.float(), atol=tol, rtol=tol), (layer, group)
                # rows without an adapter are untouched, bit for bit
                assert torch.equal(g[[1, 6]], b[[1, 6]])
            if group == "qkv":  # slot 2 has q and v: its k rows are untouched too
                assert torch.equal(got[1][[2, 7]], base[1][[2, 7]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [g for g, _ in GROUPS])
def test_a_row_gets_the_same_bits_in_any_batch(group, dtype):
    """The kernel computes rows in tiles (a run of rows on one adapter shares each weight
    load; rows on their own adapters run side by side): a row's term is the same in any
    tile, bit for bit."""
    layers = [_Layer()]
    bank = SlotBank(layers, n_slots=3, max_rank=16, dtype=dtype, device=torch.device("cpu"))
    every = [s for _, suffixes in GROUPS for s in suffixes]
    for slot in (1, 2, 3):
        bank.write(slot, _adapter(4 + slot, 16, every, 1))
    n_in = bank.in_dim[group]
    outs = [bank.out_dim[s] for s in dict(GROUPS)[group]]
    gen = torch.Generator().manual_seed(7)
    x_row = torch.randn(1, n_in, generator=gen).to(dtype)
    y_row = [torch.randn(1, o, generator=gen).to(dtype) for o in outs]

    def term(row_slots: list[int], crowd: torch.Tensor) -> list[torch.Tensor]:
        rows = KernelRows(bank, kernel)
        rows.prepare(row_slots)
        x = torch.cat([x_row, crowd]).contiguous()
        ys = tuple(torch.cat([y, torch.zeros(len(crowd), y.shape[1], dtype=dtype)]) for y in y_row)
        rows.apply(len(row_slots), 0, group, x, ys)
        return [y[0] for y in ys]

    alone = term([1], torch.zeros(0, n_in, dtype=dtype))
    # rows beside row 0: of its slot (runs shorter and longer than a tile), of other
    # slots, of none, and mixtures that put row 0 in a shared run or among distinct ones
    for others in ([2, 2, 1], [0, 1], [2] * 15, [1, 1, 1], [1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 1, 1], [1] * 12,
                   [2, 3, 2, 3, 2, 3, 0, 2], [3, 2, 0, 1, 3, 3, 3, 3, 2, 1, 1], [2, 3] * 9 + [1] * 9):
        crowd = torch.randn(len(others), n_in, generator=gen).to(dtype)
        got = term([1, *others], crowd)
        assert all(torch.equal(g, a) for g, a in zip(got, alone)), others
