"""The server stops where the base says an answer ends (tokenizer eos, generation config
eos, the chat template's end-of-turn token), not at a fixed list of known tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from serving import ServerProcess, hatrack_home_env

TURN_END = "<|turn_end|>"
OLD_LIST = ("<|im_end|>", "<|eot_id|>", "<|end|>")  # what the server once knew by name


@pytest.fixture(scope="module")
def turn_end_base(tmp_path_factory, tiny_base_dir: Path) -> Path:
    """A tiny random Llama whose template ends a turn with <|turn_end|> (a new special
    token), whose generation config names it as eos, and whose greedy choice is always
    that token: every layer adds nothing, every embedding is the same unit vector, and
    only <|turn_end|>'s output row reads it."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("turn-end-base") / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [TURN_END]})
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_end|>", TURN_END)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[turn_end, 0] = 100.0  # certain even when sampling
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=[turn_end], bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def test_stop_ids_come_from_the_base(turn_end_base: Path, tiny_base_dir: Path):
    from transformers import AutoTokenizer

    from hatrack.chat_format import end_of_turn_ids, load_generation_config, template_end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(turn_end_base)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    assert template_end_of_turn_id(tokenizer) == turn_end
    assert turn_end in end_of_turn_ids(tokenizer)  # from the template alone
    assert end_of_turn_ids(tokenizer, load_generation_config(turn_end_base)) == {tokenizer.eos_token_id, turn_end}
    # a base without a generation config still stops at its eos and template end
    assert load_generation_config(turn_end_base / "missing") is None
    # the default base's template ends a turn with <|im_end|>, its eos
    default = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert template_end_of_turn_id(default) == default.convert_tokens_to_ids("<|im_end|>")
    # the trainer's import still works and is the same function
    from hatrack.trainer.render import end_of_turn_ids as trainer_eot

    assert trainer_eot is end_of_turn_ids


def test_engine_finishes_with_stop_on_the_base_end_token(turn_end_base: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hatrack.chat_format import end_of_turn_ids, load_generation_config
    from hatrack.server.engine import Engine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(turn_end_base)
    model = AutoModelForCausalLM.from_pretrained(turn_end_base, dtype=torch.float32).eval()
    stops = tuple(end_of_turn_ids(tokenizer, load_generation_config(turn_end_base)))
    old = tuple(tokenizer.convert_tokens_to_ids(t) for t in OLD_LIST if t in tokenizer.get_vocab())
    with Engine(model, tokenizer, max_batch=2) as engine:
        prompt = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
        tokens, reason = engine.submit(prompt, None, SamplingParams(max_tokens=6, temperature=0,
                                                                    stop_token_ids=stops)).result(60)
        assert (tokens, reason) == ([], "stop")
        # the fixed list of known names would have run on to the limit
        tokens, reason = engine.submit(prompt, None, SamplingParams(max_tokens=6, temperature=0,
                                                                    stop_token_ids=old)).result(60)
        assert reason == "length" and set(tokens) == {tokenizer.convert_tokens_to_ids(TURN_END)}


def test_served_answer_stops_at_the_base_end_token(tmp_path: Path, turn_end_base: Path):
    from hatrack import basemodel
    from hatrack.registry import Registry

    home = tmp_path / "home"
    home.mkdir()
    with hatrack_home_env(home):
        Registry().add_base("turn-end", str(turn_end_base), turn_end_base, basemodel.fingerprint(turn_end_base),
                            basemodel.chat_template_sha256(turn_end_base))
        server = ServerProcess(home, "--base", "turn-end", "--quantize", "none", "--device", "cpu",
                               "--no-auth").start()
        try:
            resp = httpx.post(f"{server.url}/v1/chat/completions", json={
                "model": "turn-end", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 1.0})
        finally:
            server.stop()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == "" and body["usage"]["completion_tokens"] == 0
