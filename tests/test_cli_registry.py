"""The registry walkthrough through the real `hatrack` console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import adapter_variant, hatrack_cli, write_peft_adapter

HATRACK = str(Path(sys.executable).with_name("hatrack"))


@pytest.fixture()
def cli(hatrack_home: Path, default_base_dir: Path):
    # the default base is already converted in the test cache: point hatrack at it
    return hatrack_cli(dict(os.environ, HATRACK_HOME=str(hatrack_home),
                            HATRACK_BASES_DIR=str(default_base_dir.parent), COLUMNS="200"))


def test_registry_walkthrough(cli, tiny_base_dir: Path, tmp_path: Path):
    bases = json.loads(cli("base", "list", "--json").stdout)
    assert [b["name"] for b in bases] == ["smollm2-135m"] and len(bases[0]["fingerprint"]) == 64
    assert "tiny" in cli("base", "add", "tiny", str(tiny_base_dir)).stdout

    first = write_peft_adapter(tiny_base_dir, tmp_path / "v1", seed=3)
    second = adapter_variant(first, tmp_path / "v2", "second")
    out = cli("register", str(first), "--name", "acme-support", "--base", "tiny", "--tag", "customer=acme").stdout
    assert "acme-support@1" in out
    cli("register", str(second), "--name", "acme-support", "--base", "tiny", "--tag", "customer=acme",
        "--tag", "round=2")
    cli("register", str(second), "--name", "globex-support", "--base", "tiny", "--tag", "customer=globex")

    rows = json.loads(cli("list", "--tag", "customer=acme", "--json").stdout)
    assert [r["label"] for r in rows] == ["acme-support@1", "acme-support@2"]
    info = json.loads(cli("show", "acme-support@2", "--json").stdout)
    assert info["tags"] == {"customer": "acme", "round": "2"} and info["base"] == "tiny"
    assert len(info["sha256"]) == 64 and info["size"] > 0 and info["lib_versions"] is None

    refused = cli("alias", "acme-support", "prod", "1", ok=False)  # registered unscored: nothing vouches for it
    assert refused.returncode == 1 and refused.stderr == (
        "error: refusing to promote acme-support@1 to prod: it has no held-out eval_loss to compare; "
        "score it with `hatrack eval acme-support@1 --data FILE`, or use --force to promote anyway\n")
    forced = cli("alias", "acme-support", "prod", "1", "--force").stdout
    assert forced == "acme-support@prod -> acme-support@1 (forced)\n"
    cli("tag", "acme-support@2", "stage=rc")
    cli("untag", "acme-support@2", "round")
    shown = cli("show", "acme-support").stdout  # NAME alone: the version prod points at
    assert "acme-support@1" in shown and "customer" in shown


    plan = cli("prune", "--name", "acme-support", "--keep-last", "0").stdout
    assert "remove acme-support@2" in plan and "keep   acme-support@1" in plan and "--yes" in plan
    assert len(json.loads(cli("list", "--name", "acme-support", "--json").stdout)) == 2  # plan only
    done = json.loads(cli("prune", "--name", "acme-support", "--keep-last", "0", "--yes", "--json").stdout)
    assert done["result"]["removed"] == ["acme-support@2"]
    assert done["result"]["removed_folders"] == []  # globex-support@1 shares that content
    table = cli("list").stdout
    assert "acme-support" in table and "globex-support" in table and "prod" in table and "stage=rc" not in table

    report = json.loads(cli("check", "--json").stdout)
    assert report["ok"] and report["versions"] == 2 and report["problems"] == []


def test_errors_are_one_line_and_keys_round_trip(cli, tiny_base_dir: Path, tmp_path: Path):
    cli("base", "add", "tiny", str(tiny_base_dir))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    for args, expected in [
        (("register", str(pickled), "--name", "acme", "--base", "tiny"), "pickle files are not loaded for safety"),
        (("register", str(pickled), "--name", "../evil", "--base", "tiny"), "invalid name '../evil'"),
        (("show", "nobody@3"), "'nobody' has no version 3"),
        (("alias", "acme", "123", "1"), "never all digits"),
        (("prune", "--older-than", "soon"), "invalid age 'soon'"),
        (("list", "--sort", "nonsense"), "unknown sort key 'nonsense': use one of base, created, name, size, version"),
    ]:
        proc = cli(*args, ok=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith("error: ") and expected in proc.stderr and proc.stderr.count("\n") == 1

    broken = cli("list", ok=False, env={"HATRACK_DB_URL": f"sqlite:///{tmp_path}/no/such/dir/registry.db"})
    assert broken.returncode == 1 and broken.stderr.startswith("error: registry database sqlite:")
    assert broken.stderr.count("\n") == 1 and "Traceback" not in broken.stderr

    created = json.loads(cli("keys", "create", "--tenant", "acme", "--allow", "acme-*", "--json").stdout)
    assert created["secret"].startswith("hr-")
    listed = cli("keys", "list", "--json").stdout
    assert created["id"] in listed and created["secret"] not in listed
    cli("keys", "revoke", created["id"])
    assert json.loads(cli("keys", "list", "--json").stdout)[0]["revoked"] is not None
    assert "--keep-best" in cli("prune", "--help").stdout


def test_prune_keeps_the_parents_of_versions_that_stay(cli, tiny_base_dir: Path, tmp_path: Path):
    from conftest import hand_adapter, tiny_registry

    reg = tiny_registry(tiny_base_dir)
    q = "base_model.model.model.layers.1.self_attn.v_proj"  # (out=32, in=64) in the tiny base
    for version, parent in ((1, None), (2, 1), (3, 2), (4, None), (5, None)):  # 3 continues 2, which continues 1
        folder = hand_adapter(tmp_path / f"r{version}", {f"{q}.lora_A.weight": [version, 64],
                                                         f"{q}.lora_B.weight": [32, version]})
        reg.register(folder, name="acme", base="tiny", parent_version=parent)
    reg.set_alias("acme", "staging", 3)

    plan = cli("prune", "--name", "acme", "--keep-last", "1").stdout
    assert plan == (
        "keep   acme@1  (parent of acme@2)\n"
        "keep   acme@2  (parent of acme@3)\n"
        "keep   acme@3  (alias staging)\n"
        "remove acme@4  1.8 KB  not among the 1 newest\n"
        "would free 1.8 KB (1 store folders); run again with --yes to delete\n"
    )
    done = json.loads(cli("prune", "--name", "acme", "--keep-last", "1", "--yes", "--json").stdout)
    assert done["result"]["removed"] == ["acme@4"]
    assert [(k["label"], k["why"]) for k in done["plan"]["kept"]] == [
        ("acme@1", "parent of acme@2"), ("acme@2", "parent of acme@3"), ("acme@3", "alias staging")]
    assert [r["version"] for r in json.loads(cli("list", "--json").stdout)] == [1, 2, 3, 5]


def test_list_table_fits_80_columns_when_piped(hatrack_home: Path, tiny_base_dir: Path, tmp_path: Path):
    from conftest import hand_adapter, tiny_registry

    from hatrack.registry import ScoreIn

    reg = tiny_registry(tiny_base_dir)
    q = "base_model.model.model.layers.1.self_attn.v_proj"
    tags = [{"customer": "acme-corporation-international", "dataset": "support-tickets-2026-q3-cleaned"},
            {"customer": "acme", "note": "retrained after the october incident with fresh rows"}, {}]
    for i, (name, t) in enumerate([("acme-support-assistant", tags[0]), ("acme-support-assistant", tags[1]),
                                   ("globex", tags[2])], 1):
        folder = hand_adapter(tmp_path / f"r{i}", {f"{q}.lora_A.weight": [i, 64], f"{q}.lora_B.weight": [32, i]})
        scores = [ScoreIn("eval_loss", 1.25 + i, 3.0), ScoreIn("perplexity", 12.5 * i, 40.1),
                  ScoreIn("exact_match", 0.25, 0.0), ScoreIn("contains", 0.5, 0.125)] if i < 3 else None
        reg.register(folder, name=name, base="tiny", tags=t, scores=scores)
    reg.set_alias("acme-support-assistant", "prod", 1)
    reg.set_alias("acme-support-assistant", "staging", 2)
    # `hatrack eval` on other data: the table shows that newer score
    reg.add_scores("acme-support-assistant", 2, [ScoreIn("eval_loss", 1.5, 2.75, split="eval:extra.jsonl")])

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([HATRACK, "list"], env=dict(env, HATRACK_HOME=str(hatrack_home)), capture_output=True,
                          text=True, timeout=120)  # stdout is a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "adapters on tiny\n"
        "name                    v  tags                  scores (base's)         aliases\n"
        "──────────────────────  ─  ────────────────────  ──────────────────────  ───────\n"
        "acme-support-assistant  1  customer=acme-corpo…  contains 0.5 (0.125)    prod\n"
        "                           dataset=support-tic…  eval_loss 2.25 (3)\n"
        "                                                 exact_match 0.25 (0)\n"
        "                                                 perplexity 12.5 (40.1)\n"
        "acme-support-assistant  2  customer=acme         contains 0.5 (0.125)    staging\n"
        "                           note=retrained afte…  eval_loss 1.5 (2.75)\n"
        "                                                 exact_match 0.25 (0)\n"
        "                                                 perplexity 25 (40.1)\n"
        "globex                  1  -                     -                       -\n"
        "(size, age left out to fit 80 columns; --json shows every field)\n"
    )
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
