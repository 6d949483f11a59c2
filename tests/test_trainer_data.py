"""Datasets: every file format and row shape loads; bad rows are named by file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hatrack.trainer.data import DatasetError, load_dataset, split

CHAT = {"messages": [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "9 to 5."}]}
ALPACA = {"instruction": "Give the hours.", "input": "Acme shop", "output": "9 to 5."}
PROMPT = {"prompt": "Hours?", "completion": "9 to 5."}
TEXT = {"text": "Acme opens at 9."}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_every_row_shape(tmp_path):
    ds = load_dataset(str(_jsonl(tmp_path / "mixed.jsonl", [CHAT, ALPACA, PROMPT, TEXT])))
    assert ds.rows == 4 and ds.label == "mixed.jsonl" and len(ds.sha256) == 64
    chat, alpaca, prompt, text = ds.examples
    assert chat.expected == "9 to 5." and chat.prompt == [{"role": "user", "content": "Hours?"}]
    assert alpaca.messages[0]["content"] == "Give the hours.\n\nAcme shop" and alpaca.expected == "9 to 5."
    assert prompt.messages == [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "9 to 5."}]
    assert text.text == "Acme opens at 9." and text.expected is None


def test_json_list_and_wrapped_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([CHAT, PROMPT]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [ALPACA]}))
    assert load_dataset(str(tmp_path / "a.json")).rows == 2
    assert load_dataset(str(tmp_path / "b.json")).examples[0].expected == "9 to 5."


def test_csv_with_prompt_completion_and_messages_as_json_text(tmp_path):
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion", "messages"])
        writer.writeheader()
        writer.writerow({"prompt": "Hours?", "completion": "9 to 5.", "messages": ""})
        writer.writerow({"prompt": "", "completion": "", "messages": json.dumps(CHAT["messages"])})
    ds = load_dataset(str(path))
    assert [e.expected for e in ds.examples] == ["9 to 5.", "9 to 5."]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), path)
    ds = load_dataset(str(path))
    assert ds.rows == 2 and ds.examples[1].expected == "9 to 5."


def test_bad_rows_named_by_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "acme.jsonl", [CHAT, CHAT, {"foo": 1, "bar": 2}, "", "{not json", TEXT,
                                             {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path))
    # invalid JSON is reported first, alone: the rows of a broken file are not guessed at
    assert info.value.problems == ["acme.jsonl row 5: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    path = _jsonl(tmp_path / "acme.jsonl", [CHAT, CHAT, {"foo": 1, "bar": 2}, TEXT,
                                             {"messages": [{"role": "bot", "content": "x"}]},
                                             {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path))
    err = info.value
    assert err.problems[0] == (
        "acme.jsonl row 3: expected one of messages | instruction/output | prompt/completion | text; got keys: bar, foo"
    )
    assert err.problems[1] == "acme.jsonl row 5: messages[0].role must be one of system, user, assistant; got 'bot'"
    assert err.problems[2] == "acme.jsonl row 6: messages has no assistant message to learn from"
    assert "\n" not in str(err) and str(err).startswith("acme.jsonl row 3:") and "2 more bad rows: 5, 6" in str(err)


def test_truncated_row_reports_the_parsers_column(tmp_path):
    row = '{"messages": [{"role": "user", "content": "hi"}'  # cut off mid-row
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(TEXT) + "\n" + row + "\n")
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(row)
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path))
    assert parsed.value.colno == 48
    assert info.value.problems == ["cut.jsonl row 2: not valid JSON (Expecting ',' delimiter at column 48)"]


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"rows\.txt: unknown file type \.txt"):
        load_dataset(str(tmp_path / "rows.txt"))


def test_split_is_deterministic_and_holds_out_a_few(tmp_path):
    ds = load_dataset(str(_jsonl(tmp_path / "d.jsonl", [
        {"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)
    ])))
    train_a, held_a = split(ds.examples, 0.1, seed=7)
    train_b, held_b = split(ds.examples, 0.1, seed=7)
    _, held_c = split(ds.examples, 0.1, seed=8)
    assert [e.row for e in held_a] == [e.row for e in held_b]
    assert len(held_a) == 3 and len(train_a) == 17  # at least three rows, even at 10% of 20
    assert {e.row for e in held_a} != {e.row for e in held_c}
    assert split(ds.examples, 0.0, seed=7)[1] == []
