"""`hatrack export` and `hatrack vllm command` through the real console script, on a
real SQLite registry with a real adapter on the tiny base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import adapter_variant, hatrack_cli, tiny_registry, write_peft_adapter

from hatrack.hashing import sha256_file
from hatrack.registry import ScoreIn


@pytest.fixture(scope="module")
def adapter(tiny_base_dir: Path, tmp_path_factory) -> Path:
    return write_peft_adapter(tiny_base_dir, tmp_path_factory.mktemp("adapters") / "a", seed=5, rank=4)


@pytest.fixture()
def setup(hatrack_home: Path, tiny_base_dir: Path, adapter: Path, default_base_dir: Path, tmp_path: Path):
    reg = tiny_registry(tiny_base_dir)
    reg.register(adapter, name="acme", base="tiny", tags={"customer": "acme"},
                 scores=[ScoreIn("eval_loss", 1.5, base_value=2.0, rows=10)])
    reg.register(adapter_variant(adapter, tmp_path / "v2", "two"), name="acme", base="tiny", parent_version=1)
    reg.set_alias("acme", "prod", 1, force=True)
    cli = hatrack_cli(dict(os.environ, HATRACK_HOME=str(hatrack_home),
                           HATRACK_BASES_DIR=str(default_base_dir.parent)))
    return reg, cli


def test_export_layouts_carry_the_registered_bytes_and_lineage(setup, tiny_base_dir: Path, tmp_path: Path):
    reg, cli = setup
    v1, v2 = reg.get_version("acme", 1), reg.get_version("acme", 2)
    stored = reg.open_artifact(v1.sha256)

    out = json.loads(cli("export", "acme@prod", str(tmp_path / "peft"), "--json").stdout)
    folder = Path(out["folder"])
    assert out["label"] == "acme@1" and out["layout"] == "peft" and out["sha256"] == v1.sha256
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "hatrack.json"]
    assert sha256_file(folder / "adapter_model.safetensors") == sha256_file(stored / "adapter_model.safetensors")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    lineage = json.loads((folder / "hatrack.json").read_text())
    assert (lineage["name"], lineage["version"], lineage["sha256"]) == ("acme", 1, v1.sha256)
    assert lineage["base"] == {"name": "tiny", "fingerprint": v1.base_fingerprint, "source": str(tiny_base_dir)}
    assert [(s["metric"], s["value"], s["base_value"]) for s in lineage["scores"]] == [("eval_loss", 1.5, 2.0)]
    assert lineage["tags"] == {"customer": "acme"} and lineage["aliases"] == ["prod"] and lineage["parent"] is None
    assert lineage["lora"]["rank"] == 4

    # vllm: DIR/<name>/ naming the --model vLLM runs with (default: the base's folder)
    text = cli("export", "acme@2", str(tmp_path / "vllm"), "--layout", "vllm").stdout
    config = json.loads((tmp_path / "vllm" / "acme" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base_dir) and config["peft_type"] == "LORA"
    assert "acme@2" in text and f"VLLM_LORA_RESOLVER_CACHE_DIR={tmp_path / 'vllm'}" in text
    assert json.loads((tmp_path / "vllm" / "acme" / "hatrack.json").read_text())["parent"] == "acme@1"
    cli("export", "acme@1", str(tmp_path / "vllm"), "--layout", "vllm", "--lora-name", "acme-prod",
        "--base-model", "tiny")  # a second adapter beside the first in the resolver's folder
    assert json.loads((tmp_path / "vllm" / "acme-prod" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "tiny"
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == ["acme", "acme-prod"]

    lorax = json.loads(cli("export", "acme", str(tmp_path / "lorax"), "--layout", "lorax", "--json").stdout)
    assert lorax["label"] == "acme@1" and (tmp_path / "lorax" / "adapter_model.safetensors").is_file()
    assert v2.sha256 != v1.sha256


def test_export_errors_are_one_line_and_write_nothing(setup, tmp_path: Path):
    reg, cli = setup
    unknown = cli("export", "nobody", str(tmp_path / "x"), ok=False)
    assert unknown.returncode == 1 and unknown.stderr == "error: unknown model 'nobody'\n"
    assert cli("export", "acme@7", str(tmp_path / "x"), ok=False).stderr == "error: 'acme' has no version 7\n"
    assert not (tmp_path / "x").exists()
    bad_layout = cli("export", "acme", str(tmp_path / "x"), "--layout", "tgi", ok=False)
    assert bad_layout.stderr == "error: unknown layout 'tgi': use one of peft, vllm, lorax\n"

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    busy = cli("export", "acme", str(full), ok=False)
    assert busy.stderr == f"error: {full}: folder exists and is not empty (use --force to replace it)\n"
    assert (full / "keep.txt").read_text() == "mine"
    cli("export", "acme", str(full), "--force")
    assert sorted(p.name for p in full.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "hatrack.json"]

    sha = reg.get_version("acme", 2).sha256
    weights = reg.store.path(sha) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    tampered = cli("export", "acme@2", str(tmp_path / "t"), ok=False)
    assert tampered.returncode == 1 and tampered.stderr.startswith(f"error: acme@2: artifact {sha[:12]} is corrupt")
    assert tampered.stderr.endswith("nothing exported\n") and not (tmp_path / "t").exists()


def test_vllm_command_fits_the_registry(setup, tiny_base_dir: Path, hatrack_home: Path, tmp_path: Path):
    reg, cli = setup
    command = json.loads(cli("vllm", "command", "tiny", "--json", "--max-loras", "4").stdout)
    argv = command["argv"]
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    opts = dict(zip(argv[3::1], argv[4::1]))
    assert opts["--model"] == str(tiny_base_dir) and opts["--served-model-name"] == "tiny.raw"
    assert opts["--max-lora-rank"] == "8" and opts["--max-loras"] == "4" and "--enable-lora" in argv
    assert command["largest_rank"] == 4 and "tiny is answered through a zero adapter" in command["notes"][0]
    plain = json.loads(cli("vllm", "command", "tiny", "--json", "--plain-base").stdout)["argv"]
    assert plain[plain.index("--served-model-name") + 1] == "tiny"
    assert command["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "hatrack",
                              "HATRACK_VLLM_BASE": "tiny", "HATRACK_HOME": str(hatrack_home)}

    reg.register(write_peft_adapter(tiny_base_dir, tmp_path / "r20", rank=20), name="wide", base="tiny")
    argv = json.loads(cli("vllm", "command", "tiny", "--json").stdout)["argv"]
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    text = cli("vllm", "command", "tiny", "--python", "/opt/v/bin/python").stdout
    assert text.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=hatrack HATRACK_VLLM_BASE=tiny")
    assert "/opt/v/bin/python -m vllm.entrypoints.openai.api_server" in text and "--max-lora-rank 32" in text
    assert cli("vllm", "command", "nobase", ok=False).stderr == "error: unknown base model 'nobase' (see `hatrack base list`)\n"
