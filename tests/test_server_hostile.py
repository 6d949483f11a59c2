"""Hostile input against a real `hatrack serve` process on loopback (tiny model): bad
parameters, broken bodies, names that try paths, damaged artifacts in the store.
Each gets a clear 4xx with the OpenAI error body and nothing internal in it, and
after each the server still answers an ordinary request exactly as before."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import socket
from pathlib import Path
from typing import Iterable

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import hand_adapter, register_random_adapters, tiny_registry, write_peft_adapter
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
GOOD = ("acme-support", "globex-support")
DAMAGED = ("tampered", "liar", "pickled", "linked-folder", "linked-file")
HI = [{"role": "user", "content": "Where is my order?"}]
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
LIMIT = 4 * 1024 * 1024  # the server's default --max-body-bytes
Q = "base_model.model.model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------ the server


def _plant_damaged(registry, base_dir: Path, src: Path, outside: Path) -> None:
    """Register five adapters, then damage what the store holds for each (the server
    has not loaded any of them yet, so each must be read, and refused, from disk)."""
    store = registry.store.root

    def stored(name: str, seed: int) -> Path:
        folder = write_peft_adapter(base_dir, src / name, seed=seed, scale=0.3)
        return store / registry.register(folder, name=name, base=BASE).sha256

    # a byte of the weights changed after registration: the sha256 no longer matches
    weights = stored("tampered", 21) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    # a header claiming more bytes than the file has; `register` refuses it, so it is
    # planted with the fit check off (its sha256 does match: only the header lies)
    liar = hand_adapter(src / "liar", {f"{Q}.lora_A.weight": [8, 64], f"{Q}.lora_B.weight": [64, 8]},
                        claim_extra=4096)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hatrack.registry.registry.check_fits", lambda *a, **k: 0)
        registry.register(liar, name="liar", base=BASE)

    # only pickle weights left in the store folder
    folder = stored("pickled", 22)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95not loaded, ever")

    # the store folder replaced by a symlink to an identical copy elsewhere: the hash
    # matches, the link must still be refused
    folder = stored("linked-folder", 23)
    copy = outside / "linked-folder-copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(folder)
    folder.symlink_to(copy, target_is_directory=True)

    # one file in the store replaced by a symlink to an identical copy
    folder = stored("linked-file", 24)
    config = folder / "adapter_config.json"
    shutil.copy(config, outside / "adapter_config.json")
    config.unlink()
    config.symlink_to(outside / "adapter_config.json")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("hostile-home")
    outside = tmp_path_factory.mktemp("outside-the-store")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        src = home / "src"
        register_random_adapters(registry, BASE, tiny_base_dir, src, GOOD)
        _plant_damaged(registry, tiny_base_dir, src, outside)
        # a valid adapter folder outside the store, for names that try to reach it
        write_peft_adapter(tiny_base_dir, home.parent / "decoy", seed=9, scale=0.3)
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--max-loaded", "2", "--max-tokens", "8").start()
        server.reference = {m: _greedy(server, m) for m in (BASE, *GOOD)}
        yield server
        server.stop()


def _greedy(server, model: str) -> str:
    resp = httpx.post(f"{server.url}{CHAT}", json={"model": model, "messages": HI, "max_tokens": 4,
                                                   "temperature": 0}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def assert_serving(server, model: str = "acme-support") -> None:
    """The server still answers an ordinary request, with the same answer as before."""
    assert _greedy(server, model) == server.reference[model]


def openai_client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


# ------------------------------------------------------------------ helpers


def leaks(text: str, server) -> list[str]:
    """Internal details a response must never show."""
    bad = ["Traceback", 'File "', "/tmp", str(server.home), "site-packages", ".py\"", "Error(", "0x"]
    return [b for b in bad if b and b in text]


def assert_error(resp, status: int, server, *, code: str | None = None, param: str | None = "-") -> dict:
    """`resp` is `status` with exactly OpenAI's error body, and shows nothing internal."""
    text = resp.text if hasattr(resp, "text") else resp[2].decode("utf-8", "replace")
    got = resp.status_code if hasattr(resp, "status_code") else resp[0]
    assert got == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "server_error"), error
    assert not leaks(text, server), (leaks(text, server), text)
    if code is not None:
        assert error["code"] == code, error
    if param != "-":
        assert error["param"] == param, error
    return error


def post_raw(server, body: bytes, path: str = CHAT, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)


def with_field(base: dict, field: str, literal: str) -> bytes:
    """`base` as JSON with `field` set to a raw JSON(-ish) literal such as NaN or 1e400."""
    return (json.dumps(base)[:-1] + f', "{field}": {literal}}}').encode()


