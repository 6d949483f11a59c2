"""The slot bank's swap-in: an adapter staged on the host (pinned on CUDA) lands in its
slot as A^T and scaling * B^T, at its module's place in the group, across a growth of
the bank's rank, on the tests' device."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE
from hatrack.server.engine.lora import LoraWeights
from hatrack.server.engine.slots import SUFFIXES, SlotBank, StagedAdapter


@pytest.fixture(scope="module")
def layers(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).model.layers


def _adapter(layers, seed: int, rank: int, suffixes: list[str]) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i, layer in enumerate(layers):
        for suffix in suffixes:
            proj = layer.get_submodule(suffix)
            modules[f"model.layers.{i}.{suffix}"] = (torch.randn(rank, proj.in_features, generator=gen),
                                                     torch.randn(proj.out_features, rank, generator=gen))
    return LoraWeights(rank=rank, scaling=0.5, modules=modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_adapter_lands_in_its_slot_across_a_rank_growth(layers, dtype):
    bank = SlotBank(layers, n_slots=2, max_rank=32, dtype=dtype, device=torch.device(TEST_DEVICE))
    small = _adapter(layers, 1, 4, ["self_attn.k_proj", "mlp.up_proj"])  # second module of each group
    staged = bank.stage(small)
    assert isinstance(staged, StagedAdapter) and staged.groups == {"qkv", "gate_up"}
    assert staged.buffer.is_pinned() == (bank.device.type == "cuda")
    bank.write(1, staged)
    bank.write(2, _adapter(layers, 2, 12, ["self_attn.q_proj"]))  # unstaged; grows the rank to 16
    assert bank.rank == 16 and bank.slot_groups[1] == {"qkv", "gate_up"} and bank.slot_groups[2] == {"qkv"}
    rank = bank.rank
    for module, (a, b) in small.modules.items():
        layer, suffix = int(module.split(".")[2]), module.split(".", 3)[3]
        group = "qkv" if suffix.startswith("self_attn") else "gate_up"
        j = SUFFIXES[group].index(suffix)
        got_a = bank.A[group][layer, 1, :, j * rank : j * rank + 4].cpu()
        got_b = bank.B[suffix][layer, 1, :4].cpu()
        assert torch.equal(got_a, a.t().to(dtype)), module
        assert torch.equal(got_b, (b.t() * small.scaling).to(dtype)), module
        assert not bank.A[group][layer, 1, :, :j * rank].any()  # the group's other module stays zero
        assert not bank.B[suffix][layer, 1, 4:].any()  # past the adapter's own rank
