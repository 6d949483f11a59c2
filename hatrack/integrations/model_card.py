"""What a pushed repository says about its adapter: a model card built with
huggingface_hub's ModelCard/ModelCardData (PEFT metadata, eval results beside the base's
as model-index entries, the dataset fingerprint and training config), and hatrack's
lineage record, hatrack.json. Both are made from `Registry.version_info`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

LINEAGE_FORMAT = "hatrack.lineage/1"
TASK = "text-generation"


def public_path(value: Any) -> Any:
    """A local file path as its file name: a published card must not show someone's disk.
    Hub ids (owner/name, no extension) and other values pass unchanged."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("eval:"):
        return "eval:" + public_path(value[len("eval:"):])
    if re.match(r"^[a-z][a-z0-9+.-]+:", value):  # pypi:..., hf://...: a name, not a path
        return value
    if value.startswith(("/", "~", "./", "../")) or ("/" in value and Path(value).suffix) or "\\" in value:
        return Path(value.replace("\\", "/")).name
    return value


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """version_info with local paths (dataset source, training data, base folder, eval
    files) reduced to file names, for what is pushed."""
    out = dict(info)
    if out.get("dataset"):
        out["dataset"] = {**out["dataset"], "source": public_path(out["dataset"].get("source"))}
    if out.get("train_config"):
        out["train_config"] = {k: public_path(v) for k, v in out["train_config"].items()}
    out["base_source"] = public_path(out.get("base_source"))
    out["score_rows"] = [{**row, "split": public_path(row.get("split"))} for row in out.get("score_rows") or []]
    return out