def raw_http(port: int, head: str, chunks: Iterable[bytes] = (), timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request over a bare socket (no client-side URL cleanup), read to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        for chunk in chunks:
            sock.sendall(chunk)
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ------------------------------------------------------------------ 1. request strictness

NUMERIC_CHAT = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
                "presence_penalty", "frequency_penalty", "top_logprobs", "min_p", "repetition_penalty"]
HOSTILE_NUMBERS = ["-1", "0.5e400", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", str(10**30),
                   str(-10**30), '"5"', "true", "[]", "{}", '"NaN"']


@pytest.mark.parametrize("field", NUMERIC_CHAT)
def test_hostile_numbers_in_every_chat_field_are_400_naming_it(served, field):
    base = {"model": "acme-support", "messages": HI}
    for literal in HOSTILE_NUMBERS:
        if literal == "-1" and field in ("seed", "presence_penalty", "frequency_penalty"):
            continue  # a valid value
        resp = post_raw(served, with_field(base, field, literal))
        assert_error(resp, 400, served, param=field)
    assert_serving(served)


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "top_p", "n", "seed", "best_of", "logprobs"])
def test_hostile_numbers_in_text_completion_fields_are_400_naming_it(served, field):
    base = {"model": "acme-support", "prompt": "Hello"}
    for literal in ["-5", "1e400", "NaN", str(10**30), str(-10**30), '"1"', "false"]:
        if field == "seed" and literal == "-5":
            continue  # a valid seed
        resp = post_raw(served, with_field(base, field, literal), path=TEXT)
        assert_error(resp, 400, served, param=field)
    assert_serving(served)


@pytest.mark.parametrize("extra", [
    {"temperature": 5e-324}, {"temperature": 1e-300}, {"top_p": 5e-324}, {"top_p": 1e-300, "temperature": 2},
])
def test_vanishing_temperature_or_top_p_means_the_most_likely_token(served, extra):
    # found by schemathesis: these once reached the sampler as inf / 0 and failed with a 500
    resp = httpx.post(f"{served.url}{CHAT}", json={"model": "acme-support", "messages": HI, "max_tokens": 4,
                                                   "seed": 1, **extra})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == served.reference["acme-support"]
    assert_serving(served)


