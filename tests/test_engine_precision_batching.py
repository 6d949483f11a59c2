"""At every `--quantize` setting the server can load (none in fp32 and in bf16, int8 and
nf4 at either compute dtype, int8wo), through the loading path it uses (basemodel.load_base), a
greedy answer in a mixed batch of adapters and base rows equals the same request answered
alone, with the CPU kernel and with torch ops. Tiny random model; bf16 is loaded
explicitly (what `none`/`auto` give on CPUs with AVX-512 BF16 and on CUDA)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import randomized_tiny, write_peft_adapter
from hatrack import basemodel
from hatrack.server.engine import AdapterSpec, Engine, SamplingParams, load_peft_adapter
from hatrack.server.engine.int8_rows import make_rows_independent
from hatrack.server.engine.model import _DecodeWindow

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = ["The weather in Paris is", "def fibonacci(n):", "Dear customer, thank you for", "Once upon a time"]
# (load_base quantize, dtype) per label
# (compute dtype: fp32 on CPUs without fast bf16, bf16 on those with it and on CUDA)
MODES = {"fp32": ("none", torch.float32), "bf16": ("none", torch.bfloat16),
         "int8": ("int8", torch.float32), "int8-bf16": ("int8", torch.bfloat16),
         "nf4": ("nf4", torch.float32), "nf4-bf16": ("nf4", torch.bfloat16),
         "int8wo": ("int8wo", torch.float32)}  # weight-only int8 always runs fp32 between projections


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir, tmp_path_factory) -> Path:
    """The tiny model saved with large random weights (greedy answers vary per token and
    per adapter) and norm weights of 3, so that activations reach LLM.int8's outlier
    threshold (6) in a few columns of each row, different columns in different rows."""
    from transformers import AutoTokenizer

    model = randomized_tiny(tiny_base_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(3.0)
    folder = tmp_path_factory.mktemp("base") / "tiny-outliers"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory) -> list[AdapterSpec]:
    root = tmp_path_factory.mktemp("adapters")
    folders = [
        write_peft_adapter(tiny_base_dir, root / "a", rank=8, seed=1, scale=0.15),
        write_peft_adapter(tiny_base_dir, root / "b", rank=4, seed=2, scale=0.2, targets=["q_proj", "v_proj"]),
        write_peft_adapter(tiny_base_dir, root / "c", rank=16, alpha=8, seed=3, scale=0.15),
    ]
    return [AdapterSpec(f.name, (lambda f=f: load_peft_adapter(f))) for f in folders]


@pytest.fixture(scope="module")
def loaded(base_dir):
    """label -> (model, tokenizer), each loaded once per module."""
    models: dict[str, tuple] = {}

    def get(label: str):
        if label not in models:
            quantize, dtype = MODES[label]
            models[label] = basemodel.load_base(base_dir, quantize=quantize, device="cpu", dtype=dtype)
        return models[label]

    return get


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "torch-ops"])
@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_equals_each_alone_at_every_precision(loaded, adapters, mode, cpu_kernel):
    model, tok = loaded(mode)
    assert model.dtype == MODES[mode][1]
    a, b, c = adapters
    choice = [a, None, b, c, a, None, b, None, c, a]
    jobs = [(tok(PROMPTS[i % len(PROMPTS)])["input_ids"], adapter) for i, adapter in enumerate(choice)]

    solo = Engine(model, tok, max_loaded=3, cpu_kernel=cpu_kernel)
    solo.start()
    try:
        want = [solo.submit(p, adapter, GREEDY).result(timeout=120)[0] for p, adapter in jobs]
    finally:
        solo.stop(timeout=5)
    assert len({tuple(w) for w in want}) >= 6  # prompts and adapters give different answers

    batch = Engine(model, tok, max_loaded=3, cpu_kernel=cpu_kernel)
    for adapter in adapters:  # adapters into their slots first, so all rows share every step
        batch.submit(jobs[0][0], adapter, SamplingParams(max_tokens=1, temperature=0))
    handles = [batch.submit(p, adapter, GREEDY) for p, adapter in jobs]
    batch.start()
    try:
        got = [h.result(timeout=120)[0] for h in handles]
    finally:
        batch.stop(timeout=5)
    assert [i for i in range(len(jobs)) if got[i] != want[i]] == []
    assert batch.stats().steps < 2 * GREEDY.max_tokens  # one shared batch, not one request at a time


def test_int8_projection_row_ignores_its_neighbours_outliers(loaded):
    """A row of an int8 projection gives the same bits alone as beside a row with an
    outlier in another column (bitsandbytes alone moves that column out of int8 for
    every row of the batch)."""
    model, _ = loaded("int8")
    proj = model.model.layers[0].mlp.up_proj
    make_rows_independent([proj])  # what the engine does to every layer of an int8 base
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, proj.in_features, generator=gen)
    x[1, 7] = 9.0  # an outlier in row 1 only
    x[2, 20] = -7.5  # and another in row 2
    with torch.no_grad():
        batch = proj(x)
        for row in range(3):
            assert torch.equal(proj(x[row : row + 1])[0], batch[row]), row


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8wo"])
def test_dense_projection_row_ignores_the_batch_size(loaded, mode):
    """After the engine prepared the base, a row of a dense projection (a layer's and the
    LM head) gives the same bits alone as in a product of any number of rows (a BLAS picks
    its kernel by the row count; with MKL on AVX2, 1-3 rows differ from 4 or more). With
    int8wo the layer's projection is torch's weight-only int8 kernel."""
    model, tok = loaded(mode)
    Engine(model, tok, max_batch=12)  # prepares the projections; never started
    gen = torch.Generator().manual_seed(6)
    for proj in (model.model.layers[1].self_attn.q_proj, model.lm_head):
        x = torch.randn(12, proj.in_features, generator=gen).to(MODES[mode][1])
        with torch.no_grad():
            alone = [proj(x[row : row + 1])[0] for row in range(12)]
            for m in range(2, 13):
                batch = proj(x[:m])
                assert all(torch.equal(batch[row], alone[row]) for row in range(m)), m


@pytest.mark.parametrize("path", ["kernel", "torch-ops"])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_decode_attention_row_ignores_batch_and_threads(loaded, mode, path):
    """A row's decode attention gives the same bits alone (its own window, cache row 0) as
    in a batch with a longer window, on two threads, with the compiled kernel and with
    torch ops (torch's fused fp32 CPU kernel did not)."""
    model, tok = loaded(mode)
    runner = Engine(model, tok, max_batch=6, cpu_kernel=path == "kernel").runner  # never started
    if path == "kernel" and runner.attention_kernel is None:
        pytest.skip("the CPU kernel cannot be built here (see the log)")
    dtype, n, window = MODES[mode][1], 6, 192
    kv_heads, rep, dim = 3, 3, 64  # the default base's heads (the tiny model's hide it)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(n, kv_heads, rep, dim, generator=gen).to(dtype)
    k, v = (torch.randn(n, kv_heads, window, dim, generator=gen).to(dtype) for _ in range(2))
    pos = torch.tensor([3, 70, 150, 9, 63, 191])
    cols = torch.arange(window)

    def attend(rows: slice, length: int) -> torch.Tensor:
        # layer 0 of a cache that holds just these rows, the first of them in cache row 0
        runner.kv = SimpleNamespace(k=[k[rows, :, :length]], v=[v[rows, :, :length]])
        p = pos[rows]
        mask = (cols[None, :length] <= p[:, None]).view(len(p), 1, 1, length)
        return runner._attend(q[rows], 0, _DecodeWindow(len(p), p + 1, length, mask))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = attend(slice(0, n), window)
        for row in range(n):
            own = -(-(int(pos[row]) + 1) // 64) * 64
            alone = attend(slice(row, row + 1), own)
            assert torch.equal(alone[0], batch[row]), row
    finally:
        torch.set_num_threads(threads)
