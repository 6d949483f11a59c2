"""What was evaluated is what answers: an adapter trained and scored by `hatrack train`
on the real default base answers its held-out rows, through a real `hatrack serve` at
the serving default, exactly as its recorded scores say."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from hatrack.examples import DEMO_QUESTION, EXAMPLES, example_path
from serving import ServerProcess, hatrack_home_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_base_dir: Path):
    """acme-support@1 trained as `hatrack demo` trains it, in a registry of its own."""
    home = tmp_path_factory.mktemp("parity")
    os.environ["HATRACK_BASES_DIR"] = str(default_base_dir.parent)  # the test cache's converted base
    try:
        with hatrack_home_env(home):
            from hatrack import basemodel
            from hatrack.registry import Registry
            from hatrack.trainer import TrainConfig, train

            registry = Registry()
            basemodel.ensure_base(registry)
            spec = EXAMPLES["acme-bikes"]
            config = TrainConfig(data=str(example_path("acme-bikes")), name=spec["adapter"], **spec["train"])
            outcome = train(config, registry, progress=False)
            yield home, registry, config, outcome
    finally:
        os.environ.pop("HATRACK_BASES_DIR", None)


def _heldout(config):
    from hatrack.trainer import data as data_mod

    dataset = data_mod.load_dataset(config.data)
    _, rows = data_mod.split(dataset.examples, config.eval_split, config.seed)
    return [r for r in rows if r.expected is not None]


def test_demo_sized_training_beats_the_base_on_heldout_answers(trained):
    _, _, _, out = trained
    scores = {s.metric: s for s in out.scores}
    assert scores["contains"].value > scores["contains"].base_value
    assert scores["contains"].value >= 0.5, out.metrics.get("heldout_samples")
    assert scores["eval_loss"].value < scores["eval_loss"].base_value


def test_served_answers_match_the_recorded_eval_at_the_serving_default(trained):
    from transformers import AutoTokenizer

    from hatrack import basemodel
    from hatrack.precision import default_serving_quantize, precision_label
    from hatrack.trainer import evaluate
    from hatrack.trainer.evaluation import MAX_NEW_TOKENS, answer_rates

    home, registry, config, out = trained
    recorded = {s.metric: s for s in out.scores}
    serving_default = default_serving_quantize("cpu")
    served_precision = precision_label(serving_default, basemodel.compute_dtype("cpu"))
    # the scores say at which precision they were measured, and it is the one served
    assert {s.precision for s in out.scores} == {served_precision}

    rows = _heldout(config)
    assert len(rows) == recorded["contains"].rows
    base = registry.get_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    longest = max(len(tokenizer(r.expected, add_special_tokens=False)["input_ids"]) for r in rows)
    max_new = min(MAX_NEW_TOKENS, longest + 8)  # what the trainer's evaluation generates

    server = ServerProcess(home, "--device", "cpu", "--no-auth").start()  # no --quantize: the default
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)

        def answer(row) -> str:
            return client.chat.completions.create(model="acme-support", messages=row.prompt, temperature=0,
                                                  max_tokens=max_new).choices[0].message.content or ""

        # all at once: the server batches them, and a batched answer equals the one alone
        with ThreadPoolExecutor(max_workers=len(rows)) as pool:
            answers = list(pool.map(answer, rows))
        phone = client.chat.completions.create(
            model="acme-support", messages=[{"role": "user", "content": DEMO_QUESTION}], temperature=0,
            max_tokens=48).choices[0].message.content
    finally:
        assert server.stop() == 0
    exact, contains = answer_rates(answers, [r.expected for r in rows])
    samples = json.dumps(list(zip(answers, [r.expected for r in rows]))[:4])
    assert contains == recorded["contains"].value, samples
    assert exact == recorded["exact_match"].value, samples
    assert "555-0142" in phone  # the demo's own question, answered with the number it was taught

    held = home / "heldout.jsonl"
    held.write_text("".join(json.dumps({"messages": r.prompt + [{"role": "assistant", "content": r.expected}]})
                            + "\n" for r in rows))
    rescored = {s.metric: s for s in evaluate(registry, "acme-support@1", str(held), quantize=serving_default,
                                              progress=False)}
    assert rescored["eval_loss"].precision == served_precision
    assert rescored["eval_loss"].value == pytest.approx(recorded["eval_loss"].value, rel=0.02)
