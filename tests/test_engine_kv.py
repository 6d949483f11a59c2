"""The KV cache budget: memory follows each request's own length and goes back when it
ends, admission waits for room, a request that can never fit is refused at once, and a
row the budget cannot grow ends with a clear error while the others complete. On tiny
models; the last test drives a real `hatrack serve --kv-cache-gb`."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import settled, tiny_registry
from hatrack.server.engine import Engine, SamplingParams
from hatrack.server.engine.errors import KVBudgetError
from serving import ServerProcess, hatrack_home_env

MB = 1e6


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def tiny(tiny_base_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval(), tokenizer


@pytest.fixture(scope="module")
def wide_kv(tokenizer):
    """A tiny model with a large KV per position (2 layers x 8 heads x 384 dims, fp32:
    96 KiB), so a 512-token prompt holds 50 MB of cache: enough for RSS to show it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=384, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def settle_heap() -> None:
    """Free what earlier tests left for the collector and hand glibc's free pages back, so
    RSS changes during a measurement are this test's own (else a collection mid-test
    can shrink RSS by more than the cache being measured)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_memory_follows_each_request_and_returns(wide_kv):
    budget = int(100 * MB)
    engine = Engine(*wide_kv, max_batch=8, kv_cache_bytes=budget, cpu_kernel=False)
    long_kv = 512 * engine.kv.position_bytes  # 50 MB
    try:
        engine.start()
        engine.submit([5] * 8, None, greedy(4)).result(timeout=120)  # warm up the step's own buffers
        settle_heap()
        gc.disable()
        base = rss_bytes()
        peak = [base]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        long = engine.submit(list(range(100, 612)), None, greedy(150))
        while not long.tokens:
            time.sleep(0.005)
        shorts = [engine.submit([7 + i] * 8, None, greedy(8)) for i in range(4)]
        assert all(s.result(timeout=120)[1] == "length" for s in shorts)
        assert not long.finished  # the short ones were not held behind the long one
        during = rss_bytes()
        assert during - base > 0.6 * long_kv  # the long prompt's cache is really there ...
        assert long.result(timeout=300)[1] == "length"
        done.set()
        watcher.join()
        # ... within the budget (plus the prefill's activations), not max_batch rows of it
        assert peak[0] - base < budget + 40 * MB, (peak[0] - base) / MB
        deadline = time.monotonic() + 10
        while rss_bytes() > during - 0.7 * long_kv and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rss_bytes() <= during - 0.7 * long_kv, (during - rss_bytes()) / MB  # and goes back
        assert engine.kv.used_bytes == 0
    finally:
        gc.enable()
        engine.stop(timeout=5)


def test_full_cache_fails_one_row_and_the_others_complete(tiny):
    _, tok = tiny
    prompt = tok("The weather in Paris is")["input_ids"]
    solo = Engine(*tiny, cpu_kernel=False)
    solo.start()
    want = solo.submit(prompt, None, greedy(200)).result(timeout=120)[0]
    want_short = solo.submit(prompt, None, greedy(5)).result(timeout=120)[0]
    solo.stop(timeout=5)
    assert len(want) == 200  # no stop token: every answer runs to max_tokens

    # room for 4 chunks of 64 positions: two answers of 200 tokens each fit alone, not together
    position_bytes = solo.kv.position_bytes
    engine = Engine(*tiny, kv_cache_bytes=256 * position_bytes, cpu_kernel=False)
    try:
        first, second = (engine.submit(prompt, None, greedy(200)) for _ in range(2))
        short = engine.submit(prompt, None, greedy(5))
        engine.start()
        outcomes = []
        for handle in (first, second):
            try:
                outcomes.append(handle.result(timeout=120))
            except KVBudgetError as err:
                outcomes.append(err)
        failed = [o for o in outcomes if isinstance(o, KVBudgetError)]
        assert len(failed) == 1, outcomes
        message = str(failed[0])
        assert "KV cache budget" in message and "--kv-cache-gb" in message and "\n" not in message
        loser = first if outcomes[0] is failed[0] else second
        assert loser.finish_reason == "error" and loser.tokens == want[: len(loser.tokens)]
        # the other answer is the one it gives alone, bit for bit, and the short one waited its turn
        assert [o for o in outcomes if o is not failed[0]] == [(want, "length")]
        assert short.result(timeout=120) == (want_short, "length")
        assert settled(engine).running == 0 and engine.kv.used_bytes == 0
    finally:
        engine.stop(timeout=5)


def test_request_that_can_never_fit_is_refused_at_once(tiny):
    engine = Engine(*tiny, kv_cache_bytes=256 * 512, cpu_kernel=False)  # 256 positions of this model's 512 bytes
    try:
        with pytest.raises(KVBudgetError) as err:
            engine.submit([1] * 10, None, greedy(300))
        message = str(err.value)
        assert "310 positions" in message and "at most 256" in message and "--kv-cache-gb" in message
        assert engine.stats().queue_depth == 0
        engine.submit([1] * 10, None, greedy(240))  # this one fits, so it queues
        assert engine.stats().queue_depth == 1
    finally:
        engine.stop(timeout=5)


def test_n_choices_are_counted_row_by_row(tiny):
    """n choices take n rows of cache: a request whose n rows could never fit is refused
    at once (it would otherwise wait forever); one that fits answers all its choices."""
    engine = Engine(*tiny, kv_cache_bytes=256 * 512, cpu_kernel=False)  # 256 positions
    try:
        with pytest.raises(KVBudgetError) as err:
            engine.submit_choices([1] * 10, None, SamplingParams(max_tokens=100, temperature=0.0, n=3))
        assert "3 choices" in str(err.value) and "--kv-cache-gb" in str(err.value)
        engine.start()
        handles = engine.submit_choices([1] * 10, None, SamplingParams(max_tokens=100, temperature=0.0, n=2))
        answers = [h.result(timeout=60)[0] for h in handles]
        alone = engine.submit([1] * 10, None, greedy(100)).result(timeout=60)[0]
        assert len(alone) == 100 and all(a == alone for a in answers)  # greedy choices equal the answer alone
        deadline = time.monotonic() + 10  # rows leave the batch just after their last event
        while engine.kv.used_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.kv.used_bytes == 0  # every row gave its cache back
    finally:
        engine.stop(timeout=5)


@pytest.fixture(scope="module")
def small_kv_server(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("kv-home")
    with hatrack_home_env(home):
        tiny_registry(tiny_base_dir, "tiny")
        # 0.0002 GB: 200,000 bytes = 390 positions of the tiny model's 512 bytes in fp32 (--dtype float32:
        # the same on a CPU whose auto is bf16) -> 384 per request
        # (no adapters here: the LoRA kernel is not needed)
        server = ServerProcess(home, "--base", "tiny", "--device", "cpu", "--dtype", "float32", "--no-auth",
                               "--kv-cache-gb", "0.0002", "--log-level", "info",
                               env={"HATRACK_CPU_KERNEL": "0"}).start()
        yield server
        server.stop()


def test_server_refuses_a_request_beyond_the_budget(small_kv_server):
    server = small_kv_server
    ready = [line for line in server.log.read_text().splitlines() if "ready: base" in line]
    assert ready and "KV cache 0.0002 GB (390 positions)" in ready[0], server.log.read_text()[-2000:]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "kv_cache_budget_exceeded" and error["param"] == "max_tokens"
    assert "at most 384 positions" in error["message"] and "--kv-cache-gb" in error["message"]
    body["max_tokens"] = 8
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text


def test_server_answers_503_when_the_cache_fills_mid_answer(small_kv_server):
    """Two answers of 300 tokens each fit the budget alone, not together: one of them ends
    with a 503 naming the budget, the other completes."""
    server = small_kv_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300,
            "temperature": 0}
    responses: list[httpx.Response] = []
    posts = [threading.Thread(target=lambda: responses.append(
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120))) for _ in range(2)]
    for post in posts:
        post.start()
    for post in posts:
        post.join()
    by_status = {r.status_code: r for r in responses}
    assert sorted(by_status) == [200, 503], [r.text[:300] for r in responses]
    error = by_status[503].json()["error"]
    assert error["code"] == "kv_cache_full" and "--kv-cache-gb" in error["message"]
    assert by_status[200].json()["usage"]["completion_tokens"] == 300
