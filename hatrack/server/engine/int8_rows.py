"""bitsandbytes int8 projections (LLM.int8) whose rows are each computed on their own.

LLM.int8 splits a projection in two: the input columns holding an outlier (|x| >= the
threshold, 6 by default) run in floating point, the rest in int8. bitsandbytes picks
those columns over the whole batch: where any row has an outlier, that column leaves the
int8 part for every row. A row's result then depends on the rows beside it, and greedy
answers of a mixed batch differed from the same requests answered alone.

Here each row's outliers are its own: its int8 part is quantized with only its own
outliers zeroed (per-row scales, as bitsandbytes does), and the outlier part is added one
column at a time, in ascending column order, with an exact zero for a row that has no
outlier in that column. Every operation is then elementwise or per row, so a row's bits
do not depend on its neighbours (the int8 matmul itself is exact integer arithmetic).
"""

from __future__ import annotations

import types

import torch


def make_rows_independent(modules) -> int:
    """Give every bitsandbytes Linear8bitLt with outlier decomposition among `modules`
    (an iterable of nn.Modules, searched recursively) the per-row forward. Returns how
    many were changed; 0 where bitsandbytes is absent or the model is not int8."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    changed = 0
    for root in modules:
        for module in root.modules():
            if isinstance(module, Linear8bitLt) and module.state.threshold > 0 and not module.state.has_fp16_weights:
                module.forward = types.MethodType(_forward, module)
                changed += 1
    return changed


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    from bitsandbytes import functional as bnbf

    state = self.state
    if self.weight.CB is not None:  # the first call moves the quantized weight into the state
        self.init_8bit_state()
    CB, SCB = state.CB, state.SCB
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    a16 = a.to(torch.float16)  # what bitsandbytes quantizes
    outliers = a16.abs() >= state.threshold
    has_outliers = bool(outliers.any())
    CA, SCA, _ = bnbf.int8_vectorwise_quant(a16.masked_fill(outliers, 0) if has_outliers else a16)
    bias = self.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    out = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=x.dtype)
    if has_outliers:
        cols = outliers.any(dim=0).nonzero().flatten()  # ascending
        w = bnbf.int8_vectorwise_dequant(CB[:, cols].contiguous(), SCB).float()  # [out, k]
        vals = a.float().masked_fill(~outliers, 0)[:, cols]  # [rows, k]: each row's own outliers only
        acc = out.float()
        for j in range(cols.numel()):
            acc += vals[:, j : j + 1] * w[:, j]  # a multiply, then an add: no fused rounding
        out = acc.to(x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])
