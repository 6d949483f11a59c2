"""Keyed serving through a real `hatrack serve` process: open or keyed is chosen at
start, never inferred from how many keys exist, and keys take effect within a second."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
QUESTION = [{"role": "user", "content": "Where is my order?"}]
KEY_BOUND = 1.0  # the server's stated bound for key changes to take effect


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_base_dir: Path):
    """A server started without --no-auth while no key exists yet."""
    home = tmp_path_factory.mktemp("auth-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(registry, BASE, tiny_base_dir, home / "src", ["acme-support", "globex-support"])
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu",
                               "--max-tokens", "4").start()
        yield server, registry
        server.stop()


def chat(server, key: str | None, model: str = "acme-support") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers,
                      json={"model": model, "messages": QUESTION, "max_tokens": 2})


def until(check, seconds: float) -> float:
    """Seconds until check() held, polling; fails after `seconds`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            pytest.fail(f"not true within {seconds}s")
        time.sleep(0.05)


def assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_keyed_server_with_no_keys_refuses_everyone_and_says_why_in_the_log(keyed):
    server, _ = keyed
    assert_401(chat(server, None))
    assert_401(chat(server, "hr-not-a-key"))
    assert_401(httpx.get(f"{server.url}/v1/models"))
    assert httpx.get(f"{server.url}/health").status_code == 200
    log = server.log.read_text()
    assert "no API keys exist yet" in log and "--no-auth" in log and "hatrack keys create" in log


def test_new_key_works_at_once_and_sees_only_its_adapters(keyed):
    server, registry = keyed
    _, secret = registry.create_key("acme", ["acme-*"])
    assert chat(server, secret).status_code == 200  # an unknown secret is never cached
    assert_401(chat(server, "wrong-key"))
    assert_401(chat(server, None))
    c = OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="globex-support", messages=QUESTION, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"  # exists, but not this tenant's
    ids = {m.id for m in c.models.list().data}
    assert "acme-support" in ids and "globex-support" not in ids


def test_revoking_every_key_refuses_every_request_within_a_second(keyed):
    """Runs last in this module: it leaves no valid key behind."""
    server, registry = keyed
    _, acme = registry.create_key("acme", ["acme-*"])
    _, globex = registry.create_key("globex", ["globex-*"])
    assert chat(server, acme).status_code == 200
    assert chat(server, globex, "globex-support").status_code == 200
    for key in registry.list_keys():
        if key.revoked is None:
            registry.revoke_key(key.id)
    took = until(lambda: chat(server, acme).status_code == 401
                 and chat(server, globex, "globex-support").status_code == 401, KEY_BOUND + 0.5)
    assert took <= KEY_BOUND + 0.5
    assert_401(chat(server, acme))
    assert_401(chat(server, None))  # no key left does not mean open
    assert_401(httpx.get(f"{server.url}/v1/models"))
    # and a key created now works on its first request
    _, fresh = registry.create_key("initech", ["acme-*"])
    assert chat(server, fresh).status_code == 200
