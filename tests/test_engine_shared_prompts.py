"""Requests with the same prompt and adapter share one prefill (shared_prompts.py), on
the tiny model (fp32): the prompt is computed once, each request answers as it would
alone with its own sampling, and a prompt is never shared across adapters or with the
base."""

from __future__ import annotations

import time

from hatrack.server.engine import SamplingParams
from test_engine_batching import adapters, engine_factory, spec, tiny  # noqa: F401 (fixtures)
from test_engine_prefill import TIMEOUT, ForwardLog, answer, start_when_loaded, tokens, vocab  # noqa: F401

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
SHORT = SamplingParams(max_tokens=4, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, seed=7)


def test_identical_prompts_queued_together_are_prefilled_once_and_answer_as_alone(
        tiny, adapters, engine_factory, vocab):
    p, q = tokens(1, 40, vocab), tokens(2, 40, vocab)
    a, b = spec(adapters["a"]), spec(adapters["b"])
    jobs = [(p, a, GREEDY), (p, a, SHORT), (q, a, GREEDY), (p, a, SAMPLED), (p, b, GREEDY), (p, None, GREEDY),
            (p, None, SAMPLED)]
    solo = engine_factory()
    solo.start()
    want = [answer(solo, prompt, adapter, params) for prompt, adapter, params in jobs]
    # the adapters and the base answer the same prompt differently, so a shared prefill would show
    assert len({tuple(want[i]) for i in (0, 4, 5)}) == 3

    engine = engine_factory()
    log = ForwardLog(engine)
    handles = [engine.submit(prompt, adapter, params) for prompt, adapter, params in jobs]
    start_when_loaded(engine, {"a", "b"})
    assert [h.result(timeout=TIMEOUT)[0] for h in handles] == want
    # p for a, q for a, p for b, p for the base: each computed once, in cache rows 0, 2, 4, 5
    assert sorted(row for call in log.calls for row, _, _ in call) == [0, 2, 4, 5]
    assert engine.stats().prefill_tokens == 4 * 40
    assert engine.stats().shared_prompts == 3


def test_a_prompt_arriving_while_the_same_prompt_answers_copies_its_prefill(
        tiny, adapters, engine_factory, vocab):
    p, q = tokens(3, 30, vocab), tokens(4, 12, vocab)
    a = spec(adapters["a"])
    long = SamplingParams(max_tokens=60, temperature=0.0)
    solo = engine_factory()
    solo.start()
    want = {name: answer(solo, prompt, adapter, params) for name, prompt, adapter, params in (
        ("long", p, a, long), ("twin", p, a, SAMPLED), ("other", q, a, GREEDY), ("base", p, None, GREEDY))}

    engine = engine_factory()
    engine.start()
    first = engine.submit(p, a, long)
    while len(first.tokens) < 2:  # answering
        assert not first.finished, first.finish_reason
        time.sleep(0.002)
    prefilled = engine.stats().prefill_tokens
    # the twin of the running request and a new prompt in one admission: the new prompt is
    # prefilled in the running batch's decode step, the twin copies the running row
    with engine._cond:  # noqa: SLF001 (both reach the scheduler together)
        twin = engine.submit(p, a, SAMPLED)
        other = engine.submit(q, a, GREEDY)
    assert twin.result(timeout=TIMEOUT)[0] == want["twin"]
    assert other.result(timeout=TIMEOUT)[0] == want["other"]
    assert engine.stats().prefill_tokens == prefilled + len(q)
    assert engine.stats().shared_prompts == 1 and engine.stats().fused_steps >= 1
    # the same prompt for the base is its own prefill, and its own answer
    assert answer(engine, p, None) == want["base"]
    assert engine.stats().prefill_tokens == prefilled + len(q) + len(p)
    assert engine.stats().shared_prompts == 1
    assert first.result(timeout=TIMEOUT)[0] == want["long"]
    # once the owner has finished, the same prompt is prefilled again
    assert answer(engine, p, a, SAMPLED) == want["twin"]
    assert engine.stats().prefill_tokens == prefilled + len(q) + 2 * len(p)


def test_n_choices_of_a_prompt_that_is_answering_copy_its_prefill(tiny, adapters, engine_factory, vocab):
    p = tokens(5, 25, vocab)
    a = spec(adapters["a"])
    choices = SamplingParams(max_tokens=8, temperature=0.9, seed=11, n=3)
    solo = engine_factory()
    solo.start()
    want = [h.result(timeout=TIMEOUT)[0] for h in solo.submit_choices(p, a, choices)]
    assert len({tuple(w) for w in want}) > 1  # the choices sample on their own

    engine = engine_factory()
    engine.start()
    first = engine.submit(p, a, SamplingParams(max_tokens=60, temperature=0.0))
    while not first.tokens:
        time.sleep(0.002)
    prefilled = engine.stats().prefill_tokens
    assert [h.result(timeout=TIMEOUT)[0] for h in engine.submit_choices(p, a, choices)] == want
    assert engine.stats().prefill_tokens == prefilled and engine.stats().shared_prompts == 1
    first.cancel()


def test_a_long_prompt_prefilled_in_chunks_shares_its_prefill_once_it_answers(tiny, engine_factory, vocab):
    from hatrack.server.engine.prefix_cache import PREFILL_CHUNK

    p = tokens(6, 3 * PREFILL_CHUNK + 20, vocab)
    solo = engine_factory(prefix_cache_bytes=0)
    solo.start()
    want = answer(solo, p, None, SAMPLED)

    engine = engine_factory(prefix_cache_bytes=0, prefill_budget=PREFILL_CHUNK)  # p goes in chunk by chunk
    engine.start()
    first = engine.submit(p, None, SamplingParams(max_tokens=60, temperature=0.0))
    while not first.tokens:
        time.sleep(0.002)
    assert engine.stats().prefill_tokens == len(p)
    assert answer(engine, p, None, SAMPLED) == want
    assert engine.stats().prefill_tokens == len(p) and engine.stats().shared_prompts == 1
    first.cancel()
