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
    assert err.problems[1] == "acme.jsonl row 5: messages[0].role must be one of system, user, assistant, tool; got 'bot'"
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


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees in Paris."},
]}


def test_rows_with_tool_calls_and_tool_results(tmp_path):
    calling = {"tools": json.dumps([WEATHER]), "messages": TOOL_ROW["messages"][:2]}  # CSV-style JSON text
    ds = load_dataset(str(_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW, calling])))
    full, call = ds.examples
    assert full.tools == [WEATHER] and call.tools == [WEATHER]
    assert full.messages[1]["tool_calls"] == [{"type": "function", "id": "call_1",
                                               "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert full.messages[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
    assert full.expected == "21 degrees in Paris."
    # a held-out row ending in a call expects the call as the model writes it
    assert call.expected == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'


@pytest.mark.parametrize("row,problem", [
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name must be a non-empty string"),
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters must be a JSON schema object"),
    ({"messages": [TOOL_ROW["messages"][0], {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments must be a JSON object; got a string that is not JSON"),
    ({"messages": [TOOL_ROW["messages"][0], {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "assistant", "content": "x"}]},
     "messages[0].tool_calls is only for assistant messages"),
])
def test_bad_tool_rows_name_the_field(tmp_path, row, problem):
    with pytest.raises(DatasetError) as info:
        load_dataset(str(_jsonl(tmp_path / "tools.jsonl", [CHAT, row])))
    assert info.value.problems == [f"tools.jsonl row 2: {problem}"]
