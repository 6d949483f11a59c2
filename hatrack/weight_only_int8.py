"""Weight-only int8 projections (`--quantize int8wo`): a dense base whose decoder
projections keep an int8 weight and one scale per output channel instead of fp32.

Each projection runs torch's own CPU kernel, `aten._weight_int8pack_mm(x, w_int8, scales)`,
which multiplies bf16 activations by the int8 weight and scales each output channel. Its
activations must be bf16 (with fp32 ones the kernel is ~10x slower), so a projection casts
its input to bf16 for the call and its output back to the model's dtype. Scales are
symmetric per output channel: w ~= w_int8 * scale[out], scale = max|w[out, :]| / 127.

Only the plain nn.Linear modules inside the decoder layers (q/k/v/o/gate/up/down) change.
The embeddings and the LM head stay dense: the small bases this serves tie the LM head to
the embedding table (one tensor, also used for lookups, which int8 cannot serve), and the
LM head's error lands straight on the logits that pick each token. The module keeps its
type (nn.Linear, so PEFT still wraps it for `hatrack eval`) with an int8 `weight`
parameter and a `weight_scales` buffer; the dense weight is freed.

The kernel has no backward: such a base serves and evaluates, it does not train.
"""

from __future__ import annotations

import types

import torch

ACTIVATION_DTYPE = torch.bfloat16  # what the kernel is fast at; its scales share the dtype


class WeightOnlyInt8Error(RuntimeError):
    """The model or device cannot run weight-only int8."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], scales [out] in ACTIVATION_DTYPE), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(ACTIVATION_DTYPE)


def is_weight_only(module: torch.nn.Module) -> bool:
    """Whether `module` is a projection converted by this module."""
    return getattr(module, "weight_scales", None) is not None and type(module) is torch.nn.Linear


def convert(model) -> int:
    """Replace, in place, every plain nn.Linear of the decoder layers of a loaded dense
    Hugging Face causal LM with its weight-only int8 form. Returns how many changed."""
    layers = _decoder_layers(model)
    changed = 0
    with torch.no_grad():
        for layer in layers:
            for module in layer.modules():
                if type(module) is not torch.nn.Linear or not module.weight.is_floating_point():
                    continue
                q, scales = quantize_weight(module.weight)
                module.weight = torch.nn.Parameter(q, requires_grad=False)  # the dense weight goes
                module.register_buffer("weight_scales", scales)
                if module.bias is not None:
                    module.bias.requires_grad_(False)
                module.forward = types.MethodType(_forward, module)
                changed += 1
    if not changed:
        raise WeightOnlyInt8Error("int8wo: the model's decoder layers have no nn.Linear projection to convert")
    return changed


def check_device(device: str) -> None:
    """Raise WeightOnlyInt8Error unless the kernel runs on `device` (it is a CPU kernel;
    some torch builds have it on CUDA too)."""
    try:
        x = torch.ones(2, 32, dtype=ACTIVATION_DTYPE, device=device)
        w = torch.ones(8, 32, dtype=torch.int8, device=device)
        s = torch.ones(8, dtype=ACTIVATION_DTYPE, device=device)
        torch.ops.aten._weight_int8pack_mm(x, w, s)
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightOnlyInt8Error(
            f"--quantize int8wo: torch's weight-only int8 kernel does not run on {device} ({first}); "
            "use --device cpu, or --quantize none, nf4 or int8") from None


def _decoder_layers(model) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise WeightOnlyInt8Error(
            f"int8wo: {type(model).__name__} has no model.layers (a Llama-family decoder is expected)")
    return list(layers)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(ACTIVATION_DTYPE).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.weight_scales).to(x.dtype)
    if self.bias is not None:
        out = out + self.bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
