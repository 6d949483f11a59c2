"""Grammar-constrained rows in the engine (tiny model, no server): the end-of-turn token
is allowed only once the grammar is complete, a complete grammar ends the row with
"stop", and rows without a constraint answer exactly as in a batch with none."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from conftest import TEST_DEVICE
from hatrack.chat_format import end_of_turn_ids
from hatrack.server.engine import Engine, SamplingParams
from hatrack.server.engine.constraints import GrammarCompiler, GrammarError

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "ok"], "additionalProperties": False}
PROMPTS = ["The weather in Paris is", "def fibonacci(n):", "Dear customer, thank you for", "Order 42:"]


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval().to(TEST_DEVICE)
    return model, AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def compiler(tiny):
    _, tokenizer = tiny
    return GrammarCompiler(tokenizer, tuple(end_of_turn_ids(tokenizer)))


def test_end_of_turn_is_allowed_only_when_the_json_is_complete(tiny, compiler):
    _, tokenizer = tiny
    vocab = 49152
    row = compiler.json_schema(SCHEMA)()
    stops = compiler.stop_ids
    tokens = tokenizer('{"id":7,"ok":true}', add_special_tokens=False)["input_ids"]
    for token in tokens:
        mask = row.allowed_mask(vocab)
        assert mask[token] and not mask[stops].any()
        assert not row.is_done()
        row.accept(token)
    assert row.is_done()  # nothing can follow the closing brace
    # a second row from the same compiled schema starts fresh
    assert compiler.json_schema(SCHEMA)().allowed_mask(vocab)[tokens[0]]


def test_unusable_schema_names_the_problem(compiler):
    with pytest.raises(GrammarError, match="look-around"):
        compiler.json_schema({"type": "string", "pattern": "(?=a)b"})


def test_constrained_rows_validate_and_free_rows_are_unchanged(tiny, compiler):
    model, tokenizer = tiny
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    grammar = compiler.json_schema(SCHEMA)
    free = SamplingParams(max_tokens=24, temperature=0.0)
    bound = SamplingParams(max_tokens=24, temperature=0.0, constraint=grammar)
    with Engine(model, tokenizer, max_batch=8) as engine:
        plain = [engine.submit(p, None, free) for p in prompts]
        plain = [h.result(timeout=120) for h in plain]
        mixed = [engine.submit(p, None, bound if i % 2 else free) for i, p in enumerate(prompts)]
        mixed = [h.result(timeout=120) for h in mixed]
        alone = engine.submit(prompts[1], None, bound).result(timeout=120)
    for i, (tokens, finish) in enumerate(mixed):
        if i % 2:
            assert finish == "stop"
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)
        else:
            assert (tokens, finish) == plain[i]  # bit-identical greedy answer beside constrained rows
    assert mixed[1] == alone