@pytest.mark.parametrize("body,param", [
    ({"foo": 1}, "foo"),
    ({"messages": [{"role": "user", "content": "hi", "mood": "angry"}]}, "messages[0].mood"),
    ({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    ({"response_format": {"type": "text", "strict": True}}, "response_format.strict"),
    ({"functions_v2": []}, "functions_v2"),
])
def test_unknown_fields_are_400_unrecognized_argument(served, body, param):
    resp = httpx.post(f"{served.url}{CHAT}", json={"model": "acme-support", "messages": HI, **body})
    error = assert_error(resp, 400, served, code="unknown_parameter", param=param)
    assert error["message"] == f"Unrecognized request argument supplied: {param}"
    assert_serving(served)


def test_fields_openai_clients_send_are_accepted_at_neutral_values(served):
    c = openai_client(served)
    plain = c.chat.completions.create(model="acme-support", messages=HI, max_tokens=4, temperature=0)
    decorated = c.chat.completions.create(
        model="acme-support", messages=HI, max_tokens=4, temperature=0, user="user-17",
        metadata={"ticket": "42"}, store=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
        logprobs=False, parallel_tool_calls=True, service_tier="auto", response_format={"type": "text"},
        seed=3, top_p=1.0, n=1, stop=None,
    )
    assert decorated.choices[0].message.content == plain.choices[0].message.content
    chunks = list(c.chat.completions.create(model="acme-support", messages=HI, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    text = c.completions.create(model="acme-support", prompt="Hello", max_tokens=3, temperature=0,
                                echo=False, best_of=1, user="u", suffix=None)
    assert text.choices[0].text is not None
    assert_serving(served)


@pytest.mark.parametrize("kwargs,param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_unimplemented_features_are_400_naming_the_parameter(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(served).chat.completions.create(model="acme-support", messages=HI, max_tokens=4, **kwargs)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"
    assert "not supported" in err.value.body["message"]
    assert_serving(served)


@pytest.mark.parametrize("kwargs,param", [({"echo": True}, "echo"), ({"suffix": "tail"}, "suffix")])
def test_unimplemented_text_completion_features_are_400(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(served).completions.create(model="acme-support", prompt="Hi", max_tokens=4, **kwargs)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"
    assert_serving(served)


@pytest.mark.parametrize("body,param", [
    ({"model": 5}, "model"),
    ({"model": ["acme-support"]}, "model"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": "x" * 600}, "stop"),
    ({"user": 7}, "user"),
    ({"metadata": {"a": 1}}, "metadata"),
    ({"metadata": "a=b"}, "metadata"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"stream_options": True}, "stream_options"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages[0].tool_calls[0].function"),
])
def test_wrong_types_are_400_naming_the_field(served, body, param):
    full = {"model": "acme-support", "messages": HI, **body}
    assert_error(httpx.post(f"{served.url}{CHAT}", json=full), 400, served, param=param)
    assert_serving(served)


def test_prompts_beyond_the_context_are_400(served):
    long = "hello " * 2000  # the tiny model's context is 512 tokens
    resp = httpx.post(f"{served.url}{CHAT}", json={"model": "acme-support",
                                                   "messages": [{"role": "user", "content": long}]})
    assert_error(resp, 400, served, code="context_length_exceeded", param="messages")
    resp = httpx.post(f"{served.url}{TEXT}", json={"model": "acme-support", "prompt": long})
    assert_error(resp, 400, served, code="context_length_exceeded", param="prompt")
    resp = httpx.post(f"{served.url}{CHAT}", json={"model": "acme-support", "messages": HI,
                                                   "max_completion_tokens": 600})
    assert_error(resp, 400, served, code="context_length_exceeded", param="max_completion_tokens")
    # the official client sees the same as a BadRequestError
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(served).completions.create(model=BASE, prompt=long, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"
    assert_serving(served)


# ------------------------------------------------------------------ 2. transport-level hostility


def test_several_megabytes_under_the_limit_are_read_and_judged(served):
    # 3 MB of valid JSON: tokenized (off the event loop) and refused for the context
    big = {"model": "acme-support", "prompt": "lorem ipsum " * 250_000}
    assert 2.5e6 < len(json.dumps(big)) < LIMIT
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{served.url}{TEXT}", json=big, timeout=120)
        assert_serving(served)  # others are answered meanwhile
        assert_error(pending.result(), 400, served, code="context_length_exceeded")
    assert_serving(served)


def test_body_over_the_limit_is_413_from_content_length_alone(served):
    # only the headers are sent: the answer must come without reading any body
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {6 * 1024 * 1024}\r\nConnection: close\r\n\r\n")
    status, headers, body = raw_http(served.port, head, timeout=15)
    assert_error((status, headers, body), 413, served, code="request_too_large")
    assert str(LIMIT) in json.loads(body)["error"]["message"]
    assert_serving(served)


def test_chunked_body_over_the_limit_is_413_when_the_count_passes_it(served):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    piece = b"[" + b" " * (256 * 1024 - 1)

    def chunks():
        for _ in range(LIMIT // len(piece)):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"1\r\n \r\n"  # one byte past the limit; the body never ends

    status, headers, body = raw_http(served.port, head, chunks(), timeout=30)
    assert_error((status, headers, body), 413, served, code="request_too_large")
    assert_serving(served)


def test_a_client_posting_several_megabytes_gets_413(served):
    resp = httpx.post(f"{served.url}{CHAT}", content=b"{" + b" " * (6 * 1024 * 1024) + b"}",
                      headers={"content-type": "application/json"}, timeout=60)
    assert_error(resp, 413, served, code="request_too_large")
    assert_serving(served)


@pytest.mark.parametrize("body,content_type,code", [
    (b'{"model": "acme-support", ', "application/json", "invalid_json"),
    (b'{"model": "acme-support", "messages": [}', "application/json", "invalid_json"),
    (b"", "application/json", "invalid_json"),
    (b'{"model": "acme-\xff\xfe", "messages": []}', "application/json", "invalid_encoding"),
    (b"\xc3\x28", "application/json", "invalid_encoding"),
    (b'{"model": "\\udc80x", "messages": [{"role": "user", "content": "hi"}]}', "application/json",
     "invalid_encoding"),
    (b'[{"model": "acme-support"}]', "application/json", "invalid_value"),
    (b'"acme-support"', "application/json", "invalid_value"),
    (b"null", "application/json", "invalid_value"),
    (b"42", "application/json", "invalid_value"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "invalid_json"),
    (b'{"model": "a", "seed": 1' + b"0" * 6000 + b"}", "application/json", "invalid_json"),
    (b'{"model": "acme-support", "messages": []}', "text/plain", "invalid_content_type"),
    (b"model=acme-support", "application/x-www-form-urlencoded", "invalid_content_type"),
    (b'{"model": "acme-support", "messages": []}', None, "invalid_content_type"),
])
def test_malformed_bodies_are_400(served, body, content_type, code):
    for path in (CHAT, TEXT):
        assert_error(post_raw(served, body, path, content_type), 400, served, code=code, param=None)
    assert_serving(served)


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/nope", 404), ("POST", "/v1/engines/x/completions", 404), ("GET", "/", 404),
    ("DELETE", "/v1/models", 405), ("GET", CHAT, 405), ("PUT", "/health", 405), ("PATCH", TEXT, 405),
])
def test_unknown_routes_and_wrong_methods_use_the_openai_body(served, method, path, status):
    resp = httpx.request(method, f"{served.url}{path}", json={"model": "acme-support"})
    assert_error(resp, status, served, code="not_found" if status == 404 else "method_not_allowed")
    if status == 405:
        assert resp.headers.get("allow")
    assert_serving(served)


# ------------------------------------------------------------------ 3. names that try paths

PATHY_NAMES = [
    "../decoy", "../../decoy", "/etc/passwd", "%2e%2e%2fdecoy", "..%2F..%2Fdecoy", "acme/../../decoy",
    "acme-support/../decoy", "a b", "a" * 65, "acme-support\x00", "acme-support\n", "\x00",
    "аcme-support",  # Cyrillic а
    "acme\u2010support",  # a Unicode hyphen
    "ａｃｍｅ-support",  # fullwidth
    "ACME-SUPPORT", "acme-support@../1", "acme-support@1/..", "~/decoy", "decoy/", ".", "..",
    "acme-support@", "@prod", "acme-support@@1",
]


def test_names_that_try_paths_are_404_in_requests(served):
    decoy = str(Path(served.home).parent / "decoy")
    sha = next(p.name for p in (served.home / "store").iterdir() if len(p.name) == 64)
    for name in [*PATHY_NAMES, decoy, decoy + "/", f"file://{decoy}", sha]:
        for path, body in ((CHAT, {"messages": HI}), (TEXT, {"prompt": "hi"})):
            resp = httpx.post(f"{served.url}{path}", json={"model": name, "max_tokens": 2, **body})
            assert_error(resp, 404, served, code="model_not_found", param="model")
            assert "decoy" not in resp.text and "passwd" not in resp.text
    assert_serving(served)


@pytest.mark.parametrize("target", [
    "/v1/models/../../etc/passwd", "/v1/models/..%2f..%2fetc%2fpasswd", "/v1/models/%2e%2e%2f%2e%2e%2fdecoy",
    "/v1/models//etc/passwd", "/v1/models/acme-support%00", "/v1/models/acme-support%2f..%2f..%2fdecoy",
    "/v1/models/%D0%B0cme-support", "/v1/models/" + "a" * 65, "/v1/models/a%20b", "/v1/models/..",
    "/v1/models/acme-support/../../../decoy", "/v1/models/%252e%252e%252fdecoy",
])
def test_names_that_try_paths_are_404_in_model_lookup(served, target):
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, body = raw_http(served.port, head)
    assert_error((status, headers, body), 404, served)
    assert b"passwd" not in body and b"decoy" not in body
    assert_serving(served)


def test_real_names_still_resolve_in_model_lookup(served):
    for name in ("acme-support", "acme-support@1", BASE):
        assert httpx.get(f"{served.url}/v1/models/{name}").json()["id"] == name


# ------------------------------------------------------------------ 4. damaged artifacts


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_artifact_is_a_clear_4xx_and_others_keep_serving(served, name):
    assert_serving(served)
    for attempt in range(2):  # refused every time, not once and then half-loaded
        for stream in (False, True):
            resp = httpx.post(f"{served.url}{CHAT}", json={"model": name, "messages": HI, "max_tokens": 2,
                                                           "stream": stream}, timeout=30)
            error = assert_error(resp, 422, served, code="adapter_unavailable", param="model")
            assert f"'{name}@1'" in error["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client(served).completions.create(model=f"{name}@1", prompt="hi", max_tokens=2)
    for model in (BASE, *GOOD):
        assert_serving(served, model)


def test_damage_reasons_are_named_without_paths(served):
    def reason(name: str) -> str:
        resp = httpx.post(f"{served.url}{CHAT}", json={"model": name, "messages": HI, "max_tokens": 2})
        return assert_error(resp, 422, served)["message"]

    assert "corrupt" in reason("tampered")
    assert "safetensors" in reason("liar")
    assert "symbolic link" in reason("linked-folder") and "symbolic link" in reason("linked-file")
    assert "incomplete" in reason("pickled")


def test_damaged_and_good_adapters_in_one_batch(served):
    """Requests for damaged adapters, good adapters and the base at the same time: the
    damaged ones fail alone; everyone else gets the answer they get alone."""
    models = [*DAMAGED, BASE, *GOOD] * 2

    def ask(model: str):
        resp = httpx.post(f"{served.url}{CHAT}", json={"model": model, "messages": HI, "max_tokens": 4,
                                                       "temperature": 0}, timeout=60)
        return model, resp

    with cf.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(ask, models))
    for model, resp in results:
        if model in DAMAGED:
            assert_error(resp, 422, served, code="adapter_unavailable")
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] == served.reference[model]


def test_no_hostile_request_left_a_traceback_in_the_log(served):
    """Runs last: nothing above made the server crash or log an unhandled exception."""
    assert served.proc.poll() is None
    log = served.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
