"""The label mask: answer tokens and the end-of-turn token are trained, nothing else."""

from __future__ import annotations

import pytest

from hatrack.trainer.data import Example, parse_row
from hatrack.trainer.render import IGNORE, LabelMaskError, check_mask, encode, end_of_turn_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


def _trained(tokenizer, enc) -> list[str]:
    return [tokenizer.decode([i]) for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE]


def test_chat_trains_every_answer_through_end_of_turn(tokenizer):
    row = parse_row({"messages": [
        {"role": "system", "content": "You are Acme support."},
        {"role": "user", "content": "Hours?"},
        {"role": "assistant", "content": "Nine to five."},
        {"role": "user", "content": "Phone?"},
        {"role": "assistant", "content": "555-0142"},
    ]}, 1)
    eot = end_of_turn_ids(tokenizer)
    enc = encode(tokenizer, row, eot, 512)
    trained = _trained(tokenizer, enc)
    assert "".join(trained) == "Nine to five.<|im_end|>555-0142<|im_end|>"
    # the prompt, the role headers and the newline after <|im_end|> are not trained
    assert enc.labels[-1] == IGNORE and tokenizer.decode([enc.input_ids[-1]]) == "\n"
    assert all(label in (IGNORE, tok) for tok, label in zip(enc.input_ids, enc.labels))


def test_instruction_and_prompt_rows_train_the_answer_only(tokenizer):
    eot = end_of_turn_ids(tokenizer)
    for record in ({"instruction": "Say hi", "output": "Hi!"}, {"prompt": "Say hi", "completion": "Hi!"}):
        enc = encode(tokenizer, parse_row(record, 1), eot, 512)
        assert "".join(_trained(tokenizer, enc)) == "Hi!<|im_end|>"


def test_text_rows_train_every_token_and_learn_to_stop(tokenizer):
    enc = encode(tokenizer, Example(row=1, text="Acme opens at nine."), end_of_turn_ids(tokenizer), 512)
    assert enc.labels == enc.input_ids
    assert tokenizer.decode(enc.input_ids) == "Acme opens at nine.<|im_end|>"


def test_dataset_training_no_tokens_is_refused(tokenizer):
    eot = end_of_turn_ids(tokenizer)
    rows = [parse_row({"prompt": "A long question " * 10, "completion": "Yes."}, i) for i in range(1, 4)]
    encoded = [encode(tokenizer, r, eot, 20) for r in rows]  # the prompt alone fills 20 tokens
    with pytest.raises(LabelMaskError, match=r"acme\.jsonl: no row trains any token .*--max-length 20"):
        check_mask(encoded, eot, "acme.jsonl", 20, "<|im_end|>")


def test_dataset_never_training_end_of_turn_is_refused(tokenizer):
    eot = end_of_turn_ids(tokenizer)
    row = parse_row({"prompt": "Hi", "completion": "word " * 40}, 1)
    full = encode(tokenizer, row, eot, 512)
    cut = encode(tokenizer, row, eot, len(full.input_ids) - 10)  # answers cut before <|im_end|>
    assert cut.trained > 0 and cut.truncated
    with pytest.raises(LabelMaskError, match=r"never learn to stop"):
        check_mask([cut], eot, "long.jsonl", 30, "<|im_end|>")
    health = check_mask([full, cut], eot, "long.jsonl", 512, "<|im_end|>")
    assert health.rows_training_end_of_turn == 1 and health.truncated_rows == 1
    assert 0 < health.trained_share < 1


def test_tool_rows_train_the_call_and_the_answer_with_the_fallback_prompt(tokenizer):
    from hatrack.tool_format import render_chat, template_has_tools

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    row = parse_row({"tools": [weather], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ]}, 1)
    assert not template_has_tools(tokenizer)  # SmolLM2's template ignores tools: the fallback renders them
    enc = encode(tokenizer, row, end_of_turn_ids(tokenizer), 1024)
    assert "".join(_trained(tokenizer, enc)) == (
        '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call><|im_end|>21 degrees.<|im_end|>')
    prompt = tokenizer.decode(enc.input_ids)
    assert '{"name":"get_weather","parameters":{"type":"object"' in prompt  # the tool listed in the system turn
    assert '<|im_start|>user\n<tool_response>{"temp": 21}</tool_response><|im_end|>' in prompt
    # the server renders a request with the same tools and history to the same prefix
    served = render_chat(tokenizer, row.messages[:3], [weather], add_generation_prompt=True)
    assert prompt.startswith(served)
