"""Per-row sampling knobs, logprobs, n choices and token constraints in the engine, on the
tiny model (fp32): each knob does what vLLM's does (checked against a step-by-step
reference on the HF model), rows with knobs leave plain rows untouched, and a row's
answer does not depend on what else shares its batch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import TEST_DEVICE, randomized_tiny, write_peft_adapter
from hatrack.server.engine import AdapterSpec, Engine, InvalidRequestError, SamplingParams, load_peft_adapter

PROMPT_TEXT = "Dear customer, thank you for"


class FixedAnswer:
    """A TokenConstraint that allows exactly one token sequence, then is done."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.at = tokens, 0

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.tokens[self.at]] = True
        return mask

    def accept(self, token_id: int) -> None:
        assert token_id == self.tokens[self.at], "the engine picked a token the constraint forbade"
        self.at += 1

    def is_done(self) -> bool:
        return self.at == len(self.tokens)


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    return randomized_tiny(tiny_base_dir).to(TEST_DEVICE), tok, tok(PROMPT_TEXT)["input_ids"]


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: AdapterSpec(name, (lambda f: lambda: load_peft_adapter(f))(
        write_peft_adapter(tiny_base_dir, root / name, seed=seed, scale=0.15)))
        for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def engine(tiny):
    with Engine(tiny[0], tiny[1], max_batch=16) as engine:
        yield engine


def run(engine: Engine, prompt, adapter, params: SamplingParams):
    return [h.result(timeout=60) for h in engine.submit_choices(prompt, adapter, params)]


