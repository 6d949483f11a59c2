"""The engine from an asyncio event loop (what the HTTP layer does), and adapter files."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from conftest import TEST_DEVICE, write_peft_adapter
from hatrack.server.engine import AdapterFormatError, Engine, SamplingParams, load_peft_adapter


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval().to(TEST_DEVICE)
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_base_dir), max_batch=4)
    engine.start()
    yield engine
    engine.stop(timeout=5)


def test_async_stream_from_event_loop(engine):
    params = SamplingParams(max_tokens=8, temperature=0)

    async def main():
        # submitted on the loop thread; consumed while the scheduler thread produces
        handle = engine.submit([1, 2, 3, 4], None, params)
        events = [event async for event in handle]
        # a handle finished before iteration starts still yields every event
        late = engine.submit([1, 2, 3, 4], None, params)
        await asyncio.get_running_loop().run_in_executor(None, late.result, 30)
        replay = [event async for event in late]
        return handle, events, replay

    handle, events, replay = asyncio.run(main())
    tokens = [e.token_id for e in events]
    assert tokens == handle.result()[0] and len(tokens) == 8
    assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    assert [e.token_id for e in replay] == tokens and replay[-1].finish_reason == "length"


def test_leaving_the_stream_early_cancels(engine):
    async def main():
        handle = engine.submit([5, 6, 7], None, SamplingParams(max_tokens=100_000, temperature=0))
        async for event in handle:
            if event.token_id is not None:
                break
        return handle

    handle = asyncio.run(main())
    tokens, reason = handle.result(timeout=30)
    assert reason == "cancelled" and len(tokens) < 100_000


def test_pickle_and_bad_configs_are_refused(tiny_base_dir, tmp_path):
    folder = write_peft_adapter(tiny_base_dir, tmp_path / "ok", rank=4)
    weights = load_peft_adapter(folder)
    assert weights.rank == 4 and weights.scaling == 16 / 4
    assert len(weights.modules) == 2 * 7  # 2 layers, all linear projections

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterFormatError, match="pickle files are not loaded for safety"):
        load_peft_adapter(pickled)

    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        load_peft_adapter(folder)
