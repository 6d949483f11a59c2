"""Training runs on the tiny model: repeatable by seed, registered with lineage and scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hatrack.errors import HatrackError
from hatrack.trainer import TrainConfig, evaluate, train


@pytest.fixture()
def registry(hatrack_home, tiny_base_dir):
    from hatrack import basemodel
    from hatrack.registry import Registry

    reg = Registry()
    basemodel.add_base(reg, "tiny", str(tiny_base_dir))
    return reg


def _config(data: Path, **kw) -> TrainConfig:
    return TrainConfig(**({"data": str(data), "name": "codes", "base": "tiny", "max_steps": 4, "batch_size": 4,
                           "lr": 1e-3, "eval_split": 0.15} | kw))


def test_seeded_runs_repeat_the_same_loss_curve(registry, codes):
    first = train(_config(codes), registry, progress=False)
    second = train(_config(codes), registry, progress=False)
    other = train(_config(codes, seed=1), registry, progress=False)
    curve = first.metrics["loss_curve"]
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert curve == second.metrics["loss_curve"]
    assert curve != other.metrics["loss_curve"]
    assert (first.version, second.version, other.version) == (1, 2, 3)
    assert first.sha256 == second.sha256  # same seed and data: byte-identical adapter


def test_registered_version_carries_lineage_and_scores(registry, codes, hatrack_home):
    out = train(_config(codes, tags={"customer": "acme"}), registry, progress=False)
    rec = registry.get_version("codes", out.version)
    assert rec.status == "ready" and rec.base_name == "tiny" and rec.quantization in ("nf4", "none")
    assert rec.dataset_sha256 == out.scores[0].dataset_sha256 and rec.dataset_rows == 24
    assert rec.dataset_source == str(codes) and rec.seed == 42
    assert rec.train_config["rank"] == 16 and rec.train_config["max_steps"] == 4
    assert set(rec.lib_versions) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert rec.chat_template_sha256 and len(rec.chat_template_sha256) == 64
    metrics = rec.train_metrics
    assert metrics["steps"] == 4 and metrics["tokens_per_s"] > 0 and len(metrics["loss_curve"]) == 4
    assert 0 < metrics["trained_token_share"] < 1
    scores = {s.metric: s for s in out.scores}
    assert set(scores) == {"eval_loss", "perplexity", "exact_match", "contains"}
    assert all(s.base_value is not None and s.split == "heldout" for s in out.scores)
    assert scores["eval_loss"].value != scores["eval_loss"].base_value
    assert (out.artifact_dir / "adapter_model.safetensors").is_file()
    assert not (hatrack_home / "runs" / f"codes-{rec.dataset_sha256[:12]}").exists()  # checkpoints cleaned up

    extra = codes.with_name("extra.jsonl")
    extra.write_text(codes.read_text())
    added = evaluate(registry, "codes@1", str(extra), progress=False)
    assert {s.metric for s in added} == set(scores) and all(s.split == "eval:extra.jsonl" for s in added)
    info = registry.version_info("codes", 1)
    assert "eval:extra.jsonl" in json.dumps(info, default=str)


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "fp32"), ("bfloat16", "bf16")])
def test_dtype_picks_the_compute_dtype_and_the_scores_say_so(registry, codes, dtype, precision):
    out = train(_config(codes, dtype=dtype, quantize="none", max_steps=2), registry, progress=False)
    rec = registry.get_version("codes", out.version)
    assert rec.train_metrics["compute_dtype"] == dtype and rec.train_config["dtype"] == dtype
    assert {s.precision for s in out.scores} == {precision}


def test_resume_without_checkpoint_and_bad_config_are_refused(registry, codes):
    with pytest.raises(HatrackError, match=r"nothing to resume for codes"):
        train(_config(codes, resume=True), registry, progress=False)
    with pytest.raises(HatrackError, match=r"invalid name 'Bad Name'"):
        train(_config(codes, name="Bad Name"), registry, progress=False)
    with pytest.raises(HatrackError, match=r"--quantize must be one of nf4, int8, int8wo, none; got 'fp8'"):
        train(_config(codes, quantize="fp8"), registry, progress=False)
    assert registry.list_versions(name="codes") == []
