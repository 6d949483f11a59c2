"""A decode step that also prefills newly arrived prompts (LlamaRunner.step): the same
bits as a decode forward and a prefill forward apart, logits and KV cache alike, and in
the engine, prompts arriving while answers run are prefilled in the running answers'
step and every answer equals the same request alone."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import randomized_tiny
from hatrack.server.engine import Engine, SamplingParams, cpu_kernel, load_peft_adapter
from hatrack.server.engine.model import PrefillSegment
from test_engine_batching import adapters, engine_factory, ids, spec, tiny, PROMPTS  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="the CPU kernels cannot be built here")
TIMEOUT = 120


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()  # as the engine's thread runs
def test_step_gives_the_bits_of_decode_and_prefill_apart(tiny_base_dir, adapters, dtype):
    engine = Engine(randomized_tiny(tiny_base_dir).to(dtype), None, max_batch=8)  # not started: its parts
    runner, bank, kv = engine.runner, engine.bank, engine.kv
    bank.write(1, load_peft_adapter(adapters["a"]))
    bank.write(2, load_peft_adapter(adapters["b"]))
    vocab = runner.vocab_size
    # two answers running in rows 0 and 1 (adapter a, the base), a third row mid-prompt
    # (adapter b, a cached first chunk), and two prompts arriving: b in row 2, the base in row 3
    running = [(_prompt(1, 9, vocab), 1), (_prompt(2, 23, vocab), 0)]
    for row, (prompt, slot) in enumerate(running):
        kv.grow(row, len(prompt) + 1)
    runner.prefill([PrefillSegment(row, p, 0, slot) for row, (p, slot) in enumerate(running)], bank)
    arriving = [PrefillSegment(2, _prompt(3, 140, vocab)[128:], 128, 2),
                PrefillSegment(3, _prompt(4, 17, vocab), 0, 0)]
    kv.grow(2, 140)
    kv.grow(3, 17)
    runner.prefill([PrefillSegment(2, _prompt(3, 140, vocab)[:128], 0, 2, logits=False)], bank)
    before = [(k.clone(), v.clone()) for k, v in zip(kv.k, kv.v)]
    tokens, positions, slots = [5, 7], [len(p) for p, _ in running], [s for _, s in running]

    decode_logits = runner.decode(tokens, positions, engine.rows, slots)
    prefill_logits = runner.prefill(arriving, bank)
    apart = [(k.clone(), v.clone()) for k, v in zip(kv.k, kv.v)]
    for (k, v), (k0, v0) in zip(zip(kv.k, kv.v), before):
        k.copy_(k0)
        v.copy_(v0)
    step_decode, step_prefill = runner.step(tokens, positions, slots, arriving, bank)

    assert torch.equal(step_decode, decode_logits) and torch.equal(step_prefill, prefill_logits)
    lengths = [positions[0] + 1, positions[1] + 1, 140, 17]
    for (k, v), (ka, va) in zip(zip(kv.k, kv.v), apart):
        for row, n in enumerate(lengths):
            assert torch.equal(k[row, :, :n], ka[row, :, :n]) and torch.equal(v[row, :, :n], va[row, :, :n])
    # and the arithmetic is the model's: the adapters change the rows they serve
    assert not torch.equal(step_decode[0], runner.decode([5], [positions[0]], engine.rows, [0])[0])


def test_prompts_arriving_while_answers_run_join_their_step_and_answer_as_alone(tiny, adapters, engine_factory):
    _, tok = tiny
    long_params = SamplingParams(max_tokens=80, temperature=0.0)
    short_params = SamplingParams(max_tokens=12, temperature=0.0)
    later = [(ids(tok, PROMPTS[i % 3]), name) for i, name in enumerate(["a", None, "b", "c", "a"])]
    solo = engine_factory()
    solo.start()
    want_long = solo.submit(ids(tok, PROMPTS[0]), spec(adapters["c"]), long_params).result(timeout=TIMEOUT)[0]
    want = [solo.submit(p, name and spec(adapters[name]), short_params).result(timeout=TIMEOUT)[0]
            for p, name in later]
    assert len({tuple(w) for w in want}) >= 4

    engine = engine_factory()
    engine.start()
    long = engine.submit(ids(tok, PROMPTS[0]), spec(adapters["c"]), long_params)
    handles = []
    for prompt, name in later:  # one at a time, each while the long answer runs
        seen = len(long.tokens)
        while len(long.tokens) < seen + 3:
            time.sleep(0.002)
        handles.append(engine.submit(prompt, name and spec(adapters[name]), short_params))
    assert [h.result(timeout=TIMEOUT)[0] for h in handles] == want
    assert long.result(timeout=TIMEOUT)[0] == want_long
    assert engine.stats().fused_steps >= 3  # adapters still loading prefill in forwards of their own


def test_without_the_kernels_prompts_get_forwards_of_their_own(tiny, engine_factory):
    _, tok = tiny
    engine = engine_factory(cpu_kernel=False)
    engine.start()
    long = engine.submit(ids(tok, PROMPTS[0]), None, SamplingParams(max_tokens=60, temperature=0.0))
    while len(long.tokens) < 3:
        time.sleep(0.002)
    short = engine.submit(ids(tok, PROMPTS[1]), None, SamplingParams(max_tokens=4, temperature=0.0))
    assert short.result(timeout=TIMEOUT)[1] == "length" and long.result(timeout=TIMEOUT)[1] == "length"
    assert engine.stats().fused_steps == 0
