"""The registry as vLLM's LoRA resolver (hatrack.integrations.resolver), on real SQLite
registries and real adapter folders, without vLLM; and the unloads `hatrack alias`
sends to vLLM replicas when an alias moves."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import adapter_variant, hatrack_cli, tiny_registry, write_peft_adapter

from hatrack.integrations.resolver import RegistryResolver
from hatrack.registry.store import hash_folder


@pytest.fixture(scope="module")
def adapters(tiny_base_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    first = write_peft_adapter(tiny_base_dir, root / "v1", seed=11)
    return {"v1": first, "v2": adapter_variant(first, root / "v2", "second"),
            "v3": adapter_variant(first, root / "v3", "third")}


@pytest.fixture()
def reg(hatrack_home: Path, tiny_base_dir: Path, adapters):
    registry = tiny_registry(tiny_base_dir)
    for key in ("v1", "v2", "v3"):
        registry.register(adapters[key], name="acme", base="tiny")
    registry.set_alias("acme", "prod", 1, force=True)
    registry.set_alias("acme", "staging", 2)
    return registry


def test_names_resolve_to_verified_store_folders(reg, tiny_base_dir: Path, monkeypatch):
    monkeypatch.delenv("HATRACK_VLLM_BASE", raising=False)
    resolver = RegistryResolver(reg)
    served = str(tiny_base_dir)  # vLLM passes its --model: the base's folder
    got = {name: resolver.resolve(served, name) for name in ("acme", "acme@3", "acme@staging", "acme@prod")}
    assert {n: r.label for n, r in got.items()} == {
        "acme": "acme@1", "acme@3": "acme@3", "acme@staging": "acme@2", "acme@prod": "acme@1"}
    for name, found in got.items():
        record = reg.get_version("acme", int(found.label.split("@")[1]))
        assert found.lora_name == name and found.sha256 == record.sha256 == hash_folder(found.path)
        assert found.int_id == record.id and 0 < found.int_id < 2**31 and found.base_name == "tiny"
    assert resolver.resolve(served, "acme@3").int_id == got["acme@3"].int_id  # stable per version
    assert len({got["acme@3"].int_id, got["acme@staging"].int_id, got["acme"].int_id}) == 3

    reg.set_alias("acme", "prod", 3, force=True)  # the resolver reads the move at once
    assert resolver.resolve(served, "acme").label == "acme@3" and resolver.resolve(served, "acme@prod").label == "acme@3"

    # the served base named by registry name, by HATRACK_VLLM_BASE, or not at all
    assert RegistryResolver(reg).resolve("tiny", "acme@2").label == "acme@2"
    assert RegistryResolver(reg, base_name="tiny").resolve("/somewhere/else", "acme@2").label == "acme@2"
    assert RegistryResolver(reg).resolve("/not/a/registered/base", "acme@2") is None


def test_the_base_name_resolves_to_an_adapter_that_adds_nothing(reg, tiny_base_dir: Path, tmp_path: Path,
                                                                monkeypatch):
    from safetensors.numpy import load_file

    from hatrack.registry.lineage import check_fits

    monkeypatch.setenv("HATRACK_VLLM_ZERO_DIR", str(tmp_path / "zero"))
    found = RegistryResolver(reg, base_name="tiny").resolve("x", "tiny")
    assert found.lora_name == "tiny" and found.path.parent == tmp_path / "zero" and found.int_id == 2**31 - 1
    tensors = load_file(str(found.path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 and all(not t.any() for t in tensors.values())  # A and B on both q_proj
    assert check_fits(found.path, tiny_base_dir, "tiny").summary()["rank"] == 1  # hatrack could serve it too
    again = RegistryResolver(reg, base_name="tiny").resolve("x", "tiny")
    assert again.path == found.path and again.sha256 == found.sha256


def test_unknown_pruned_and_foreign_names_are_none(reg, tiny_base_dir: Path):
    resolver = RegistryResolver(reg, base_name="tiny")
    for name in ("nobody", "acme@9", "acme@canary", "Not A Name", "acme@0"):
        assert resolver.resolve(str(tiny_base_dir), name) is None, name
    reg.delete_alias("acme", "staging")
    result = reg.prune(reg.plan_prune(name="acme", keep_last=1))  # prod's acme@1 is kept
    assert result.removed == ["acme@2"]
    assert resolver.resolve(str(tiny_base_dir), "acme@2") is None  # pruned
    assert resolver.resolve(str(tiny_base_dir), "acme@1").label == "acme@1"
    assert resolver.resolve(str(tiny_base_dir), "acme@3").label == "acme@3"


def test_a_version_on_another_base_is_refused(reg, tiny_base_dir: Path, adapters, caplog):
    # same shapes, other weights: another base name, then the same name with other bytes
    reg.add_base("other", str(tiny_base_dir), tiny_base_dir, "0" * 64)
    reg.register(adapters["v1"], name="globex", base="other")
    resolver = RegistryResolver(reg, base_name="tiny")
    with caplog.at_level("WARNING", logger="hatrack.vllm"):
        assert resolver.resolve(str(tiny_base_dir), "globex") is None
    assert "globex@1 was trained on base 'other'" in caplog.text and "not on the served 'tiny'" in caplog.text
    assert RegistryResolver(reg, base_name="other").resolve("x", "globex").label == "globex@1"
    assert RegistryResolver(reg, base_name="other").resolve("x", "acme@1") is None


def test_a_tampered_artifact_is_refused_and_verification_is_cached(reg, tiny_base_dir: Path, monkeypatch, caplog):
    resolver = RegistryResolver(reg, base_name="tiny")
    hashed: list[str] = []
    real_open = reg.open_artifact
    monkeypatch.setattr(reg, "open_artifact", lambda sha, verify=True: hashed.append(sha) or real_open(sha, verify))
    first = resolver.resolve("x", "acme@2")
    for _ in range(3):
        assert resolver.resolve("x", "acme@2").path == first.path
    assert hashed == [first.sha256]  # hashed once while the folder stays as it was

    weights = first.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    with caplog.at_level("WARNING", logger="hatrack.vllm"):
        assert resolver.resolve("x", "acme@2") is None
    assert "acme@2" in caplog.text and "is corrupt" in caplog.text
    assert resolver.resolve("x", "acme@3") is not None  # other versions unaffected


class _Replica:
    """A loopback HTTP endpoint with vLLM's unload contract: 200 for a loaded name
    (which it then forgets), 404 otherwise; it records every name posted."""

    def __init__(self, loaded: set[str]) -> None:
        self.loaded, self.posted = set(loaded), []
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                replica.posted.append((self.path, body["lora_name"]))
                known = body["lora_name"] in replica.loaded
                replica.loaded.discard(body["lora_name"])
                self.send_response(200 if known else 404)
                self.end_headers()
                self.wfile.write(b"ok" if known else b'{"error": "not found"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_alias_moves_unload_the_moved_names_on_replicas(reg, hatrack_home: Path):
    replica = _Replica({"acme@prod", "acme", "acme@staging"})
    cli = hatrack_cli(dict(os.environ, HATRACK_HOME=str(hatrack_home), HATRACK_VLLM_REPLICAS=f"{replica.url},"))
    out = cli("alias", "acme", "prod", "3", "--force").stdout
    assert replica.posted == [("/v1/unload_lora_adapter", "acme@prod"), ("/v1/unload_lora_adapter", "acme")]
    assert f"vLLM {replica.url} acme@prod: unloaded" in out and f"vLLM {replica.url} acme: unloaded" in out
    cli("alias", "acme", "canary", "2")  # a new alias: nothing was loaded under it
    assert replica.posted[-1][1] == "acme@canary" and replica.loaded == {"acme@staging"}

    by_hand = json.loads(cli("vllm", "unload", "acme@staging", "acme@2", "--replica", replica.url, "--json").stdout)
    assert [(r["name"], r["status"]) for r in by_hand] == [("acme@staging", "unloaded"), ("acme@2", "not loaded")]

    replica.server.shutdown()
    replica.server.server_close()
    # the alias still moves when a replica is down; the failure is reported on stderr
    moved = cli("alias", "acme", "staging", "3")
    assert moved.stdout.startswith("acme@staging -> acme@3") and "acme@staging: failed" in moved.stderr
    down = cli("vllm", "unload", "acme", "--replica", replica.url, ok=False)
    assert down.returncode == 1 and down.stderr.startswith("error: 1 unload(s) failed, first: http://127.0.0.1:")
    none = cli("vllm", "unload", "acme", ok=False, env={"HATRACK_VLLM_REPLICAS": ""})
    assert none.stderr == "error: no replica: give --replica URL or set HATRACK_VLLM_REPLICAS\n"
