"""Batched and chunked prefill and the per-adapter prefix cache, on the tiny model (fp32):
prompts prefilled together answer as each alone, a long prompt does not stall running
answers, and a cached prefix serves only its own adapter and changes no answer."""

from __future__ import annotations

import random
import time

import pytest

from hatrack.server.engine import Engine, SamplingParams
from hatrack.server.engine.prefix_cache import PREFILL_CHUNK
from test_engine_batching import adapters, engine_factory, spec, tiny  # noqa: F401 (fixtures)

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
TIMEOUT = 120


def tokens(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def vocab(tiny) -> int:
    return tiny[0].config.vocab_size


class ForwardLog:
    """Records each prefill forward's segments (rows, starts, lengths) as the engine runs it."""

    def __init__(self, engine: Engine):
        self.calls: list[list[tuple[int, int, int]]] = []
        real = engine.runner.prefill

        def prefill(segments, bank):
            self.calls.append([(s.row, s.start, len(s.ids)) for s in segments])
            return real(segments, bank)

        engine.runner.prefill = prefill


def start_when_loaded(engine: Engine, keys: set[str]) -> None:
    """Start the scheduler once every wanted adapter is in host memory, so the first
    iteration admits every queued request together."""
    deadline = time.monotonic() + TIMEOUT
    while not keys <= set(engine.stats().host_adapters):
        assert time.monotonic() < deadline, "adapters did not load"
        time.sleep(0.01)
    engine.start()


def answer(engine: Engine, prompt: list[int], adapter, params=GREEDY) -> list[int]:
    return engine.submit(prompt, adapter, params).result(timeout=TIMEOUT)[0]


def test_prompts_queued_together_share_forwards_and_answer_as_alone(tiny, adapters, engine_factory, vocab):
    lengths = [7, 300, 12, 140, 5, 60]  # 300 and 140 span several chunks
    names = ["a", None, "b", "a", "c", None]
    jobs = [(tokens(i, n, vocab), None if name is None else spec(adapters[name]))
            for i, (n, name) in enumerate(zip(lengths, names))]
    solo = engine_factory(prefix_cache_bytes=0)
    solo.start()
    want = [answer(solo, p, a) for p, a in jobs]
    assert len({tuple(w) for w in want}) == len(jobs)

    together = engine_factory(prefix_cache_bytes=0)
    log = ForwardLog(together)
    handles = [together.submit(p, a, GREEDY) for p, a in jobs]
    start_when_loaded(together, {"a", "b", "c"})
    assert [h.result(timeout=TIMEOUT)[0] for h in handles] == want
    prefills = log.calls[:3]
    # consecutive prompts, about 256 tokens to a forward (a longer prompt alone): the
    # last four prompts and three adapters share one forward
    assert [sorted({row for row, _, _ in call}) for call in prefills] == [[0], [1], [2, 3, 4, 5]]
    # a multi-chunk prompt goes in as chunks at fixed boundaries
    assert [(start, n) for _, start, n in prefills[1]] == [(0, 128), (128, 128), (256, 44)]
    assert len(log.calls) == 3 and together.stats().prefill_tokens == sum(lengths)


def test_a_long_prompt_is_prefilled_in_chunks_while_running_answers_decode(tiny, engine_factory, vocab):
    long_prompt, short_prompt = tokens(10, 450, vocab), tokens(11, 6, vocab)
    long_params = SamplingParams(max_tokens=4, temperature=0.0)
    short_params = SamplingParams(max_tokens=40, temperature=0.0)
    solo = engine_factory(prefix_cache_bytes=0)
    solo.start()
    want_long = answer(solo, long_prompt, None, long_params)
    want_short = answer(solo, short_prompt, None, short_params)

    engine = engine_factory(prefix_cache_bytes=0, prefill_budget=PREFILL_CHUNK)
    log = ForwardLog(engine)
    engine.start()
    short = engine.submit(short_prompt, None, short_params)
    while not short.tokens:  # the short answer is running
        time.sleep(0.005)
    long = engine.submit(long_prompt, None, long_params)
    assert long.result(timeout=TIMEOUT)[0] == want_long
    assert short.result(timeout=TIMEOUT)[0] == want_short
    long_forwards = [call for call in log.calls if any(row != 0 for row, _, _ in call)]
    # one chunk per iteration (the budget), each in the last cache row until it joins
    assert [[(start, n) for _, start, n in call] for call in long_forwards] == [
        [(0, 128)], [(128, 128)], [(256, 128)], [(384, 66)]]
    # the short answer went on decoding between the chunks
    assert engine.stats().steps >= len(long_forwards) + 3


def test_a_cached_prefix_is_reused_by_its_own_adapter_only(tiny, adapters, engine_factory, vocab):
    system = tokens(20, 300, vocab)  # two whole chunks cacheable
    asks = [system + tokens(21 + i, 8, vocab) for i in range(3)]
    a, b = spec(adapters["a"]), spec(adapters["b"])
    plain = engine_factory(prefix_cache_bytes=0)
    plain.start()
    want = {(who, i): answer(plain, asks[i], adapter) for who, adapter in (("a", a), ("b", b), ("base", None))
            for i in range(3)}
    assert want[("a", 0)] != want[("b", 0)] != want[("base", 0)]

    engine = engine_factory(prefix_cache_bytes=10**8)
    engine.start()
    assert answer(engine, asks[0], a) == want[("a", 0)]  # first sighting: nothing kept
    assert engine.stats().prefix_cache_hits == 0 and len(engine.prefix) == 0
    assert answer(engine, asks[1], a) == want[("a", 1)]  # second: its 256-token prefix is kept
    assert len(engine.prefix) == 1 and engine.stats().prefix_cache_hits == 0
    assert answer(engine, asks[2], a) == want[("a", 2)]  # third: starts from the cached prefix
    assert engine.stats().prefix_cache_hits == 1 and engine.stats().prefix_cache_tokens == 256
    # the same prompts for another adapter and the base: never served from a's prefix
    for who, adapter in (("b", b), ("base", None)):
        assert answer(engine, asks[2], adapter) == want[(who, 2)]
        assert engine.stats().prefix_cache_hits == 1, who
    # once b has seen its own prefix twice, b hits its own entry
    assert answer(engine, asks[1], b) == want[("b", 1)]
    assert answer(engine, asks[0], b) == want[("b", 0)]
    assert engine.stats().prefix_cache_hits == 2 and len(engine.prefix) == 2


def test_the_prefix_cache_stays_within_its_budget(tiny, engine_factory, vocab):
    budget = 2 * PREFILL_CHUNK * engine_factory().kv.position_bytes  # room for two one-chunk prefixes
    engine = engine_factory(prefix_cache_bytes=budget)
    engine.start()
    for i in range(4):
        prompt = tokens(30 + i, 140, vocab)
        for _ in range(2):  # seen twice: kept
            answer(engine, prompt, None)
        assert engine.prefix.used_bytes <= budget
    assert len(engine.prefix) == 2 and engine.prefix.stats.evicted == 2
    answer(engine, tokens(33, 140, vocab), None)  # the newest is still there
    assert engine.stats().prefix_cache_hits == 1
    answer(engine, tokens(30, 140, vocab), None)  # the oldest was evicted
    assert engine.stats().prefix_cache_hits == 1
