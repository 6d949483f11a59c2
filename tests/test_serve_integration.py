"""`hatrack serve` on the real default base, NF4-quantized with bitsandbytes, through a real
server process and the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import pytest
from openai import OpenAI

from conftest import register_random_adapters
from serving import ServerProcess, hatrack_home_env

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served_real(tmp_path_factory, default_base_dir: Path):
    home = tmp_path_factory.mktemp("serve-real")
    # reuse the converted base of the test cache instead of converting again
    os.environ["HATRACK_BASES_DIR"] = str(default_base_dir.parent)
    try:
        with hatrack_home_env(home):
            from hatrack import basemodel
            from hatrack.registry import Registry

            registry = Registry()
            base = basemodel.ensure_base(registry)
            register_random_adapters(registry, base.name, Path(base.path), home / "src",
                                     ["acme-support", "globex-support"], scale=0.05)
            server = ServerProcess(home, "--quantize", "nf4", "--device", "cpu", "--max-loaded", "2", "--no-auth").start()
            yield server, base
            assert server.stop() == 0  # SIGTERM: drains and exits cleanly
    finally:
        os.environ.pop("HATRACK_BASES_DIR", None)


def ask(c: OpenAI, model: str) -> str:
    reply = c.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    return reply.choices[0].message.content


def test_real_base_nf4_answers_and_adapters_differ(served_real):
    server, base = served_real
    c = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ids = {m.id for m in c.models.list().data}
    assert {"smollm2-135m", "acme-support", "globex-support"} <= ids
    base_answer = ask(c, "smollm2-135m")
    assert "Paris" in base_answer  # the real instruction-tuned base, quantized, still knows
    answers = {m: ask(c, m) for m in ("acme-support", "globex-support")}
    assert len({base_answer, *answers.values()}) == 3


def test_real_base_mixed_batch_equals_alone(served_real):
    server, _ = served_real
    c = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    models = ["smollm2-135m", "acme-support", "globex-support"] * 2
    alone = {m: ask(c, m) for m in set(models)}
    with cf.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: (m, ask(c, m)), models))
    for model, text in together:
        assert text == alone[model], model
