"""The prefix cache through a real `hatrack serve`: two tenants and the base share one long
system prompt. A tenant's third request starts from its own cached prefix (the metrics say
so), no request is ever served from another adapter's or the base's prefix, and every
answer equals the one a server without the cache gives."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import tiny_registry, write_peft_adapter
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
# ~300 tokens of the tiny model's tokenizer: two whole 128-position chunks are cacheable
SYSTEM = "You are the support assistant of a bicycle shop. " + " ".join(
    f"Rule {i}: answer politely, quote the order number, never promise a refund." for i in range(22))
QUESTIONS = ["Where is my order?", "Can I change the colour?", "What are your opening hours?"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("prefix-home")
    started = []
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        for name, seed in (("acme", 1), ("globex", 2)):
            folder = write_peft_adapter(tiny_base_dir, home / "src" / name, rank=4, seed=seed, scale=0.5)
            registry.register(folder, name=name, base=BASE)
        try:
            for cache_gb in ("0.05", "0"):
                started.append(ServerProcess(home, "--base", BASE, "--device", "cpu", "--dtype", "float32",
                                             "--no-auth", "--prefix-cache-gb", cache_gb).start())
            yield started
        finally:
            for server in started:
                server.stop()


def ask(server: ServerProcess, model: str, question: str) -> str:
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def hits(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    [line] = [ln for ln in text.splitlines() if ln.startswith("hatrack_engine_prefix_cache_hits_total ")]
    return float(line.split()[1])


def test_a_cached_prefix_answers_only_its_own_model_and_changes_no_answer(servers):
    cached, plain = servers
    answers = {}
    for model in ("acme", "globex", BASE):
        before = hits(cached)
        got = [ask(cached, model, q) for q in QUESTIONS]
        # the first two requests of a model find no entry of its own (the first is not kept,
        # the second keeps one): other models' entries for the same tokens are never used
        # the third starts from this model's own prefix
        assert hits(cached) == before + 1, model
        assert got == [ask(plain, model, q) for q in QUESTIONS], model
        answers[model] = got
    assert hits(plain) == 0
    assert len({tuple(a) for a in answers.values()}) == 3  # the adapters really change the answers
