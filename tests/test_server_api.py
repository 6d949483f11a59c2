"""The HTTP surface of `hatrack serve`, through a real server process on loopback and the
official openai client, on the tiny model (unquantized, fp32-free of any GPU)."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import register_random_adapters, tiny_registry, write_peft_adapter
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
QUESTION = [{"role": "user", "content": "Where is my order?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("serve-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        adapters_dir = home / "src"
        register_random_adapters(registry, BASE, tiny_base_dir, adapters_dir,
                                 ["acme-support", "globex-support", "initech-support"],
                                 tags=lambda name: {"customer": name.split("-")[0]})
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--max-loaded", "2", "--max-tokens", "16").start()
        yield server, registry, adapters_dir
        server.stop()


def client(server, key: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def ask(c: OpenAI, model: str, **kw) -> str:
    reply = c.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12, **kw)
    return reply.choices[0].message.content


def test_models_list_base_and_adapters(served):
    server, _, _ = served
    models = {m.id: m for m in client(server).models.list().data}
    assert BASE in models
    for name in ("acme-support", "globex-support", "initech-support"):
        assert models[name].model_extra.get("parent") == BASE


def test_chat_answers_per_adapter_with_usage_and_audit_header(served):
    server, registry, _ = served
    c = client(server)
    raw = c.chat.completions.with_raw_response.create(
        model="acme-support", messages=QUESTION, temperature=0, max_tokens=8
    )
    reply = raw.parse()
    resolved = registry.resolve("acme-support")
    assert raw.headers["x-hatrack-model"] == "acme-support@1"
    assert raw.headers["x-hatrack-artifact-sha256"] == resolved.sha256
    assert reply.model == "acme-support@1"
    assert reply.usage.prompt_tokens > 5
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # adapters really change the answer: three models, three different greedy texts
    answers = {m: ask(c, m) for m in (BASE, "acme-support", "globex-support")}
    assert len(set(answers.values())) == 3, answers


def test_base_answers_carry_its_fingerprint_streamed_or_not(served):
    server, registry, _ = served
    fingerprint = registry.get_base(BASE).fingerprint
    raw = client(server).chat.completions.with_raw_response.create(
        model=BASE, messages=QUESTION, temperature=0, max_tokens=4)
    assert raw.headers["x-hatrack-model"] == BASE
    assert raw.headers["x-hatrack-artifact-sha256"] == fingerprint
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"model": BASE, "prompt": "Hello", "max_tokens": 2, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-hatrack-artifact-sha256"] == fingerprint
        resp.read()


def test_mixed_concurrent_batch_equals_each_alone(served):
    """Greedy answers for several adapters and the base served together (more distinct
    models than the 2 device slots) equal each one served alone: no cross-talk."""
    server, _, _ = served
    c = client(server)
    models = [BASE, "acme-support", "globex-support", "initech-support"] * 2
    alone = {m: ask(c, m) for m in set(models)}
    with cf.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: (m, ask(c, m)), models))
    for model, text in together:
        assert text == alone[model], model


def test_streaming_sends_deltas_and_done(served):
    server, _, _ = served
    c = client(server)
    whole = ask(c, "globex-support")
    parts = []
    for chunk in c.chat.completions.create(model="globex-support", messages=QUESTION, temperature=0,
                                           max_tokens=12, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == whole
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
        "model": "globex-support", "messages": QUESTION, "max_tokens": 4, "stream": True,
    }) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(l[6:]) for l in lines[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_text_completions_and_seeded_sampling(served):
    server, _, _ = served
    c = client(server)
    reply = c.completions.create(model="acme-support", prompt="Hello, my name is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens <= 6
    one = c.completions.create(model="acme-support", prompt="Once", max_tokens=8, temperature=1.0, seed=7)
    two = c.completions.create(model="acme-support", prompt="Once", max_tokens=8, temperature=1.0, seed=7)
    assert one.choices[0].text == two.choices[0].text


def test_stop_sequence_cuts_the_answer(served):
    server, _, _ = served
    c = client(server)
    full = ask(c, "acme-support")
    assert len(full) > 3
    stop = full[2:4]
    cut = ask(c, "acme-support", stop=[stop])
    assert cut == full[: full.index(stop)]


@pytest.mark.parametrize("model", ["no-such-adapter", "acme-suport", "../etc/passwd", "Acme Support", "acme-support@99"])
def test_unknown_model_is_404_model_not_found(served, model):
    server, _, _ = served
    with pytest.raises(openai.NotFoundError) as err:
        ask(client(server), model)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error"


@pytest.mark.parametrize("field,value", [
    ("temperature", 3.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", 10_000_000), ("n", 0), ("stop", ["a", "b", "c", "d", "e"]), ("messages", []),
    ("max_tokens", "many"),
])
def test_bad_parameters_are_400_with_openai_body(served, field, value):
    server, _, _ = served
    body = {"model": "acme-support", "messages": QUESTION, field: value}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in resp.text


def test_prompt_beyond_context_and_malformed_json_are_400(served):
    server, _, _ = served
    long_prompt = "hello " * 2000  # tiny model context is 512
    resp = httpx.post(f"{server.url}/v1/completions",
                      json={"model": BASE, "prompt": long_prompt, "max_tokens": 4})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "x", ',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]


def test_adapter_registered_while_serving_answers_without_restart(served, tiny_base_dir):
    server, registry, adapters_dir = served
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        ask(c, "hooli-support")
    folder = write_peft_adapter(tiny_base_dir, adapters_dir / "hooli", seed=11, scale=0.3)
    registry.register(folder, name="hooli-support", base=BASE)
    assert ask(c, "hooli-support")
    assert ask(c, "hooli-support@1") == ask(c, "hooli-support")


def test_health_ready_metrics(served):
    server, _, _ = served
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready").status_code == 200
    ask(client(server), "acme-support")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'hatrack_requests_total{endpoint="chat",model="acme-support@1",status="200"}' in text
    assert "hatrack_time_to_first_token_seconds_bucket" in text
    assert "hatrack_loaded_adapters" in text and "hatrack_queue_depth" in text


def test_no_auth_serves_without_a_key_even_once_keys_exist(served):
    """--no-auth is the choice made at start: keys created later change nothing."""
    server, registry, _ = served
    registry.create_key("someone", ["acme-*"])
    import time

    time.sleep(1.2)
    resp = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "globex-support", "messages": QUESTION, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
