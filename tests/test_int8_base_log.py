"""An int8 base in bf16 runs without bitsandbytes logging its fp16 cast warning on every
matmul (a line per projection per step would bury a server's log), while its other
warnings still reach the log."""

from __future__ import annotations

import logging

import torch

from conftest import TEST_DEVICE


def test_int8_forward_logs_no_cast_warning_per_matmul(tiny_base_dir, caplog):
    from hatrack import basemodel

    caplog.set_level(logging.WARNING, logger="bitsandbytes")
    model, _ = basemodel.load_base(tiny_base_dir, "int8", TEST_DEVICE, torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            model(torch.tensor([[1, 2, 3]], device=model.device))
    cast = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert cast == []
    other = logging.getLogger("bitsandbytes.autograd._functions")
    other.warning("a different bitsandbytes warning")
    assert any(r.getMessage() == "a different bitsandbytes warning" for r in caplog.records)
