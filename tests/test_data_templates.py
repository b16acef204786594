"""`data.chat_template`: the built-in templates render each format as published, train exactly the assistant turns
(checked by decoding the labelled tokens), refuse what they cannot do in one line, and travel with the adapter
to `peftlab generate`, `serve` and `export`.

The tokenizer is built here: byte-level BPE with no merges (every byte one token, so decoding gives back the text
exactly) plus the formats' special tokens, and no chat template, as most pretrained bases ship.
"""

from __future__ import annotations

import logging

import pytest

from peftlab.core.config import ConfigError
from peftlab.data import DataConfig, DataError, encode_rows, load_splits
from peftlab.data.templates import (ADAPTER_TEMPLATE_FILE, TEMPLATES, apply_adapter_template, install_chat_template,
                                    save_adapter_template, stop_token_ids)

from .test_data import write_jsonl

FORMAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]


def byte_tokenizer(specials=tuple(FORMAT_TOKENS)):
    """256 byte tokens (ids 0-255), then <s> = bos, </s> = eos (= pad), then `specials`; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                  additional_special_tokens=list(specials))
    assert tok.chat_template is None
    return tok


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"}]

# Each format written out by hand from its published description (the reference the Jinja is checked against):
# (whole conversation, generation prompt after messages[:4], what each assistant turn trains)
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
               "<|im_start|>assistant\n5<|im_end|>\n",
               "<|im_start|>assistant\n", ["Hello!<|im_end|>\n", "5<|im_end|>\n"]),
    "llama-3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n2+3?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n", ["Hello!<|eot_id|>", "5<|eot_id|>"]),
    "mistral": ("<s>[INST] Be brief.\n\nHi there [/INST] Hello!</s>[INST] 2+3? [/INST] 5</s>",
                " [/INST]", [" Hello!</s>", " 5</s>"]),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n"
               "### Instruction:\n2+3?\n\n### Response:\n5</s>\n\n",
               "### Response:\n", ["Hello!</s>\n\n", "5</s>\n\n"]),
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+3?</s>\n"
               "<|assistant|>\n5</s>\n",
               "<|assistant|>\n", ["Hello!</s>\n", "5</s>\n"]),
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\n2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n",
              "<start_of_turn>model\n", ["Hello!<end_of_turn>\n", "5<end_of_turn>\n"]),
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral": "</s>", "alpaca": "</s>", "zephyr": "</s>",
               "gemma": "<end_of_turn>"}


def trained_spans(tok, example) -> list[str]:
    """The labelled tokens, decoded one contiguous run at a time."""
    spans, current = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return [tok.decode(s) for s in spans + ([current] if current else [])]


def test_every_built_in_template_is_covered():
    assert set(EXPECTED) == set(TEMPLATES) == set(END_OF_TURN)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_the_published_format_and_trains_assistant_turns(tmp_path, name):
    whole, prompt, turns = EXPECTED[name]
    tok = byte_tokenizer()
    install_chat_template(tok, name)
    assert tok.apply_chat_template(CHAT, tokenize=False) == whole
    assert tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True).endswith(prompt)
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(END_OF_TURN[name])]

    # the same conversation as a ShareGPT row, encoded from a fresh tokenizer with no template: data.chat_template
    # is installed by encode_rows, and exactly the assistant turns (with their end of turn) are trained
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CHAT]
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": sharegpt}])
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=1024, chat_template=name)
    fresh = byte_tokenizer()
    (ex,) = encode_rows(load_splits(cfg, "sft").train, "sft", fresh, cfg)
    assert fresh.decode(ex["input_ids"]) == whole
    assert trained_spans(fresh, ex) == turns


def test_unknown_template_name_names_the_nearest():
    with pytest.raises(ConfigError, match=r"chat_template='chatm1' is not a built-in chat template\. Nearest: chatml"):
        DataConfig(train_file="x.jsonl", chat_template="chatm1")
    with pytest.raises(ConfigError, match=r"Nearest: llama-3\. Built-in: chatml, llama-3, mistral, alpaca, zephyr, "
                                          r"gemma; or give the path of a \.jinja file"):
        DataConfig(train_file="x.jsonl", chat_template="llama3")


def test_template_needs_its_tokens_and_file_templates(tmp_path):
    plain = byte_tokenizer(specials=())
    with pytest.raises(DataError) as err:
        install_chat_template(plain, "chatml")
    msg = str(err.value)
    assert "no single token for <|im_start|>, <|im_end|>" in msg and "\n" not in msg
    assert "Templates that fit this tokenizer: mistral, alpaca, zephyr" in msg

    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}])
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=512, chat_template=str(jinja))
    (ex,) = encode_rows(load_splits(cfg, "sft").train, "sft", plain, cfg)
    assert trained_spans(plain, ex) == ["Hello!</s>"] and plain.chat_template == jinja.read_text()
    missing = DataConfig(train_file=path, eval_fraction=0, chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(DataError, match="the template file .*nope.jinja does not exist"):
        encode_rows(load_splits(missing, "sft").train, "sft", byte_tokenizer(), missing)


def test_replacing_the_base_template_warns(tmp_path, caplog):
    base = byte_tokenizer()
    base.chat_template = TEMPLATES["zephyr"].jinja  # "the template the base ships with"
    with caplog.at_level(logging.WARNING, logger="peftlab.data.templates"):
        install_chat_template(base, "chatml")
    assert "data.chat_template=chatml replaces the chat template that the base model ships with" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftlab.data.templates"):
        install_chat_template(base, "chatml")  # the same again (eval rows after train rows): nothing to say
    assert caplog.text == ""


def test_adapter_folder_carries_the_template(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    assert save_adapter_template(str(folder), None) is None and not (folder / ADAPTER_TEMPLATE_FILE).exists()
    save_adapter_template(str(folder), "llama-3")
    assert (folder / ADAPTER_TEMPLATE_FILE).read_text() == TEMPLATES["llama-3"].jinja
    base = byte_tokenizer()
    notes = []
    assert apply_adapter_template(base, str(folder), notes.append) == [base.convert_tokens_to_ids("<|eot_id|>")]
    assert base.chat_template == TEMPLATES["llama-3"].jinja and notes == []  # the base had none: nothing replaced
    other = byte_tokenizer()
    other.chat_template = TEMPLATES["chatml"].jinja
    apply_adapter_template(other, str(folder), notes.append)
    assert other.chat_template == TEMPLATES["llama-3"].jinja and "differs from the base model's" in notes[0]
    untouched = byte_tokenizer()
    assert apply_adapter_template(untouched, str(tmp_path), notes.append) == [] and untouched.chat_template is None


# ---- the template travels with the adapter: generate, serve, merge / export ---------------------------------------

@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """A tiny Llama over the byte tokenizer (no chat template) and a LoRA adapter saved with chatml."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("chat")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(root / "adapter"))
    save_adapter_template(str(root / "adapter"), "chatml")
    return {"model": str(root / "model"), "adapter": str(root / "adapter"), "im_end": tok.convert_tokens_to_ids(
        "<|im_end|>"), "eos": tok.eos_token_id}


