"""Aliases and the promotion gate, listings, pruning, the store check and API keys.
Adapters here are hand-written safetensors folders that fit the tiny base (no torch)."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import hand_adapter, tiny_registry
from sqlalchemy import update

from hatrack.registry import GateError, InvalidNameError, NotFoundError, Registry, RegistryError, ScoreIn, key_allows
from hatrack.registry.records import DatasetInfo
from hatrack.registry.tables import AdapterVersion, utcnow

TINY = "tiny"
Q = "base_model.model.model.layers.1.self_attn.v_proj"  # (out=32, in=64) in the tiny base


@pytest.fixture()
def reg(registry_db: str, hatrack_home: Path, tiny_base_dir: Path) -> Registry:
    return tiny_registry(tiny_base_dir)


def adapter(tmp_path: Path, rank: int) -> Path:
    return hand_adapter(tmp_path / f"r{rank}", {f"{Q}.lora_A.weight": [rank, 64], f"{Q}.lora_B.weight": [32, rank]})


def add(reg: Registry, tmp_path: Path, name: str, rank: int, loss: float | None = None,
        base_loss: float | None = 3.0, **kw) -> int:
    scores = [ScoreIn("eval_loss", loss, base_loss)] if loss is not None else None
    return reg.register(adapter(tmp_path, rank), name=name, base=TINY, scores=scores, **kw).version


def test_prod_alias_gate_and_history(reg: Registry, tmp_path: Path):
    add(reg, tmp_path, "acme", 1, loss=2.0)  # v1
    add(reg, tmp_path, "acme", 2, loss=2.5)  # v2: better than base, worse than v1
    add(reg, tmp_path, "acme", 3, loss=3.5)  # v3: worse than the base on the same rows
    add(reg, tmp_path, "acme", 4)  # v4: no eval_loss
    assert reg.resolve("acme").version == 4  # no prod yet: newest ready
    reg.set_alias("acme", "prod", 1)
    assert reg.resolve("acme").version == 1 and reg.resolve("acme@prod").version == 1

    with pytest.raises(GateError, match=r"eval_loss 2\.5 is worse than acme@1 \(current prod\) at 2 "):
        reg.set_alias("acme", "prod", 2)
    with pytest.raises(GateError, match=r"3\.5 is worse than the base model's 3 "):
        reg.set_alias("acme", "prod", 3)
    assert reg.resolve("acme").version == 1  # refused moves changed nothing

    reg.set_alias("acme", "prod", 3, force=True)
    assert reg.resolve("acme").version == 3
    with pytest.raises(GateError, match=r"acme@4 to prod: it has no held-out eval_loss to compare; "
                                        r"score it with `hatrack eval acme@4 --data FILE`, or use --force"):
        reg.set_alias("acme", "prod", 4)
    reg.set_alias("acme", "prod", 4, force=True)
    reg.set_alias("acme", "staging", 2)  # only prod is gated
    assert reg.resolve("acme@staging").version == 2
    with pytest.raises(InvalidNameError, match="never all digits"):
        reg.set_alias("acme", "42", 1)
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.set_alias("acme", "prod", 9)
    reg.delete_alias("acme", "prod")
    assert reg.resolve("acme").version == 4
    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        reg.delete_alias("acme", "prod")

    moves = [(h["from_version"], h["to_version"], h["forced"]) for h in reg.alias_history("acme", "prod")]
    assert moves == [(None, 1, False), (1, 3, True), (3, 4, True), (4, None, False)]

    # scored by `hatrack eval` (no held-out rows): judged against the base on those rows,
    # and against prod only where prod was scored on the same data
    add(reg, tmp_path, "acme", 5)  # v5
    reg.add_scores("acme", 5, [ScoreIn("eval_loss", 3.2, 3.0, "ee" * 32, split="eval:extra.jsonl")])
    with pytest.raises(GateError, match=r"3\.2 is worse than the base model's 3 "):
        reg.set_alias("acme", "prod", 5)
    reg.add_scores("acme", 5, [ScoreIn("eval_loss", 2.8, 3.0, "ee" * 32, split="eval:extra.jsonl")])
    reg.set_alias("acme", "prod", 5)
    add(reg, tmp_path, "acme", 6)  # v6: scored on the same data as prod, and worse
    reg.add_scores("acme", 6, [ScoreIn("eval_loss", 2.9, 3.0, "ee" * 32, split="eval:extra.jsonl")])
    with pytest.raises(GateError, match=r"2\.9 is worse than acme@5 \(current prod\) at 2\.8 "):
        reg.set_alias("acme", "prod", 6)


def test_list_filters_sort_scores_and_show(reg: Registry, tmp_path: Path):
    ds = DatasetInfo(sha256="ab" * 32, rows=120, source="acme.jsonl")
    add(reg, tmp_path, "acme", 1, loss=2.2, tags={"customer": "acme", "tier": "gold"}, dataset=ds,
        train_config={"rank": 1, "lr": 2e-4}, seed=7, train_metrics={"loss_curve": [3.0, 2.5, 2.2]},
        lib_versions={"peft": "0.21"}, quantization="nf4")
    add(reg, tmp_path, "acme", 2, loss=1.9, tags={"customer": "acme"})
    add(reg, tmp_path, "globex", 3, loss=2.0, tags={"customer": "globex"})
    reg.add_scores("acme", 2, [ScoreIn("exact_match", 0.4, 0.1), ScoreIn("eval_loss", 1.8, 3.0)])
    reg.add_scores("acme", 1, [ScoreIn("exact_match", 0.6, 0.1)])

    assert [r["label"] for r in reg.list_versions(tags={"customer": "acme"})] == ["acme@1", "acme@2"]
    assert [r["label"] for r in reg.list_versions(tags={"customer": "acme", "tier": "gold"})] == ["acme@1"]
    assert [r["label"] for r in reg.list_versions(name="globex")] == ["globex@1"]
    assert reg.list_versions(base="other") == []
    by_loss = reg.list_versions(sort="eval_loss")
    assert [r["label"] for r in by_loss] == ["acme@2", "globex@1", "acme@1"]  # lower is better
    assert by_loss[0]["scores"]["eval_loss"] == 1.8  # the latest held-out score wins
    assert [r["label"] for r in reg.list_versions(sort="exact_match")][:2] == ["acme@1", "acme@2"]

    reg.set_tags("acme", 2, {"tier": "silver", "env": "prod"})
    assert reg.remove_tags("acme", 2, ["env", "absent"]) == ["env"]
    reg.set_alias("acme", "prod", 2)
    info = reg.version_info("acme", 1)
    assert info["dataset"] == {"sha256": "ab" * 32, "rows": 120, "source": "acme.jsonl"}
    assert info["train_config"]["lr"] == 2e-4 and info["seed"] == 7 and info["quantization"] == "nf4"
    assert info["train_metrics"]["loss_curve"] == [3.0, 2.5, 2.2]
    assert info["base"] == TINY and info["base_fingerprint"] == reg.get_base(TINY).fingerprint
    assert {(s["metric"], s["base_value"]) for s in info["score_rows"]} == {("eval_loss", 3.0), ("exact_match", 0.1)}
    two = reg.version_info("acme", 2)
    assert two["tags"] == {"customer": "acme", "tier": "silver"} and two["aliases"] == ["prod"]


def test_listing_shows_the_newest_score_whatever_its_split(reg: Registry, tmp_path: Path):
    add(reg, tmp_path, "acme", 1, loss=2.2)  # held out by the training run
    add(reg, tmp_path, "acme", 2, loss=2.0)
    reg.add_scores("acme", 1, [ScoreIn("eval_loss", 1.5, 3.1, split="eval:extra.jsonl", precision="bf16")])

    rows = {r["label"]: r for r in reg.list_versions()}
    assert rows["acme@1"]["scores"] == {"eval_loss": 1.5} and rows["acme@1"]["base_scores"] == {"eval_loss": 3.1}
    assert rows["acme@1"]["score_splits"] == {"eval_loss": "eval:extra.jsonl"}
    assert rows["acme@1"]["score_precisions"] == {"eval_loss": "bf16"}
    assert rows["acme@2"]["score_splits"] == {"eval_loss": "heldout"}
    assert [r["label"] for r in reg.list_versions(sort="eval_loss")] == ["acme@1", "acme@2"]

    with pytest.raises(RegistryError) as err:
        reg.list_versions(sort="nonsense")
    assert str(err.value) == ("unknown sort key 'nonsense': use one of base, created, name, size, version, "
                              "or a metric the listed versions record: eval_loss")
    with pytest.raises(RegistryError, match=r"\(the listed versions record no metrics\)"):
        reg.list_versions(name="nobody", sort="eval_loss")


def test_prune_plans_then_deletes_and_never_touches_aliased(reg: Registry, tmp_path: Path, hatrack_home: Path):
    for rank in (1, 2, 3, 4):
        add(reg, tmp_path, "acme", rank, loss=2.0 + rank / 10)
    reg.register(adapter(tmp_path, 4), name="acme", base=TINY)  # v5 shares v4's content
    reg.set_alias("acme", "prod", 1)
    store = hatrack_home / "store"
    before = sorted(p.name for p in store.iterdir())

    plan = reg.plan_prune(name="acme", keep_last=1)
    assert [i.label for i in plan.remove] == ["acme@2", "acme@3", "acme@4"]
    assert [k["label"] for k in plan.kept] == ["acme@1"]
    v = {i.version: i for i in plan.remove}
    assert plan.free_folders == sorted([v[2].sha256, v[3].sha256])  # v4's folder is still v5's
    assert plan.freed_bytes == sum(sum(f.stat().st_size for f in (store / s).iterdir()) for s in plan.free_folders)
    assert sorted(p.name for p in store.iterdir()) == before  # a plan deletes nothing

    best = reg.plan_prune(name="acme", keep_best=1, by="eval_loss")  # v1 is best (and aliased anyway)
    assert [i.label for i in best.remove] == ["acme@2", "acme@3", "acme@4", "acme@5"]

    result = reg.prune(plan)
    assert result.removed == ["acme@2", "acme@3", "acme@4"] and result.freed_bytes == plan.freed_bytes
    assert [r["version"] for r in reg.list_versions(name="acme")] == [1, 5]
    assert sorted(p.name for p in store.iterdir()) == sorted([reg.resolve("acme@1").sha256, reg.resolve("acme@5").sha256])
    assert reg.check().ok


def test_prune_by_age_and_dataset(reg: Registry, tmp_path: Path):
    data = tmp_path / "old.jsonl"
    data.write_text('{"text": "hello"}\n')
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    add(reg, tmp_path, "acme", 1, dataset=DatasetInfo(digest, 1, str(data)))
    add(reg, tmp_path, "acme", 2, dataset=DatasetInfo("cd" * 32, 1, "new.jsonl"))
    add(reg, tmp_path, "acme", 3)
    with reg.session() as session:  # make v1 and v2 forty days old
        session.exec(update(AdapterVersion).where(AdapterVersion.version < 3)
                     .values(created=utcnow() - timedelta(days=40)))
        session.commit()
    assert [i.label for i in reg.plan_prune(older_than="30d").remove] == ["acme@1", "acme@2"]
    assert [i.label for i in reg.plan_prune(older_than="12h", trained_on=str(data)).remove] == ["acme@1"]
    assert [i.label for i in reg.plan_prune(trained_on="cd" * 32).remove] == ["acme@2"]
    with pytest.raises(Exception, match="nothing to prune by"):
        reg.plan_prune(name="acme")
    with pytest.raises(Exception, match="invalid age '30 days'"):
        reg.plan_prune(older_than="30 days")


def test_check_finds_and_fixes_orphans(reg: Registry, tmp_path: Path, hatrack_home: Path):
    add(reg, tmp_path, "acme", 1)
    orphan = hatrack_home / "store" / ("f" * 64)
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text("{}")
    fresh = hatrack_home / "store" / ("e" * 64)
    fresh.mkdir()  # young: could be a registration in flight, left alone
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    report = reg.check()
    assert not report.ok and [(p.kind, p.target) for p in report.problems] == [("orphan", "f" * 64)]
    fixed = reg.check(fix=True)
    assert fixed.ok and fixed.problems[0].fixed and not orphan.exists() and fresh.exists()
    assert reg.check().ok


def test_keys_hashed_patterns_and_revocation(reg: Registry, registry_db: str, hatrack_home: Path):
    assert not reg.has_keys()
    key, secret = reg.create_key("acme", ["acme-*", "shared"])
    assert secret.startswith("hr-") and len(secret) == 35
    if registry_db == "sqlite":
        assert secret.encode() not in (hatrack_home / "registry.db").read_bytes()  # only its sha256 is stored
    assert reg.has_keys()
    found = reg.authenticate(secret)
    assert found is not None and found.id == key.id and found.tenant == "acme"
    assert reg.authenticate(secret + "x") is None and reg.authenticate("") is None
    assert key_allows(found, "acme-support") and key_allows(found, "acme-support@3") and key_allows(found, "shared")
    assert not key_allows(found, "globex-support")
    reg.revoke_key(key.id)
    assert reg.authenticate(secret) is None and not reg.has_keys()
    assert [k.revoked is not None for k in reg.list_keys()] == [True]
    with pytest.raises(NotFoundError, match="unknown key id"):
        reg.revoke_key("key_nope")
    with pytest.raises(InvalidNameError):
        reg.create_key("acme", ["../*"])
