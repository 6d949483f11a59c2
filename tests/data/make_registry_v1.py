"""Makes tests/data/registry-v1.sql: a registry written by hatrack's first released
schema (version 1), with rows in every table, dumped as SQL text (sqlite3 iterdump).

It was run once with the hatrack of commit 1865d15 (schema version 1):

    git worktree add /tmp/hatrack-v1 1865d15
    cd /tmp/hatrack-v1 && python tests/data/make_registry_v1.py tests/data/registry-v1.sql

Run again, it gives the same rows except for times and API key ids and hashes. Only
the Registry's public methods write the rows; the base and the adapters are tiny
hand-written safetensors files (no torch). test_registry_migrations.py rebuilds the
same base (`write_base`) to register new versions on an upgraded copy.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import sys
import tempfile
from pathlib import Path

HIDDEN = 8
RANK = 2
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
BASE_NAME = "tiny-v1"


def _safetensors(path: Path, tensors: dict[str, tuple[list[int], float]]) -> None:
    """F32 tensors filled with one value each, written without torch."""
    header, blobs, offset = {}, [], 0
    for name, (shape, fill) in tensors.items():
        count = 1
        for d in shape:
            count *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * count]}
        blobs.append(struct.pack(f"<{count}f", *([fill] * count)))
        offset += 4 * count
    raw = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_base(folder: Path, with_template: bool = True, fill: float = 0.5) -> Path:
    """A deterministic two-module 'base': same bytes, same fingerprint, every time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    _safetensors(folder / "model.safetensors", {f"{m}.weight": ([HIDDEN, HIDDEN], fill) for m in MODULES})
    if with_template:
        (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return folder


def write_adapter(folder: Path, marker: str, fill: float = 0.01) -> Path:
    """A LoRA folder that fits write_base's modules; `marker` changes its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
         "revision": marker}, sort_keys=True))
    tensors = {}
    for m in MODULES:
        tensors[f"base_model.model.{m}.lora_A.weight"] = ([RANK, HIDDEN], fill)
        tensors[f"base_model.model.{m}.lora_B.weight"] = ([HIDDEN, RANK], -fill)
    _safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


def populate(work: Path) -> Path:
    """Fill a registry in work/home through the Registry API; return its database file."""
    os.environ["HATRACK_HOME"] = str(work / "home")
    os.environ.pop("HATRACK_DB_URL", None)
    from hatrack import basemodel
    from hatrack.registry import DatasetInfo, Registry, ScoreIn

    reg = Registry()
    # the second base has other weights (another fingerprint) and no chat template
    for name, with_template, fill in ((BASE_NAME, True, 0.5), ("plain-base", False, 0.25)):
        folder = write_base(work / "bases" / name, with_template, fill)
        reg.add_base(name, f"hand-made:{name}", folder, basemodel.fingerprint(folder),
                     basemodel.chat_template_sha256(folder))

    def scores(loss: float, base_loss: float, split: str = "heldout", answers: bool = True) -> list[ScoreIn]:
        out = [ScoreIn("eval_loss", loss, base_loss, "d" * 64, split),
               ScoreIn("perplexity", 2.0 ** loss, 2.0 ** base_loss, "d" * 64, split)]
        if answers:
            out += [ScoreIn("exact_match", 0.375, 0.125, "d" * 64, split),
                    ScoreIn("contains", 0.5, None, "d" * 64, split)]
        return out

    config = {"rank": 16, "alpha": 32, "lr": 0.0002, "targets": "all-linear", "epochs": 1,
              "tags": {"customer": "acme"}, "quantize": "nf4", "eval_split": 0.1}
    metrics = {"final_loss": 1.375, "steps": 12, "runtime_s": 3.5, "tokens_per_s": 812.5,
               "loss_curve": [[1, 2.5], [6, 1.75], [12, 1.375]], "heldout_rows": 3,
               "heldout_samples": {"adapter": ["ok"], "expected": ["ok ✓"]}, "resumed": False}
    libs = {"hatrack": "0.1.0", "torch": "2.13.0", "peft": "0.17.0"}
    adapters = work / "adapters"
    reg.register(write_adapter(adapters / "a1", "a1"), name="acme-support", base=BASE_NAME,
                 tags={"customer": "acme", "team": "support"}, quantization="nf4",
                 dataset=DatasetInfo("d" * 64, 24, "acme.jsonl"), train_config=config, seed=7,
                 train_metrics=metrics, lib_versions=libs, scores=scores(1.5, 2.25))
    reg.register(write_adapter(adapters / "a2", "a2"), name="acme-support", base=BASE_NAME,
                 tags={"customer": "acme"}, parent_version=1, quantization="nf4",
                 dataset=DatasetInfo("e" * 64, 30, "acme-more.jsonl"), train_config=config | {"resume": True},
                 seed=8, train_metrics=metrics | {"final_loss": 1.125}, lib_versions=libs,
                 scores=scores(1.25, 2.25))
    reg.register(write_adapter(adapters / "a1", "a1"), name="acme-support", base=BASE_NAME)  # same content as v1
    reg.register(write_adapter(adapters / "g1", "g1", 0.02), name="globex-faq", base="plain-base",
                 tags={"customer": "globex", "note": "naïve ✓ 'quoted'"}, seed=0,
                 train_metrics={"final_loss": None, "steps": 0}, scores=scores(0.75, 0.5, answers=False))
    reg.add_scores("acme-support", 2, scores(1.0, 2.0, split="eval:extra.jsonl"))
    reg.set_tags("acme-support", 3, {"stage": "candidate"})

    reg.set_alias("acme-support", "prod", 1)
    reg.set_alias("acme-support", "prod", 2)
    reg.set_alias("acme-support", "staging", 3)
    reg.set_alias("acme-support", "canary", 3)
    reg.delete_alias("acme-support", "canary")
    reg.set_alias("globex-faq", "prod", 1, force=True)  # worse than its base: forced
    reg.create_key("acme", ["acme-*"])
    revoked, _ = reg.create_key("globex", ["globex-faq", "shared-*"])
    reg.revoke_key(revoked.id)
    reg.engine.dispose()
    return work / "home" / "registry.db"


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = populate(Path(tmp))
        conn = sqlite3.connect(db)
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        if version != 1:
            raise SystemExit(f"this registry has schema version {version}: run with the schema-1 hatrack")
        text = "\n".join(conn.iterdump()) + "\n"
        conn.close()
    Path(out).write_text(text)
    print(f"wrote {out} ({text.count('INSERT INTO')} rows)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("registry-v1.sql")))