def shown_scores(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The newest score row of each metric (what `hatrack show` shows), by metric name."""
    newest: dict[str, dict[str, Any]] = {}
    for row in info.get("score_rows") or []:  # oldest first
        newest[row["metric"]] = row
    return [newest[m] for m in sorted(newest)]


def _dataset_of(row: dict[str, Any], info: dict[str, Any]) -> tuple[str, str]:
    """(dataset type, dataset name) of a score row: the held-out rows of the training data,
    or the file `hatrack eval` read."""
    split = row.get("split") or "heldout"
    if split.startswith("eval:"):
        source = split[len("eval:"):]
        return Path(source).name or source, f"{Path(source).name or source} (hatrack eval)"
    source = (info.get("dataset") or {}).get("source") or "training data"
    return Path(source).name or source, f"held-out rows of {Path(source).name or source}"


def eval_results(info: dict[str, Any]) -> list:
    """One EvalResult per shown score for the adapter, and one beside it for the base
    model alone on the same rows (metric_args.model says which)."""
    from huggingface_hub import EvalResult

    results = []
    for row in shown_scores(info):
        dataset_type, dataset_name = _dataset_of(row, info)
        common = dict(task_type=TASK, dataset_type=dataset_type, dataset_name=dataset_name,
                      dataset_split=row.get("split"), dataset_revision=row.get("dataset_sha256"),
                      metric_type=row["metric"])
        args = {k: v for k, v in (("precision", row.get("precision")), ("rows", row.get("rows"))) if v is not None}
        results.append(EvalResult(**common, metric_value=row["value"], metric_name=f"{row['metric']} (adapter)",
                                  metric_args={"model": "adapter", **args}))
        if row.get("base_value") is not None:
            results.append(EvalResult(**common, metric_value=row["base_value"],
                                      metric_name=f"{row['metric']} (base model alone)",
                                      metric_args={"model": "base", **args}))
    return results


def card_data(info: dict[str, Any], base_model: str, repo_id: str):
    from huggingface_hub import ModelCardData

    tags = ["hatrack", "lora", *(f"{k}={v}" for k, v in sorted((info.get("tags") or {}).items()))]
    dataset = info.get("dataset") or {}
    source = dataset.get("source") or ""
    hub_dataset = source if _looks_like_hub_dataset(source) else None
    return ModelCardData(
        library_name="peft", base_model=base_model, base_model_relation="adapter", pipeline_tag=TASK,
        tags=tags, model_name=repo_id.split("/", 1)[1], eval_results=eval_results(info) or None,
        datasets=[hub_dataset] if hub_dataset else None,
    )


def _looks_like_hub_dataset(source: str) -> bool:
    """A Hugging Face dataset name (owner/name), not a local file the card cannot point at."""
    from hatrack.integrations.hub import _REPO_ID

    return bool(_REPO_ID.match(source)) and not Path(source).suffix and not Path(source).expanduser().exists()


def build_card(info: dict[str, Any], base_model: str, repo_id: str):
    """The README.md of a pushed adapter, as a huggingface_hub ModelCard."""
    from huggingface_hub import ModelCard

    info = public_info(info)
    data = card_data(info, base_model, repo_id)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(info, base_model, repo_id)}")


def _body(info: dict[str, Any], base_model: str, repo_id: str) -> str:
    lora = info.get("lora") or {}
    dataset = info.get("dataset")
    shape = (f"rank {lora.get('rank')}, alpha {lora.get('alpha'):g}, on {' '.join(lora.get('target_modules') or [])}"
             if lora.get("rank") else "LoRA")
    trained = (f"trained on {dataset['rows']} rows of `{Path(dataset['source']).name}`" if dataset
               else "registered from a PEFT folder")
    lines = [
        f"# {repo_id.split('/', 1)[1]}",
        "",
        f"A LoRA adapter ({shape}) for [`{base_model}`](https://huggingface.co/{base_model}), {trained}. "
        f"It was version `{info['label']}` in a hatrack registry, whose lineage "
        f"record is in `hatrack.json` beside this card.",
        "",
        "## Use it",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "```",
        "",
        f"or into a hatrack registry: `hatrack pull {repo_id} --name {info['name']}`.",
        "",
    ]
    scores = shown_scores(info)
    if scores:
        lines += ["## Evaluation", "",
                  "Each score beside the base model's alone on the same rows (lower loss and perplexity are better).",
                  "", "| metric | adapter | base model | data | rows | precision |", "|---|---|---|---|---|---|"]
        for row in scores:
            base = "-" if row.get("base_value") is None else f"{row['base_value']:.4g}"
            lines.append(f"| {row['metric']} | {row['value']:.4g} | {base} | {_dataset_of(row, info)[1]} | "
                         f"{row.get('rows') or '-'} | {row.get('precision') or '-'} |")
        lines.append("")
    lines += ["## Training", ""]
    if dataset:
        lines += [f"- dataset: `{dataset['source']}`, {dataset['rows']} rows, sha256 `{dataset['sha256']}`"]
    if info.get("seed") is not None:
        lines += [f"- seed: {info['seed']}"]
    if info.get("quantization"):
        lines += [f"- base quantization while training: {info['quantization']}"]
    metrics = info.get("train_metrics") or {}
    for key in ("final_loss", "steps", "runtime_s"):
        if metrics.get(key) is not None:
            lines += [f"- {key.replace('_', ' ')}: {metrics[key]}"]
    if info.get("train_config"):
        lines += ["", "Training config:", "", "```json", json.dumps(info["train_config"], indent=2, sort_keys=True),
                  "```"]
    if not dataset and not info.get("train_config"):
        lines += ["No training run is recorded for this version (it was registered from a folder)."]
    return "\n".join(lines) + "\n"


def lineage(info: dict[str, Any], base_model: str) -> dict[str, Any]:
    """hatrack.json: what the registry knows of the version, for whoever pulls it."""
    import hatrack

    info = public_info(info)
    return {
        "format": LINEAGE_FORMAT,
        "hatrack_version": getattr(hatrack, "__version__", None),
        "version": {"label": info["label"], "name": info["name"], "version": info["version"],
                    "created": info.get("created"), "sha256": info["sha256"], "size": info["size"],
                    "parent_version": info.get("parent_version"), "tags": info.get("tags") or {},
                    "lora": info.get("lora")},
        "base": {"name": info["base"], "hub_id": base_model, "source": info.get("base_source"),
                 "fingerprint": info["base_fingerprint"], "chat_template_sha256": info.get("chat_template_sha256")},
        "quantization": info.get("quantization"),
        "dataset": info.get("dataset"),
        "train_config": info.get("train_config"),
        "seed": info.get("seed"),
        "train_metrics": info.get("train_metrics"),
        "lib_versions": info.get("lib_versions"),
        "scores": info.get("score_rows") or [],
        "origin": info.get("origin"),
    }