def reference(model, prompt: list[int], steps: int, *, bias=None, rep=1.0, freq=0.0, pres=0.0) -> list[int]:
    """Greedy decoding on the HF model with vLLM's logit processing, one step at a time."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            x = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().clone()
            for token, value in (bias or {}).items():
                x[token] += value
            counts = torch.bincount(torch.tensor(out, dtype=torch.long, device=x.device), minlength=x.numel()).float() \
                if out else torch.zeros_like(x)
            seen = torch.zeros_like(x, dtype=torch.bool)
            seen[torch.tensor(prompt, device=x.device)] = True
            seen |= counts > 0
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            x = x - freq * counts - pres * (counts > 0).float()
            out.append(int(x.argmax()))
            ids.append(out[-1])
    return out


def test_bias_and_penalties_follow_vllm(tiny, engine):
    model, _, prompt = tiny
    plain = run(engine, prompt, None, SamplingParams(max_tokens=10, temperature=0))[0][0]
    assert plain == reference(model, prompt, 10)
    banned = {plain[0]: -100.0, plain[3]: 5.5}
    cases = [dict(bias=banned), dict(rep=1.8), dict(freq=1.5, pres=0.7), dict(rep=0.7, freq=-0.5, bias=banned)]
    answers = []
    for case in cases:
        params = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=case.get("rep", 1.0),
                                frequency_penalty=case.get("freq", 0.0), presence_penalty=case.get("pres", 0.0),
                                logit_bias=case.get("bias"))
        got = run(engine, prompt, None, params)[0][0]
        assert got == reference(model, prompt, 10, **case), case
        answers.append(got)
    assert all(a != plain for a in answers)  # each knob really changed the answer
    assert answers[0][0] != plain[0]


def test_top_k_one_and_min_p_one_sample_the_greedy_answer(tiny, engine):
    _, _, prompt = tiny
    greedy = run(engine, prompt, None, SamplingParams(max_tokens=10, temperature=0))[0][0]
    for knob in (dict(top_k=1), dict(min_p=1.0)):
        got = run(engine, prompt, None, SamplingParams(max_tokens=10, temperature=1.5, seed=5, **knob))[0][0]
        assert got == greedy, knob
    free = run(engine, prompt, None, SamplingParams(max_tokens=10, temperature=1.5, seed=5))[0][0]
    assert free != greedy


def test_n_choices_share_one_prefill_and_each_equals_its_seed_alone(tiny, engine, adapters):
    _, _, prompt = tiny
    steps = engine.stats().prefill_tokens
    greedy = run(engine, prompt, adapters["a"], SamplingParams(max_tokens=8, temperature=0, n=3))
    assert engine.stats().prefill_tokens - steps == len(prompt)  # one prefill for three rows
    assert len({tuple(t) for t, _ in greedy}) == 1
    sampled = run(engine, prompt, adapters["a"], SamplingParams(max_tokens=8, temperature=1.0, seed=40, n=3))
    alone = [run(engine, prompt, adapters["a"], SamplingParams(max_tokens=8, temperature=1.0, seed=40 + i))[0]
             for i in range(3)]
    assert sampled == alone
    assert len({tuple(t) for t, _ in sampled}) == 3


def test_logprobs_are_the_model_log_softmax(tiny, engine):
    model, _, prompt = tiny
    handle = engine.submit(prompt, None, SamplingParams(max_tokens=6, temperature=0, logprobs=5))
    events = list(_events(handle))
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt], device=model.device)).logits[0, -1].float(), -1)
    first = events[0]
    assert first.logprob == pytest.approx(float(want.max()), abs=1e-4)
    for event in events:
        ids, values = zip(*event.top_logprobs)
        assert len(ids) == 5 and ids[0] == event.token_id  # the greedy token is the most likely
        assert values[0] == pytest.approx(event.logprob) and list(values) == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    # sampled with knobs: logprobs stay the raw model's, not the processed distribution's
    knobbed = engine.submit(prompt, None, SamplingParams(max_tokens=1, temperature=0, logprobs=0,
                                                        logit_bias={int(want.argmin()): 100}))
    event = list(_events(knobbed))[0]
    assert event.token_id == int(want.argmin()) and event.logprob == pytest.approx(float(want.min()), abs=1e-4)
    assert event.top_logprobs == ()


def _events(handle):
    handle.result(timeout=60)
    return handle.events


def test_constraint_forces_its_answer_per_row_and_ends_with_stop(tiny, engine):
    _, tok, prompt = tiny
    answer = tok(" Your order ships today.", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=50, temperature=1.3, seed=1, n=2,
                            constraint=lambda: FixedAnswer(answer))
    for tokens, reason in run(engine, prompt, None, params):
        assert tokens == answer and reason == "stop"
    short = SamplingParams(max_tokens=3, temperature=0, constraint=lambda: FixedAnswer(answer))
    assert run(engine, prompt, None, short) == [(answer[:3], "length")]


def test_mixed_batch_rows_answer_as_alone(tiny, adapters):
    """Plain greedy rows, knob rows, logprob rows, n=3 rows and a constrained row, over
    two adapters and the base in one batch: every row answers as it does alone."""
    model, tok, prompt = tiny
    other = tok("def fibonacci(n):")["input_ids"]
    answer = tok(" fine", add_special_tokens=False)["input_ids"]
    jobs = [
        (prompt, None, SamplingParams(max_tokens=8, temperature=0)),
        (other, adapters["a"], SamplingParams(max_tokens=8, temperature=0)),
        (prompt, adapters["b"], SamplingParams(max_tokens=8, temperature=0, logprobs=3)),
        (other, None, SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.5, logit_bias={13: 3})),
        (prompt, adapters["a"], SamplingParams(max_tokens=8, temperature=0.9, seed=3, top_k=20, n=3)),
        (other, adapters["b"], SamplingParams(max_tokens=8, temperature=1.0, seed=9, min_p=0.05,
                                              frequency_penalty=0.5)),
        (prompt, None, SamplingParams(max_tokens=8, temperature=1.0, seed=4, constraint=lambda: FixedAnswer(answer))),
        (other, adapters["a"], SamplingParams(max_tokens=8, temperature=0.8, seed=11, top_p=0.9)),
    ]
    with Engine(model, tok, max_batch=16) as solo:
        want = [run(solo, *job) for job in jobs]
    mixed = Engine(model, tok, max_batch=16)
    handles = [mixed.submit_choices(*job) for job in jobs]  # all queued before the first step
    mixed.start()
    try:
        got = [[h.result(timeout=60) for h in group] for group in handles]
        assert got == want
        assert mixed.stats().steps < 2 * 8  # they really shared the batch
        assert [e.logprob for e in handles[2][0].events] == pytest.approx(
            [e.logprob for e in _solo_events(model, tok, jobs[2])], abs=1e-5)
    finally:
        mixed.stop(timeout=5)


def _solo_events(model, tok, job):
    with Engine(model, tok, max_batch=4) as solo:
        return _events(solo.submit(*job))


def test_out_of_range_knobs_are_refused(tiny, engine):
    _, _, prompt = tiny
    for params, field in [
        (SamplingParams(n=17), "n"), (SamplingParams(top_k=-2), "top_k"), (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=5e-324), "repetition_penalty"),
        (SamplingParams(presence_penalty=3), "presence_penalty"),
        (SamplingParams(logit_bias={10**7: 1}), "logit_bias"), (SamplingParams(logit_bias={1: 101}), "logit_bias"),
        (SamplingParams(logprobs=21), "logprobs"),
    ]:
        with pytest.raises(InvalidRequestError, match=field):
            engine.submit_choices(prompt, None, params)
    with pytest.raises(InvalidRequestError, match="submit_choices"):
        engine.submit(prompt, None, SamplingParams(n=2))


@pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"),
                    reason="host syncs are a CUDA matter (HATRACK_TEST_DEVICE=cuda runs this)")
def test_a_step_of_greedy_and_sampled_rows_waits_for_the_device_once():
    from hatrack.server.engine.sampling import RowSampler, pick_tokens

    vocab = 1000
    logits = torch.randn(6, vocab, device=TEST_DEVICE)
    knobs = [(0.0, 1.0), (0.8, 1.0), (1.0, 0.9), (0.0, 1.0), (0.7, 0.5), (0.0, 1.0)]
    rows = [RowSampler.build(SamplingParams(max_tokens=1, temperature=t, top_p=p, seed=3), [1, 2], vocab,
                             logits.device) for t, p in knobs]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tokens, _ = pick_tokens(logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert [tokens[i] for i in (0, 3, 5)] == logits[[0, 3, 5]].argmax(-1).tolist()
