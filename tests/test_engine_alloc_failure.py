"""An allocation failure never hangs a request: when memory runs out while a request
starts (growing the adapter slot bank or the per-row adapter copies, its prefill, the
copies of its choices) or in a decode step, the requests it hit end at once with an
EngineMemoryError (HTTP 503 `out_of_memory`), what they took is given back, the bank
keeps one consistent rank, and every other request, queued or running, answers as it
would have. The failure is injected where the engine allocates; tiny random model, fp32."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from conftest import randomized_tiny, settled, write_peft_adapter
from hatrack.registry.records import ResolvedModel
from hatrack.server.catalog import Target
from hatrack.server.completions import CHAT, Job, Runner
from hatrack.server.engine import AdapterSpec, Engine, EngineMemoryError, SamplingParams, load_peft_adapter
from hatrack.server.engine import cpu_kernel
from hatrack.server.engine import slots as slots_module
from hatrack.server.engine.slots import GROUPS
from hatrack.server.errors import APIError
from hatrack.server.metrics import ServerMetrics

MAX_LOADED = 3  # bank tensors are [layers, 4, ...]
MAX_BATCH = 6  # row copies are [layers, 6, ...]
TIMEOUT = 30  # a hung request fails the test instead of the suite


def greedy(n: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from transformers import AutoTokenizer

    return randomized_tiny(tiny_base_dir), AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("alloc-adapters")
    folders = {
        "a": write_peft_adapter(tiny_base_dir, root / "a", rank=8, seed=1, scale=0.15),
        "b": write_peft_adapter(tiny_base_dir, root / "b", rank=4, seed=2, scale=0.2, targets=["q_proj", "v_proj"]),
        "c": write_peft_adapter(tiny_base_dir, root / "c", rank=16, alpha=8, seed=3, scale=0.15),
    }
    return {name: AdapterSpec(name, lambda f=folder: load_peft_adapter(f)) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def prompts(tiny) -> list[list[int]]:
    tok = tiny[1]
    texts = ["The weather in Paris is", "def fibonacci(n):", "Dear customer, thank you for", "Once upon a time"]
    return [tok(t)["input_ids"] for t in texts]


def jobs(prompts, adapters) -> list[tuple[list[int], AdapterSpec | None]]:
    """The requests that must not notice a failure beside them."""
    return [(prompts[0], None), (prompts[1], adapters["a"]), (prompts[2], adapters["b"]), (prompts[3], None),
            (prompts[2], adapters["a"])]


@pytest.fixture(scope="module")
def reference(tiny, adapters, prompts) -> dict:
    """Each job's greedy answer on an engine no failure touches, and the victim's."""
    engine = Engine(*tiny, max_loaded=MAX_LOADED, max_batch=MAX_BATCH, cpu_kernel=False)
    engine.start()
    try:
        answers = {i: engine.submit(p, a, greedy()).result(timeout=60)[0]
                   for i, (p, a) in enumerate(jobs(prompts, adapters))}
        answers["c"] = engine.submit(prompts[1], adapters["c"], greedy()).result(timeout=60)[0]
    finally:
        engine.stop(timeout=5)
    return answers


@pytest.fixture()
def engine(tiny, adapters, prompts, request):
    """A running engine whose slot bank already holds adapter a (rank 8); the LoRA term
    in torch ops (the row copies, as on CUDA) unless parametrized with the CPU kernel."""
    kernel = getattr(request, "param", False)
    if kernel and cpu_kernel.load() is None:
        pytest.skip("the CPU kernel cannot be built here (see the log)")
    engine = Engine(*tiny, max_loaded=MAX_LOADED, max_batch=MAX_BATCH, cpu_kernel=kernel)
    assert (engine.lora_backend == "the compiled CPU kernel") == kernel
    engine.start()
    engine.submit(prompts[0], adapters["a"], greedy(2)).result(timeout=60)
    assert engine.bank.rank == 8
    yield engine
    engine.stop(timeout=5)


class FailingTorch:
    """torch as slots.py sees it, except that the `nth` torch.zeros whose shape `match`es
    raises MemoryError (once), as the allocator does when memory runs out."""

    def __init__(self, match, nth: int) -> None:
        self.match, self.left, self.raised = match, nth, 0

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def zeros(self, *shape, **kwargs):
        if self.left and self.match(shape):
            self.left -= 1
            if self.left == 0:
                self.raised += 1
                raise MemoryError("cannot allocate memory (injected)")
        return torch.zeros(*shape, **kwargs)


def bank_tensor(shape) -> bool:
    return shape[1] == MAX_LOADED + 1


def row_copy_tensor(shape) -> bool:
    return shape[1] == MAX_BATCH


def submit_all(engine: Engine, prompts, adapters, n: int = 24):
    """Every job, long enough to be running when the victim arrives."""
    return [engine.submit(p, a, greedy(n)) for p, a in jobs(prompts, adapters)]


def assert_others_answer(handles, reference) -> None:
    for i, handle in enumerate(handles):
        tokens, _ = handle.result(timeout=TIMEOUT)
        assert tokens[:16] == reference[i], f"job {i} answered differently beside the failure"


def assert_consistent(engine: Engine) -> None:
    """Nothing held after every request ended; the bank's tensors all at its rank."""
    stats = settled(engine)
    bank = engine.bank
    for group, suffixes in GROUPS:
        assert bank.A[group].shape[-1] == len(suffixes) * bank.rank, group
        for suffix in suffixes:
            assert bank.B[suffix].shape[2] == bank.rank, suffix
    assert stats.queue_depth == 0 and stats.running == 0
    assert engine.cache.pinned_slots() == 0
    assert len(engine.cache._free) + len(engine.cache.loaded_keys()) == MAX_LOADED  # no slot lost
    assert engine.kv.used_positions == 0 and not any(engine.kv.held)


