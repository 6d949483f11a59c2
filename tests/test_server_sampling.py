"""Sampling knobs, logprobs, n / best_of, stream_options and max_completion_tokens through
a real `hatrack serve` on loopback (tiny model), with the official openai client and
litellm; and a mixed batch where every row answers as it does alone."""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network lookups from litellm
import litellm  # noqa: E402

BASE = "tiny-llama"
ADAPTERS = ("acme-support", "globex-support")
Q = [{"role": "user", "content": "Where is my order?"}]
MAX_BATCH = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("sampling-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(registry, BASE, tiny_base_dir, home / "src", ADAPTERS)
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--max-tokens", "16", "--max-batch", str(MAX_BATCH)).start()
        yield server
        server.stop()


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


class Clients:
    """The same call through the openai client or litellm, answers as plain dicts."""

    def __init__(self, server, which: str):
        self.which, self.url = which, f"{server.url}/v1"
        self.openai = OpenAI(base_url=self.url, api_key="none", max_retries=0)

    def chat(self, model: str, **kw):
        if self.which == "openai":
            return _plain(self.openai.chat.completions.create(model=model, messages=kw.pop("messages", Q), **kw))
        return _plain(litellm.completion(model=f"openai/{model}", api_base=self.url, api_key="none",
                                         messages=kw.pop("messages", Q), **kw))

    def text(self, model: str, **kw):
        if self.which == "openai":
            return _plain(self.openai.completions.create(model=model, **kw))
        return _plain(litellm.text_completion(model=f"openai/{model}", api_base=self.url, api_key="none", **kw))


def _plain(reply):
    if hasattr(reply, "__next__") or hasattr(reply, "__iter__") and not hasattr(reply, "model_dump"):
        return [_plain(chunk) for chunk in reply]
    return reply.model_dump() if hasattr(reply, "model_dump") else dict(reply)


@pytest.fixture(params=["openai", "litellm"])
def client(request, served) -> Clients:
    return Clients(served, request.param)


def _texts(reply, chat=True) -> list[str]:
    return [c["message"]["content"] if chat else c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]


def _streamed(chunks, chat=True) -> tuple[dict[int, str], dict[int, list], dict[int, str], dict | None]:
    """Per choice index: text, logprob entries, finish reason; and the usage chunk's usage."""
    texts, lps, finish, use = {}, {}, {}, None
    for chunk in chunks:
        if chunk.get("usage") and not chunk["choices"]:
            use = chunk["usage"]
        for c in chunk["choices"]:
            i = c["index"]
            piece = (c["delta"].get("content") if chat else c["text"]) or ""
            texts[i] = texts.get(i, "") + piece
            if c.get("logprobs"):
                lps.setdefault(i, []).extend(c["logprobs"]["content"] if chat else
                                             list(zip(*[c["logprobs"][k] for k in
                                                        ("tokens", "token_logprobs", "top_logprobs", "text_offset")])))
            if c.get("finish_reason"):
                finish[i] = c["finish_reason"]
    return texts, lps, finish, use


# ------------------------------------------------------------------ knobs


def test_knobs_do_what_they_say(client, tok):
    greedy = client.chat("acme-support", temperature=0, max_tokens=8)
    word = tok(" yes", add_special_tokens=False)["input_ids"][0]
    forced = client.chat("acme-support", temperature=0, max_tokens=4, logit_bias={str(word): 100})
    assert _texts(forced) == [tok.decode([word] * 4)]
    assert _texts(client.chat("acme-support", temperature=1.5, seed=2, max_tokens=8,
                              extra_body={"top_k": 1})) == _texts(greedy)
    assert _texts(client.chat("acme-support", temperature=1.5, seed=2, max_tokens=8,
                              extra_body={"min_p": 1.0})) == _texts(greedy)
    knobs = dict(temperature=0.9, seed=5, max_tokens=8, presence_penalty=1.0, frequency_penalty=0.5,
                 extra_body={"repetition_penalty": 1.3, "top_k": 40, "min_p": 0.02})
    one, two = client.chat("acme-support", **knobs), client.chat("acme-support", **knobs)
    assert _texts(one) == _texts(two)  # seeded: reproducible
    text = client.text("globex-support", prompt="Hello", temperature=0, max_tokens=4, logit_bias={str(word): 100})
    assert _texts(text, chat=False) == [tok.decode([word] * 4)]


# ------------------------------------------------------------------ logprobs


def _check_chat_entries(entries, k: int):
    assert entries
    for e in entries:
        assert set(e) >= {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == k
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
        if k:  # greedy: the picked token is the most likely one
            assert e["top_logprobs"][0]["token"] == e["token"] and e["top_logprobs"][0]["logprob"] == e["logprob"]
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]


def test_chat_logprobs_plain_and_streamed(client):
    reply = client.chat("acme-support", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    choice = reply["choices"][0]
    entries = choice["logprobs"]["content"]
    _check_chat_entries(entries, 3)
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"]
    chunks = client.chat("acme-support", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    texts, lps, _, _ = _streamed(chunks)
    assert texts[0] == choice["message"]["content"]
    assert [(e["token"], e["logprob"]) for e in lps[0]] == [(e["token"], e["logprob"]) for e in entries]
    bare = client.chat("acme-support", temperature=0, max_tokens=3, logprobs=True)
    _check_chat_entries(bare["choices"][0]["logprobs"]["content"], 0)
    assert client.chat("acme-support", temperature=0, max_tokens=3)["choices"][0]["logprobs"] is None


def test_text_logprobs_plain_and_streamed(client):
    reply = client.text("globex-support", prompt="Hello, my name is", temperature=0, max_tokens=6, logprobs=2)
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for token, value, top, offset in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]):
        assert choice["text"][offset:].startswith(token)
        assert 1 <= len(top) <= 3 and top[token] == value == max(top.values())
    chunks = client.text("globex-support", prompt="Hello, my name is", temperature=0, max_tokens=6, logprobs=2,
                         stream=True)
    texts, lps, _, _ = _streamed(chunks, chat=False)
    assert texts[0] == choice["text"]
    if client.which == "litellm":
        return  # litellm rebuilds streamed text completions from chat chunks, without logprobs
    assert [(t, v, o) for t, v, _, o in lps[0]] == list(zip(lp["tokens"], lp["token_logprobs"], lp["text_offset"]))


# ------------------------------------------------------------------ n, best_of, usage, limits


def test_n_choices_each_equal_their_seed_alone(client):
    many = client.chat("acme-support", temperature=1.0, seed=30, max_tokens=8, n=3)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    alone = [_texts(client.chat("acme-support", temperature=1.0, seed=30 + i, max_tokens=8))[0] for i in range(3)]
    assert _texts(many) == alone and len(set(alone)) == 3
    tokens_alone = sum(client.chat("acme-support", temperature=1.0, seed=30 + i, max_tokens=8)["usage"]
                       ["completion_tokens"] for i in range(3))
    assert many["usage"]["completion_tokens"] == tokens_alone
    chunks = client.chat("acme-support", temperature=1.0, seed=30, max_tokens=8, n=3, stream=True,
                         stream_options={"include_usage": True})
    texts, _, finish, use = _streamed(chunks)
    assert [texts[i] for i in range(3)] == alone
    # litellm passes on the first choice's finish chunk only; the server sends one per choice
    assert set(finish) == ({0} if client.which == "litellm" else {0, 1, 2})
    assert use["completion_tokens"] == tokens_alone
    text = client.text("acme-support", prompt="Once", temperature=1.0, seed=30, max_tokens=6, n=2)
    assert [c["index"] for c in text["choices"]] == [0, 1] and len(set(_texts(text, chat=False))) == 2


def test_best_of_picks_the_highest_cumulative_logprob(client):
    kw = dict(prompt="Once upon a time", temperature=1.0, seed=12, max_tokens=6)
    candidates = client.text("globex-support", n=3, logprobs=0, **kw)
    scores = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in candidates["choices"]}
    best = client.text("globex-support", best_of=3, **kw)
    assert _texts(best, chat=False) == [max(scores, key=scores.get)]
    assert best["choices"][0]["logprobs"] is None  # ranked by logprobs, returned only when asked
    assert best["usage"]["completion_tokens"] == candidates["usage"]["completion_tokens"]  # all 3 count


