"""The engine on the real default base in NF4 + bf16: rows of a mixed batch answer
exactly as each request served alone."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE, write_peft_adapter
from hatrack.server.engine import AdapterSpec, Engine, SamplingParams, load_peft_adapter

pytestmark = pytest.mark.integration


def test_mixed_batch_on_nf4_base_equals_each_alone(default_base_dir, tmp_path):
    from hatrack import basemodel

    model, tokenizer = basemodel.load_base(default_base_dir, "nf4", TEST_DEVICE, torch.bfloat16)
    folders = [
        write_peft_adapter(default_base_dir, tmp_path / f"a{i}", rank=8, seed=i, scale=0.03) for i in (1, 2)
    ]
    specs = [AdapterSpec(f"a{i}", (lambda f=f: load_peft_adapter(f))) for i, f in enumerate(folders)]
    questions = ["What is the capital of France?", "Write a short greeting for a customer.", "Name three colors."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        for q in questions
    ]
    params = SamplingParams(max_tokens=24, temperature=0)
    jobs = [(prompts[0], specs[0]), (prompts[1], None), (prompts[2], specs[1]), (prompts[0], None), (prompts[1], specs[1])]

    solo = Engine(model, tokenizer, max_loaded=2)
    solo.start()
    try:
        want = [solo.submit(p, a, params).result(timeout=300)[0] for p, a in jobs]
    finally:
        solo.stop()
    assert want[0] != want[3]  # the adapter changes the answer to the same prompt

    batch = Engine(model, tokenizer, max_loaded=2)
    for a in specs:  # adapters into their slots first, so all five rows share every step
        batch.submit(prompts[0], a, SamplingParams(max_tokens=1, temperature=0))
    handles = [batch.submit(p, a, params) for p, a in jobs]
    batch.start()
    try:
        got = [h.result(timeout=300)[0] for h in handles]
    finally:
        batch.stop()
    assert got == want
    assert batch.stats().steps < 2 * params.max_tokens
