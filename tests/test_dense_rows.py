"""The start-up probe that picks how many rows a dense projection is padded to: it must
catch a kernel whose rows disagree only now and then, not only on the first rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hatrack.server.engine import dense_rows


def _each_row(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's product on its own: no batch effect (a BLAS's own may have one)."""
    return torch.stack([F.linear(r, weight) for r in rows])


def test_probe_catches_a_one_row_product_that_differs_for_a_few_rows_only():
    # like oneDNN's bf16 kernels on an AVX-512 BF16 CPU (about 1 row in 30 of a 1-row
    # product differs from the same row among others): here a 1-row product of a row
    # whose first value exceeds 1.5 (about 7% of random rows, not the probe's first) is off
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))

    def flaky(rows: torch.Tensor) -> torch.Tensor:
        out = _each_row(rows, weight)
        if rows.shape[0] == 1 and rows[0, 0] > 1.5:
            out = out + 1e-3
        return out

    gen = torch.Generator().manual_seed(0)
    first = torch.randn(1, 40, generator=gen)
    assert not first[0, 0] > 1.5  # the first probe row alone would not show it
    assert dense_rows.row_quantum(weight, 32, product=flaky, kind="test-flaky") == 2


def test_probe_finds_no_padding_needed_for_a_row_independent_product():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))

    assert dense_rows.row_quantum(weight, 32, product=lambda rows: _each_row(rows, weight), kind="test-exact") == 1


def test_probe_pads_to_what_leaves_fewest_rows_off_when_nothing_is_exact(caplog):
    # every size below the largest is off for a few rows (first value above 2), and sizes
    # that are not a multiple of 4 for every row: no padding is exact; 16 leaves fewest off
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))

    def messy(rows: torch.Tensor) -> torch.Tensor:
        out = _each_row(rows, weight)
        m = rows.shape[0]
        if m % 4:
            out = out + 1e-3
        elif m < 32:
            out = out + 1e-3 * (rows[:, :1] > 2.0)
        return out

    with caplog.at_level("WARNING", logger="hatrack.engine"):
        assert dense_rows.row_quantum(weight, 32, product=messy, kind="test-messy") == 16
    assert "no row padding makes 40 x 24 test-messy" in caplog.text and "padding to 16" in caplog.text


def test_a_probe_result_is_kept_on_disk_and_a_restart_skips_the_probe(tmp_path, monkeypatch):
    from hatrack.server.engine import probe_cache

    monkeypatch.setenv("HATRACK_KERNEL_CACHE", str(tmp_path))
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    calls: list[int] = []

    def counted(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        out = _each_row(rows, weight)
        return out + 1e-3 if rows.shape[0] % 2 else out  # odd sizes are off: padding to 2

    def restart() -> None:  # a new process: nothing remembered in memory
        monkeypatch.setattr(dense_rows, "_probed", {})
        monkeypatch.setattr(probe_cache, "_files", {})
        calls.clear()

    assert dense_rows.row_quantum(weight, 32, product=counted, kind="test-kept", on_disk=True) == 2
    assert calls  # probed
    [kept] = tmp_path.glob("row-probes-*.json")
    restart()
    assert dense_rows.row_quantum(weight, 32, product=counted, kind="test-kept", on_disk=True) == 2
    assert calls == []  # read back, not probed
    kept.write_text("{damaged")
    restart()
    assert dense_rows.row_quantum(weight, 32, product=counted, kind="test-kept", on_disk=True) == 2
    assert calls  # a damaged file is probed again, and rewritten
    restart()
    assert dense_rows.row_quantum(weight, 32, product=counted, kind="test-kept", on_disk=True) == 2
    assert calls == []