def test_limits_and_finish_reasons(client):
    full = client.chat("acme-support", temperature=0, max_completion_tokens=6)
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 6
    assert _texts(client.chat("acme-support", temperature=0, max_tokens=6, max_completion_tokens=6)) == _texts(full)
    text = _texts(full)[0]
    cut = client.chat("acme-support", temperature=0, max_tokens=6, stop=[text[3:5]])
    assert cut["choices"][0]["finish_reason"] == "stop" and _texts(cut) == [text[: text.index(text[3:5])]]


@pytest.mark.parametrize("path,body,param", [
    ("chat", {"top_k": -2}, "top_k"), ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"), ("chat", {"repetition_penalty": 5e-324}, "repetition_penalty"), ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"logit_bias": {"1": 101}}, "logit_bias"), ("chat", {"logit_bias": {"999999999": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"hello": 1}}, "logit_bias"), ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ("chat", {"n": 0}, "n"),
    ("chat", {"n": MAX_BATCH + 1}, "n"), ("chat", {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ("completions", {"logprobs": 6}, "logprobs"), ("completions", {"n": 3, "best_of": 2}, "best_of"),
    ("completions", {"best_of": 3, "stream": True}, "best_of"), ("completions", {"best_of": 21}, "best_of"),
])
def test_bad_values_are_400_naming_the_field(served, path, body, param):
    base = {"model": "acme-support", **({"messages": Q} if path == "chat" else {"prompt": "Hi"})}
    resp = httpx.post(f"{served.url}/v1/{path.replace('chat', 'chat/completions')}", json={**base, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


# ------------------------------------------------------------------ the mixed batch


def test_mixed_batch_rows_answer_as_alone(served):
    """Rows for two adapters and the base, some with logprobs, n=3, knobs, some plain
    greedy, sent together: each answers as it does alone."""
    c = OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    jobs = [
        (BASE, dict(temperature=0)),
        ("acme-support", dict(temperature=0)),
        ("globex-support", dict(temperature=0)),
        ("acme-support", dict(temperature=0, logprobs=True, top_logprobs=2)),
        (BASE, dict(temperature=0, n=3)),
        ("globex-support", dict(temperature=0.8, seed=21, n=3)),
        ("acme-support", dict(temperature=0, presence_penalty=1.2, logit_bias={"28": 4})),
        (BASE, dict(temperature=1.0, seed=8, extra_body={"top_k": 30, "repetition_penalty": 1.2})),
        ("globex-support", dict(temperature=0, frequency_penalty=0.8, logprobs=True)),
    ]

    def ask(job):
        model, kw = job
        reply = c.chat.completions.create(model=model, messages=Q, max_tokens=10, **kw)
        return [(ch.message.content, ch.logprobs.content if ch.logprobs else None) for ch in reply.choices]

    def tokens(reply):
        return [(text, [e.token for e in lp] if lp else None) for text, lp in reply]

    def values(reply):
        return [e.logprob for _, lp in reply for e in lp or ()]

    alone = [ask(job) for job in jobs]
    with cf.ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(ask, jobs + jobs))
    assert [tokens(r) for r in together] == [tokens(r) for r in alone + alone]
    for got, want in zip(together, alone + alone):
        assert values(got) == pytest.approx(values(want), abs=1e-5)
    alone = [tokens(r) for r in alone]
    assert len({a[0][0] for a in alone[:3]}) == 3  # the base and each adapter answer differently
    assert len({text for text, _ in alone[5]}) == 3
