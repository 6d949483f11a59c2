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


def _fresh_probes(monkeypatch, tmp_path) -> None:
    from hatrack.server.engine import probe_cache

    monkeypatch.setenv("HATRACK_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(dense_rows, "_probed", {})
    monkeypatch.setattr(dense_rows, "_tiles", {})
    monkeypatch.setattr(probe_cache, "_files", {})


def test_a_product_that_switches_kernels_above_the_decode_batch_runs_a_tile_at_a_time(monkeypatch, tmp_path):
    # like oneDNN's bf16 kernels on an AMX CPU: up to 32 rows one set of bits, more rows
    # another, so a prompt's rows prefilled beside other prompts would answer differently
    _fresh_probes(monkeypatch, tmp_path)
    plain = F.linear

    def switching(x, weight, bias=None):  # each row on its own (no other batch effect), off above 32
        out = torch.cat([plain(x[i:i + 1], weight, bias) for i in range(x.shape[0])])
        return out + 1e-3 if x.shape[0] > 32 else out

    monkeypatch.setattr(F, "linear", switching)
    layer = torch.nn.Linear(40, 24, bias=False)
    rows = torch.randn(100, 40, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([plain(rows[i:i + 1], layer.weight) for i in range(100)])
    assert not torch.equal(layer(rows), alone)  # unwrapped: the 100-row product is off

    dense_rows.pad_rows([layer], 32, max_forward_rows=200)  # a decode batch of 32

    assert layer._row_tile == 32
    with torch.no_grad():
        assert torch.equal(layer(rows), alone)  # 100 rows as 32 + 32 + 32 + 4: each row's own bits
        assert torch.equal(layer(rows[None, :7]), alone[None, :7])  # a batch's shape is kept


def test_a_product_that_keeps_its_bits_at_every_size_is_left_alone(monkeypatch, tmp_path):
    _fresh_probes(monkeypatch, tmp_path)
    plain = F.linear
    monkeypatch.setattr(F, "linear", lambda x, weight, bias=None: torch.cat(
        [plain(x[i:i + 1], weight, bias) for i in range(x.shape[0])]))  # each row on its own
    layer = torch.nn.Linear(40, 24, bias=False)
    forward = layer.forward

    assert dense_rows.pad_rows([layer], 8, max_forward_rows=200) == 1
    assert layer.forward == forward and not hasattr(layer, "_row_tile")


def test_large_sizes_reach_the_largest_forward_in_steps_per_doubling():
    sizes = dense_rows.large_sizes(32, 544, 1)
    assert sizes == sorted(set(sizes)) and sizes[0] > 32 and sizes[-1] >= 544
    assert len([n for n in sizes if n <= 64]) >= 2  # 36-ish, 48-ish, 64: a switch at 33 is seen


def test_bf16_products_on_an_amx_cpu_are_tiled_without_trusting_random_rows(monkeypatch, tmp_path):
    # random rows matched where the real base's prompt rows did not (dense_rows' docstring)
    _fresh_probes(monkeypatch, tmp_path)
    monkeypatch.setattr(dense_rows, "_has_amx", lambda: True)
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    exact = lambda rows: _each_row(rows, weight)  # noqa: E731

    assert dense_rows.row_tile(weight, 32, 200, product=exact, kind="test-amx") == 32
    monkeypatch.setattr(dense_rows, "_has_amx", lambda: False)
    assert dense_rows.row_tile(weight, 32, 200, product=exact, kind="test-amx") == 0  # the probe decides
