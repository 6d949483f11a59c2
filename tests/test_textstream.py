"""Streaming detokenization on the default base's tokenizer: whole characters only,
stop sequences cut where they start, and a per-token cost that does not grow."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from hatrack.server.textstream import TextStream

MIXED = "Order #42 shipped 📦✅ — 你好，世界！ naïve café 👩🏽‍💻 🇯🇵 done."


@pytest.fixture(scope="module")
def tokenizer(default_base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_base_dir)


class CountingTokenizer:
    """The real tokenizer, counting how many ids each decode call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids, **kw):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kw)


def stream_all(tokenizer, ids, stops=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, list(stops))
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.finish())
    return [d for d in deltas if d], stream


def test_characters_split_over_byte_tokens_come_out_whole(tokenizer):
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    # the text really has characters whose bytes span several tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    deltas, stream = stream_all(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == stream.full_text() == tokenizer.decode(ids, skip_special_tokens=True) == MIXED


def test_any_id_sequence_streams_to_exactly_the_full_decode(tokenizer):
    """Random ids (special tokens and stray byte tokens included): the deltas always
    add up to the one-shot decode, whatever it is."""
    rng = random.Random(5)
    specials = list(tokenizer.all_special_ids)
    for _ in range(40):
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(1, 60))]
        deltas, stream = stream_all(tokenizer, ids)
        assert "".join(deltas) == stream.full_text() == tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("stop", ["shipped 📦", "你好，世", "é 👩", "done."])
def test_stop_sequences_spanning_tokens_cut_the_text(tokenizer, stop):
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    deltas, stream = stream_all(tokenizer, ids, [stop, "never appears"])
    assert stream.stopped
    assert "".join(deltas) == stream.full_text() == MIXED[: MIXED.index(stop)]
    assert not any("\ufffd" in d for d in deltas)


def test_text_that_only_starts_a_stop_sequence_is_released_at_the_end(tokenizer):
    text = "wait for it: 你好"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, stream = stream_all(tokenizer, ids, ["你好吗"])
    assert not stream.stopped and "".join(deltas) == text


def test_per_token_cost_does_not_grow_over_a_long_answer(tokenizer):
    paragraph = ("Your parcel left the depot at 09:40 and should arrive tomorrow 📦. "
                 "如果有问题，请联系我们。 Thanks for waiting! ")
    ids = tokenizer(paragraph * 200, add_special_tokens=False)["input_ids"][:4000]
    assert len(ids) == 4000
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ["STOP HERE"])
    seconds, work = [], []
    for t in ids:
        before, started = counting.decoded_ids, time.perf_counter()
        stream.push(t)
        seconds.append(time.perf_counter() - started)
        work.append(counting.decoded_ids - before)
    stream.finish()
    assert stream.full_text() == tokenizer.decode(ids, skip_special_tokens=True)
    # ids decoded per token: a small window, the same at the end as at the start
    assert max(work) <= 16
    assert sum(work[-500:]) <= 1.5 * sum(work[:500])
    # and the time: the last 500 pushes cost about what the first 500 did
    assert sum(seconds[-500:]) < 3 * sum(seconds[:500])
