"""`--quantize int8wo`: a base whose decoder projections hold int8 weights with one bf16
scale per output channel (torch's weight-only int8 kernel). Its logits stay close to the
dense base's, with and without a LoRA adapter on top (what `hatrack eval --quantize int8wo`
scores), and the dense projection weights are gone. Tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_peft_adapter
from hatrack import basemodel, weight_only_int8

PROMPTS = ["The weather in Paris is", "def fibonacci(n):", "Dear customer, thank you for"]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Relative L2 error of the logits: measured 0.008 with per-output-channel scales, 0.28
# with the scales applied to the wrong channels (reversed).
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def models(tiny_base_dir: Path):
    dense, tok = basemodel.load_base(tiny_base_dir, quantize="none", device="cpu", dtype=torch.float32)
    int8wo, _ = basemodel.load_base(tiny_base_dir, quantize="int8wo", device="cpu")
    return dense, int8wo, tok


def relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).norm() / want.norm())


def logits(model, tok) -> torch.Tensor:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_logits_stay_close_to_the_dense_base(models):
    dense, int8wo, tok = models
    err = relative_error(logits(dense, tok), logits(int8wo, tok))
    assert 0 < err < TOLERANCE  # 0 would mean nothing was quantized


def test_projections_are_int8_and_the_lm_head_and_embeddings_stay_dense(models):
    dense, int8wo, _ = models
    for layer in int8wo.model.layers:
        for name in PROJECTIONS:
            proj = layer.get_submodule(name)
            assert proj.weight.dtype == torch.int8 and not proj.weight.requires_grad
            assert proj.weight_scales.shape == (proj.out_features,)
    assert int8wo.lm_head.weight.dtype == int8wo.model.embed_tokens.weight.dtype == torch.float32
    assert int8wo.dtype == torch.float32  # activations between projections stay fp32

    def layer_bytes(model) -> int:
        return sum(t.numel() * t.element_size() for layer in model.model.layers
                   for t in [*layer.parameters(), *layer.buffers()])

    assert layer_bytes(int8wo) < 0.3 * layer_bytes(dense)  # int8 + scales instead of fp32


def test_wrong_scales_would_fail_the_tolerance(models, tiny_base_dir):
    """The tolerance above is tight enough to catch scales applied to the wrong channels."""
    _, _, tok = models
    broken, _ = basemodel.load_base(tiny_base_dir, quantize="int8wo", device="cpu")
    for proj in broken.modules():
        if weight_only_int8.is_weight_only(proj):
            proj.weight_scales = proj.weight_scales.flip(0)
    dense = models[0]
    assert relative_error(logits(dense, tok), logits(broken, tok)) > 3 * TOLERANCE


def test_a_lora_adapter_applies_on_top_of_the_int8_projections(models, tiny_base_dir, tmp_path):
    """What `hatrack eval --quantize int8wo` runs: PEFT wraps the converted projections."""
    from peft import PeftModel

    dense, int8wo, tok = models
    folder = write_peft_adapter(tiny_base_dir, tmp_path / "a", rank=8, seed=3, scale=0.3)
    base_logits = logits(int8wo, tok)
    with_dense = PeftModel.from_pretrained(dense, str(folder)).eval()
    with_int8 = PeftModel.from_pretrained(int8wo, str(folder)).eval()
    try:
        want, got = logits(with_dense, tok), logits(with_int8, tok)
        assert relative_error(want, got) < TOLERANCE
        assert relative_error(base_logits, got) > 3 * TOLERANCE  # the adapter did change the answer
    finally:
        with_dense.unload()
        with_int8.unload()
