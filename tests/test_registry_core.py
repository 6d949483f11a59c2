"""Registering, resolving and opening adapters: real SQLite files, real PEFT folders."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import adapter_variant as variant
from conftest import hand_adapter, tiny_registry, write_peft_adapter

from hatrack.registry import ArtifactError, InvalidNameError, LineageError, NotFoundError, Registry

TINY = "tiny"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    a = write_peft_adapter(tiny_base_dir, root / "a", seed=1)
    return {"a": a, "b": variant(a, root / "b", "b"), "c": variant(a, root / "c", "c")}


@pytest.fixture()
def reg(registry_db: str, hatrack_home: Path, tiny_base_dir: Path) -> Registry:
    return tiny_registry(tiny_base_dir)


def test_register_versions_resolve_and_open(reg: Registry, adapters, hatrack_home: Path):
    v1 = reg.register(adapters["a"], name="acme-support", base=TINY, tags={"customer": "acme"})
    v2 = reg.register(adapters["a"], name="acme-support", base=TINY)
    v3 = reg.register(adapters["b"], name="acme-support", base=TINY)
    assert [v1.version, v2.version, v3.version] == [1, 2, 3]
    assert v1.sha256 == v2.sha256 != v3.sha256
    store = hatrack_home / "store"
    assert sorted(p.name for p in store.iterdir()) == sorted({v1.sha256, v3.sha256})  # one copy per content
    assert (hatrack_home / "registry.db").is_file() == (not os.environ.get("HATRACK_DB_URL"))

    # sha256 is over the two stored files in name order, each as name + NUL + bytes
    folder = reg.open_artifact(v1.sha256)
    assert folder == store / v1.sha256
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    assert v1.sha256 == digest.hexdigest()
    assert (folder / "adapter_model.safetensors").read_bytes() == (adapters["a"] / "adapter_model.safetensors").read_bytes()

    newest = reg.resolve("acme-support")
    assert (newest.kind, newest.version, newest.sha256, newest.label) == ("adapter", 3, v3.sha256, "acme-support@3")
    assert reg.resolve("acme-support@1").sha256 == v1.sha256
    base = reg.resolve(TINY)
    assert (base.kind, base.version, base.sha256, base.label) == ("base", None, None, TINY)
    assert newest.base_fingerprint == base.base_fingerprint == reg.get_base(TINY).fingerprint
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.resolve("acme-support@9")
    with pytest.raises(NotFoundError, match="unknown model 'nobody'"):
        reg.resolve("nobody")
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        reg.resolve("acme-support@staging")

    # a fresh Registry on the same files sees the same thing
    again = Registry()
    assert again.resolve("acme-support").version == 3
    assert again.get_version("acme-support", 1).sha256 == v1.sha256


def test_add_base_is_idempotent_and_refuses_new_weights_under_old_name(reg: Registry, tiny_base_dir: Path):
    first = reg.get_base(TINY)
    same = reg.add_base(TINY, str(tiny_base_dir), tiny_base_dir, first.fingerprint)
    assert same.fingerprint == first.fingerprint and len(reg.list_bases()) == 1
    with pytest.raises(Exception, match="already registered with fingerprint"):
        reg.add_base(TINY, "elsewhere", tiny_base_dir, "0" * 64)
    with pytest.raises(NotFoundError, match="unknown base model 'llama-x'"):
        reg.register(tiny_base_dir, name="x", base="llama-x")


def test_corrupt_or_missing_artifact_is_refused_on_open(reg: Registry, adapters):
    v = reg.register(adapters["a"], name="acme", base=TINY)
    weights = reg.open_artifact(v.sha256) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        reg.open_artifact(v.sha256)
    assert reg.open_artifact(v.sha256, verify=False).is_dir()  # the caller's choice
    report = reg.check()
    assert not report.ok and [(p.kind, p.versions) for p in report.problems] == [("corrupt", ["acme@1"])]
    import shutil

    shutil.rmtree(weights.parent)
    with pytest.raises(ArtifactError, match="missing"):
        reg.open_artifact(v.sha256)


def test_lineage_mismatch_names_module_and_both_shapes(reg: Registry, tmp_path: Path, hatrack_home: Path):
    # q_proj of the tiny base is (out=64, in=64); this lora_A claims in=32
    bad = hand_adapter(tmp_path / "bad", {f"{Q}.lora_A.weight": [8, 32], f"{Q}.lora_B.weight": [64, 8]})
    with pytest.raises(LineageError) as err:
        reg.register(bad, name="acme", base=TINY)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "[8, 64]" in msg and "[8, 32]" in msg
    ghost = hand_adapter(tmp_path / "ghost", {
        "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": [8, 64],
        "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": [128, 8]})
    with pytest.raises(LineageError, match="model.layers.7.mlp.up_proj.*does not have"):
        reg.register(ghost, name="acme", base=TINY)
    good = hand_adapter(tmp_path / "good", {f"{Q}.lora_A.weight": [4, 64], f"{Q}.lora_B.weight": [64, 4]})
    assert reg.register(good, name="acme", base=TINY).version == 1  # only the good one got stored
    assert len(list((hatrack_home / "store").iterdir())) == 1


def test_unsafe_or_broken_folders_are_refused_before_storing(reg: Registry, adapters, tmp_path: Path,
                                                               hatrack_home: Path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ArtifactError, match="pickle files are not loaded for safety"):
        reg.register(pickled, name="acme", base=TINY)
    liar = hand_adapter(tmp_path / "liar", {f"{Q}.lora_A.weight": [8, 64], f"{Q}.lora_B.weight": [64, 8]},
                        claim_extra=4096)
    with pytest.raises(ArtifactError, match="claims bytes"):
        reg.register(liar, name="acme", base=TINY)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="missing adapter_config.json"):
        reg.register(no_config, name="acme", base=TINY)
    for bad in ("../evil", "A B", "x/y", "", "-lead", "acme\n"):
        with pytest.raises(InvalidNameError):
            reg.register(adapters["a"], name=bad, base=TINY)
    assert list((hatrack_home / "store").iterdir()) == []
    assert reg.list_versions() == []
    with pytest.raises(InvalidNameError, match="is a base model"):
        reg.register(adapters["a"], name=TINY, base=TINY)


def test_registry_imports_no_torch():
    code = "import hatrack.registry, hatrack.cli.registry_cmds, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


_WORKER = """
import sys, time
from pathlib import Path
from hatrack.registry import Registry
reg = Registry()
folder, worker, gate = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(gate.parent / f"ready-{worker}").touch()
while not gate.exists():  # all eight register at the same moment
    time.sleep(0.005)
v = reg.register(folder, name="race", base="tiny", tags={"worker": worker})
print(v.version)
"""


def test_eight_processes_registering_one_name_get_eight_versions(reg: Registry, adapters, tmp_path: Path):
    folders = [variant(adapters["a"], tmp_path / f"w{i}", f"w{i}") for i in range(8)]
    gate = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(f), str(i), str(gate)], env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, f in enumerate(folders)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.time() < deadline:
        time.sleep(0.02)
    gate.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outs]
    assert sorted(int(out) for out, _ in outs) == list(range(1, 9))
    rows = reg.list_versions(name="race")
    assert sorted(r["version"] for r in rows) == list(range(1, 9))
    assert sorted(r["tags"]["worker"] for r in rows) == [str(i) for i in range(8)]
    assert len({r["sha256"] for r in rows}) == 8 and reg.check().ok