def test_generate_uses_the_adapters_template_and_stops_at_its_end_of_turn(chat_files):
    from peftlab.cli import generate_cmd

    tok, net = generate_cmd.load_for_generation(chat_files["model"], chat_files["adapter"], "fp32")
    assert tok.chat_template == TEMPLATES["chatml"].jinja
    assert net.get_base_model().generation_config.eos_token_id == [chat_files["eos"], chat_files["im_end"]]
    base_tok, _ = generate_cmd.load_for_generation(chat_files["model"], None, "fp32")
    assert base_tok.chat_template is None  # the base alone: its own (none)


def test_serve_renders_chat_with_the_adapters_template(chat_files):
    import openai

    from peftlab.models import load_model, load_tokenizer
    from peftlab.serve.api import create_app
    from peftlab.serve.engine import Engine, Request, SamplingParams

    from .test_serve import Server

    tokenizer = load_tokenizer(chat_files["model"])
    engine = Engine(load_model(chat_files["model"]), tokenizer)
    engine.load_adapter("chat", chat_files["adapter"])
    assert engine.chat_template("chat") == TEMPLATES["chatml"].jinja and engine.chat_template(None) is None
    # the adapter's end of turn stops its requests, not the base's
    for adapter, stops in (("chat", True), (None, False)):
        req = Request(adapter, [1, 2], SamplingParams(max_tokens=4), lambda *_: None)
        assert engine._push(req, chat_files["im_end"]) is stops

    server = Server(create_app(engine, "tiny", [chat_files["adapter"]]))
    try:
        messages = [{"role": "user", "content": "Hi there"}]
        reply = server.client.chat.completions.create(model="chat", messages=messages, max_tokens=2, temperature=0)
        want = byte_tokenizer()
        install_chat_template(want, "chatml")
        prompt = want.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert reply.usage.prompt_tokens == len(prompt["input_ids"])  # rendered as in training: chatml
        with pytest.raises(openai.BadRequestError, match="The model 'tiny' has no chat template"):
            server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    finally:
        server.close()


def test_merge_and_gguf_export_carry_the_template(chat_files, tmp_path):
    import json

    from gguf import GGUFReader

    from peftlab.cli.main import main

    assert main(["merge", chat_files["model"], chat_files["adapter"], str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert merged["eos_token_id"] == [chat_files["eos"], chat_files["im_end"]]
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == TEMPLATES["chatml"].jinja
    out = tmp_path / "chat.gguf"
    assert main(["export", chat_files["model"], str(out), "--adapter", chat_files["adapter"], "--to", "gguf",
                 "--type", "f32"]) == 0
    field = GGUFReader(str(out)).fields["tokenizer.chat_template"]
    assert field.contents() == TEMPLATES["chatml"].jinja


def test_training_saves_the_template_with_the_adapter(chat_files, tmp_path):
    import yaml

    from peftlab.train import build_run_config, train

    rows = [{"conversations": [{"from": "human", "value": f"say {w}"}, {"from": "gpt", "value": w}]}
            for w in ("yes", "no", "ok", "bye", "hi", "sure", "fine", "good")]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    run = build_run_config({
        "model": chat_files["model"], "task": "sft",
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": data, "eval_fraction": 0.25, "max_length": 96, "chat_template": "chatml"},
        "train": {"output_dir": str(out), "lr": 1e-2, "batch_size": 2, "max_steps": 2, "log_every": 1,
                  "progress": False, "tensorboard": False, "precision": "fp32", "save_every": 1}})
    train(run, log=lambda *_: None)
    assert (out / "adapter" / ADAPTER_TEMPLATE_FILE).read_text() == TEMPLATES["chatml"].jinja
    # a checkpoint's adapter generates as the final one does: the template is in it too
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, list(out.iterdir())
    for step in checkpoints:
        assert (step / "adapter" / ADAPTER_TEMPLATE_FILE).read_text() == TEMPLATES["chatml"].jinja
    assert yaml.safe_load((out / "run_config.yaml").read_text())["data"]["chat_template"] == "chatml"