@pytest.mark.parametrize("engine", [False, True], ids=["torch-ops", "cpu-kernel"], indirect=True)
def test_slot_bank_growth_failure_ends_only_that_request(engine, adapters, prompts, reference, monkeypatch):
    failing = FailingTorch(bank_tensor, nth=3)  # two of the rank-16 tensors allocated, then none
    monkeypatch.setattr(slots_module, "torch", failing)
    others = submit_all(engine, prompts, adapters)
    victim = engine.submit(prompts[1], adapters["c"], greedy())
    grow_error = "out of memory growing the adapter slot bank from rank 8 for adapter c"
    with pytest.raises(EngineMemoryError, match=grow_error):
        victim.result(timeout=TIMEOUT)
    assert failing.raised == 1
    assert engine.bank.rank == 8  # as it was: no half-grown bank
    assert_others_answer(others, reference)
    assert_consistent(engine)
    # memory is back: the same request now grows the bank and answers as it should
    assert engine.submit(prompts[1], adapters["c"], greedy()).result(timeout=TIMEOUT)[0] == reference["c"]
    assert engine.bank.rank == 16
    assert_consistent(engine)


def test_row_copy_growth_failure_ends_only_that_request(engine, adapters, prompts, reference, monkeypatch):
    failing = FailingTorch(row_copy_tensor, nth=2)  # the row copies at rank 16
    monkeypatch.setattr(slots_module, "torch", failing)
    others = submit_all(engine, prompts, adapters)
    victim = engine.submit(prompts[1], adapters["c"], greedy())
    with pytest.raises(EngineMemoryError, match="out of memory preparing the per-row adapter copies"):
        victim.result(timeout=TIMEOUT)
    assert failing.raised == 1
    assert_others_answer(others, reference)
    assert_consistent(engine)
    assert engine.submit(prompts[1], adapters["c"], greedy()).result(timeout=TIMEOUT)[0] == reference["c"]


def test_prefill_and_choice_copy_failures_end_only_their_requests(engine, adapters, prompts, reference,
                                                                  monkeypatch):
    victim_prompt = [7, 8, 9, 10, 11]
    real_prefill, real_copy = engine.runner.prefill, engine.kv.copy
    copies = {"n": 0}

    def prefill(segments, bank):  # fails whenever the victim's prompt is in the forward
        if any(s.ids == victim_prompt for s in segments):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_prefill(segments, bank)

    def copy(src, dst, length):
        copies["n"] += 1
        if copies["n"] == 2:  # the second choice copied, the third not
            raise MemoryError("cannot allocate memory (injected)")
        return real_copy(src, dst, length)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    monkeypatch.setattr(engine.kv, "copy", copy)
    others = submit_all(engine, prompts, adapters)
    victim = engine.submit(victim_prompt, None, greedy())
    choices = engine.submit_choices(prompts[0], adapters["a"], SamplingParams(max_tokens=16, temperature=0.0, n=3))
    with pytest.raises(EngineMemoryError, match="out of memory prefilling a prompt of 5 tokens .*CUDA out of memory"):
        victim.result(timeout=TIMEOUT)
    for handle in choices:
        with pytest.raises(EngineMemoryError):
            handle.result(timeout=TIMEOUT)
    assert copies["n"] == 2
    assert_others_answer(others, reference)
    assert_consistent(engine)
    monkeypatch.undo()
    assert engine.submit(prompts[1], adapters["a"], greedy()).result(timeout=TIMEOUT)[0] == reference[1]


def test_decode_failure_ends_the_batch_and_queued_requests_still_run(engine, adapters, prompts, reference,
                                                                     monkeypatch):
    real_decode = engine.runner.decode
    calls = {"n": 0}

    def decode(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("cannot allocate memory (injected)")
        return real_decode(*args)

    monkeypatch.setattr(engine.runner, "decode", decode)
    hit = engine.submit(prompts[0], None, greedy(24))
    with pytest.raises(EngineMemoryError, match="out of memory in a decode step of 1 rows"):
        hit.result(timeout=TIMEOUT)
    assert_others_answer(submit_all(engine, prompts, adapters), reference)
    assert_consistent(engine)


def test_server_answers_503_out_of_memory(engine, adapters, prompts, tiny, monkeypatch):
    """Not a 422 blaming the adapter (an EngineError from an adapter request was mapped so)."""
    monkeypatch.setattr(slots_module, "torch", FailingTorch(bank_tensor, nth=1))
    resolved = ResolvedModel("adapter", "c", 1, "tiny", "fingerprint", "sha")
    job = Job(CHAT, Target(resolved, adapters["c"]), prompts[1], greedy(), stops=[], stream=False,
              include_usage=False)
    with pytest.raises(APIError) as caught:
        asyncio.run(asyncio.wait_for(Runner(engine, tiny[1], ServerMetrics()).respond(job, None), TIMEOUT))
    assert caught.value.status == 503
    body = json.loads(caught.value.response().body)["error"]
    assert body["type"] == "server_error" and body["code"] == "out_of_memory"
    assert "out of memory growing the adapter slot bank" in body["message"] and "adapter c" in body["message"]
    assert_consistent(engine)
