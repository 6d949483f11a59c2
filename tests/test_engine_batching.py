"""Engine correctness on the tiny model (fp32): answers equal HF generate / PEFT, a
mixed batch answers as each request alone, continuous batching, the adapter cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TEST_DEVICE, randomized_tiny, settled, write_peft_adapter
from hatrack.errors import HatrackError
from hatrack.server.engine import (
    AdapterSpec,
    Engine,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    load_peft_adapter,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = ["The weather in Paris is", "def fibonacci(n):", "Dear customer, thank you for"]


def _load_tiny(folder: Path):
    return randomized_tiny(folder).to(TEST_DEVICE)


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from transformers import AutoTokenizer

    return _load_tiny(tiny_base_dir), AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_peft_adapter(tiny_base_dir, root / "a", rank=8, seed=1, scale=0.15),
        "b": write_peft_adapter(tiny_base_dir, root / "b", rank=4, seed=2, scale=0.2, targets=["q_proj", "v_proj"]),
        "c": write_peft_adapter(tiny_base_dir, root / "c", rank=16, alpha=8, seed=3, scale=0.15),
    }


def spec(folder: Path, key: str | None = None) -> AdapterSpec:
    return AdapterSpec(key or folder.name, lambda: load_peft_adapter(folder))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.fixture()
def engine_factory(tiny):
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        engine = Engine(*tiny, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=5)


def alone(engine: Engine, prompt: list[int], adapter, params=GREEDY) -> list[int]:
    return engine.submit(prompt, adapter, params).result(timeout=60)[0]


def test_base_greedy_matches_hf_generate(tiny, engine_factory):
    model, tok = tiny
    engine = engine_factory()
    engine.start()
    for text in PROMPTS[:2]:
        prompt = ids(tok, text)
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        assert alone(engine, prompt, None) == want[0, len(prompt):].tolist()


def test_adapter_greedy_matches_peft(tiny_base_dir, tiny, adapters, engine_factory):
    from peft import PeftModel

    _, tok = tiny
    engine = engine_factory()
    engine.start()
    prompt = ids(tok, PROMPTS[0])
    base_answer = alone(engine, prompt, None)
    for name in ("a", "b"):
        peft_model = PeftModel.from_pretrained(_load_tiny(tiny_base_dir), adapters[name]).eval()
        with torch.no_grad():
            want = peft_model.generate(
                input_ids=torch.tensor([prompt], device=TEST_DEVICE), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
            )[0, len(prompt):].tolist()
        got = alone(engine, prompt, spec(adapters[name]))
        assert got == want, name
        assert got != base_answer  # the adapter really changes the answer


def _mixed(engine: Engine, jobs):
    """Submit every job before the scheduler starts, so they share one batch."""
    handles = [engine.submit(p, a, GREEDY) for p, a in jobs]
    engine.start()
    return [h.result(timeout=60)[0] for h in handles]


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "torch-ops"])
def test_mixed_batch_equals_each_alone(tiny, adapters, engine_factory, cpu_kernel):
    _, tok = tiny
    jobs = [(ids(tok, PROMPTS[i % 3]), None if name is None else spec(adapters[name])) for i, name in
            enumerate(["a", None, "b", "c", "a", None])]
    solo = engine_factory(cpu_kernel=cpu_kernel)
    solo.start()
    want = [alone(solo, p, a) for p, a in jobs]
    assert len({tuple(w) for w in want}) >= 4  # adapters and prompts give different answers
    mixed = engine_factory(cpu_kernel=cpu_kernel)
    assert _mixed(mixed, jobs) == want
    # one shared batch (adapters join once their load lands): about one step per token,
    # not one per token per request
    assert mixed.stats().steps < 2 * GREEDY.max_tokens


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "torch-ops"])
def test_full_device_cache_keeps_rows_apart(tiny, adapters, engine_factory, cpu_kernel):
    _, tok = tiny
    prompt = ids(tok, PROMPTS[1])
    solo = engine_factory(cpu_kernel=cpu_kernel)
    solo.start()
    want = {n: alone(solo, prompt, None if n is None else spec(adapters[n])) for n in ("a", "b", "c", None)}
    engine = engine_factory(max_loaded=2, cpu_kernel=cpu_kernel)
    jobs = [(prompt, spec(adapters["a"])), (prompt, None), (prompt, spec(adapters["b"])), (prompt, None)]
    got = _mixed(engine, jobs)
    assert got == [want["a"], want[None], want["b"], want[None]]
    # a third adapter evicts the least recently used one once its rows are done
    assert alone(engine, prompt, spec(adapters["c"])) == want["c"]
    loaded = engine.stats().loaded_adapters
    assert len(loaded) == 2 and loaded[-1] == "c"


def test_waits_for_a_slot_when_all_are_pinned(tiny, adapters, engine_factory):
    _, tok = tiny
    prompt = ids(tok, PROMPTS[2])
    solo = engine_factory()
    solo.start()
    want_b = alone(solo, prompt, spec(adapters["b"]))
    engine = engine_factory(max_loaded=1)
    engine.start()
    long = engine.submit(prompt, spec(adapters["a"]), SamplingParams(max_tokens=40, temperature=0))
    while not long.tokens:
        time.sleep(0.002)
    waiting = engine.submit(prompt, spec(adapters["b"]), GREEDY)
    assert waiting.result(timeout=60)[0] == want_b
    assert long.finished  # b could only start once a's row had left its slot


def test_short_request_overtakes_long_and_joins_mid_generation(tiny, engine_factory):
    _, tok = tiny
    engine = engine_factory()
    engine.start()
    long = engine.submit(ids(tok, PROMPTS[0]), None, SamplingParams(max_tokens=150, temperature=0))
    while len(long.tokens) < 3:
        time.sleep(0.002)
    short = engine.submit(ids(tok, PROMPTS[1]), None, SamplingParams(max_tokens=3, temperature=0))
    assert short.result(timeout=60)[1] == "length"
    assert not long.finished and 3 <= len(long.tokens) < 150
    assert long.result(timeout=60) == (long.tokens, "length") and len(long.tokens) == 150


def _one_row_busy(tiny, engine_factory):
    """An engine with one batch row: a long request running (its first token out) and a
    short one waiting behind it."""
    _, tok = tiny
    engine = engine_factory(max_batch=1)
    engine.start()
    running = engine.submit(ids(tok, PROMPTS[0]), None, SamplingParams(max_tokens=100_000, temperature=0))
    waiting = engine.submit(ids(tok, PROMPTS[1]), None, GREEDY)
    while not running.tokens:
        time.sleep(0.002)
    return engine, running, waiting


def test_cancel_frees_the_row(tiny, engine_factory):
    engine, first, second = _one_row_busy(tiny, engine_factory)
    assert not second.tokens  # one row: the second waits
    first.cancel()
    assert second.result(timeout=60)[1] == "length"
    tokens, reason = first.result(timeout=5)
    assert reason == "cancelled" and len(tokens) < 1000
    stats = settled(engine)
    assert stats.running == 0 and stats.queue_depth == 0


def test_concurrent_cold_requests_load_once(tiny, adapters, engine_factory):
    _, tok = tiny
    calls = []

    def load():
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # a slow disk
        return load_peft_adapter(adapters["a"])

    engine = engine_factory()
    engine.start()
    cold = AdapterSpec("a@1:cold", load)
    handles: list = []
    threads = [
        threading.Thread(target=lambda: handles.append(engine.submit(ids(tok, PROMPTS[0]), cold, GREEDY)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers = {tuple(h.result(timeout=60)[0]) for h in handles}
    assert len(calls) == 1 and len(answers) == 1
    assert engine.stats().adapter_load_seconds and engine.stats().adapter_load_seconds[0] >= 0.3


def test_failing_load_fails_only_its_own_requests(tiny, adapters, engine_factory, tmp_path):
    _, tok = tiny
    prompt = ids(tok, PROMPTS[0])
    solo = engine_factory()
    solo.start()
    want_a, want_base = alone(solo, prompt, spec(adapters["a"])), alone(solo, prompt, None)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "peft_type": "LORA"}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    engine = engine_factory()
    jobs = [(prompt, spec(broken, "broken")), (prompt, spec(adapters["a"])), (prompt, None), (prompt, spec(broken, "broken"))]
    handles = [engine.submit(p, a, GREEDY) for p, a in jobs]
    engine.start()
    for bad in (handles[0], handles[3]):
        with pytest.raises(HatrackError) as err:
            bad.result(timeout=60)
        assert "adapter_model.safetensors" in str(err.value) and "\n" not in str(err.value)
        assert bad.finish_reason == "error"
    assert handles[1].result(timeout=60)[0] == want_a
    assert handles[2].result(timeout=60)[0] == want_base


def test_adapter_for_another_base_is_refused(tiny, default_base_dir, tmp_path, engine_factory):
    _, tok = tiny
    # a rank-2 adapter written for the real base: its shapes do not fit the tiny model
    other = write_peft_adapter(default_base_dir, tmp_path / "other", rank=2, targets=["q_proj"])
    engine = engine_factory()
    engine.start()
    with pytest.raises(HatrackError, match=r"q_proj.*expected A \[r, 64\]"):
        engine.submit(ids(tok, PROMPTS[0]), spec(other), GREEDY).result(timeout=60)


def test_seeded_sampling_repeats(tiny, adapters, engine_factory):
    _, tok = tiny
    engine = engine_factory()
    engine.start()
    prompt = ids(tok, PROMPTS[2])
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = engine.submit(prompt, spec(adapters["a"]), params)
    again = engine.submit(prompt, spec(adapters["a"]), params)  # same batch, same seed
    other = engine.submit(prompt, spec(adapters["a"]), SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8))
    assert first.result(timeout=60)[0] == again.result(timeout=60)[0]
    assert other.result(timeout=60)[0] != first.result()[0]
    assert first.result()[0] != alone(engine, prompt, spec(adapters["a"]), SamplingParams(max_tokens=16, temperature=0))


def test_vanishing_temperature_and_top_p_answer_greedily(tiny, engine_factory):
    _, tok = tiny
    engine = engine_factory()
    engine.start()
    prompt = ids(tok, PROMPTS[0])
    greedy = alone(engine, prompt, None)
    for temperature, top_p in ((1e-300, 1.0), (1.0, 5e-324), (1e-30, 1e-30)):
        params = SamplingParams(max_tokens=12, temperature=temperature, top_p=top_p, seed=3)
        assert alone(engine, prompt, None, params) == greedy, (temperature, top_p)


def test_stop_token_ends_the_answer(tiny, engine_factory):
    _, tok = tiny
    engine = engine_factory()
    engine.start()
    prompt = ids(tok, PROMPTS[0])
    free = alone(engine, prompt, None)
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    tokens, reason = engine.submit(
        prompt, None, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(free[stop_at],))
    ).result(timeout=60)
    assert (tokens, reason) == (free[:stop_at], "stop")


def test_queue_full_and_prompt_too_long(tiny, engine_factory):
    _, tok = tiny
    engine = engine_factory(max_waiting=2, max_context=16)  # not started: requests stay queued
    engine.submit([1, 2, 3], None, GREEDY)
    engine.submit([1, 2, 3], None, GREEDY)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit([1, 2, 3], None, GREEDY)
    assert engine.stats().queue_depth == 2
    with pytest.raises(PromptTooLongError, match="16"):
        engine.submit(list(range(16)), None, GREEDY)


def test_context_limit_ends_with_length(tiny, engine_factory):
    engine = engine_factory(max_context=16)
    engine.start()
    tokens, reason = engine.submit(list(range(10, 20)), None, SamplingParams(max_tokens=100, temperature=0)).result(60)
    assert reason == "length" and len(tokens) == 6  # 10 prompt + 6 answer = the 16-token context


def test_bank_rank_growth_keeps_loaded_adapters(tiny, adapters, engine_factory):
    _, tok = tiny
    prompt = ids(tok, PROMPTS[1])
    engine = engine_factory(max_loaded=2)
    engine.start()
    before = alone(engine, prompt, spec(adapters["b"]))  # rank 4: the bank starts at rank 8
    assert engine.bank.rank == 8
    running = engine.submit(prompt, spec(adapters["b"]), SamplingParams(max_tokens=30, temperature=0))
    grown = alone(engine, prompt, spec(adapters["c"]))  # rank 16 arrives while b runs
    assert engine.bank.rank == 16
    assert running.result(timeout=60)[0][: len(before)] == before
    assert alone(engine, prompt, spec(adapters["b"])) == before
    assert grown != before


def test_stop_cancels_waiting_then_running(tiny, engine_factory):
    from hatrack.server.engine import EngineStoppedError

    engine, running, waiting = _one_row_busy(tiny, engine_factory)
    started = time.monotonic()
    engine.stop(timeout=0.3)
    assert time.monotonic() - started < 10
    assert waiting.result(timeout=1) == ([], "cancelled")
    assert running.result(timeout=1)[1] == "cancelled" and running.tokens
    with pytest.raises(EngineStoppedError):
        engine.submit([1, 2, 3], None, GREEDY)


def test_churn_of_requests_cancels_and_evictions_settles(tiny, adapters, engine_factory):
    import random

    _, tok = tiny
    rng = random.Random(0)
    engine = engine_factory(max_loaded=2, max_batch=4)
    engine.start()
    choices = [None, spec(adapters["a"]), spec(adapters["b"]), spec(adapters["c"])]
    handles = []
    for i in range(30):
        params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]), seed=i)
        handles.append(engine.submit(ids(tok, PROMPTS[i % 3]), rng.choice(choices), params))
        if rng.random() < 0.3:
            rng.choice(handles).cancel()
    reasons = {h.result(timeout=60)[1] for h in handles}
    assert reasons <= {"length", "cancelled"} and "length" in reasons
    stats = settled(engine)
    assert stats.running == 0 and stats.queue_depth == 0
    assert engine.cache.pinned_slots() == 0
