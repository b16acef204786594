"""`peftlab export --to gguf`: files read back by independent readers.

- Merged exports are loaded by transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, which also undoes
  llama.cpp's q/k row permutation) and their logits compared with the merged peftlab model's.
- Adapter-only exports are applied the way llama.cpp applies them (W + alpha / r * B A, r read from lora_a's shape)
  onto the base GGUF read by transformers, and must give the merged model's logits.
- The slow test checks our layout against a file llama.cpp's converter wrote: the shipped SmolLM2 GGUF.

Tiny Llama / Mistral / Qwen2 models (hidden 64: rows are whole 32-value blocks for q8_0/q4_0) with a byte-level BPE
tokenizer trained here in a few ms (GGUF vocabularies are BPE; conftest's word-level tokenizer is refused).
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.cli.main import main

from .conftest import save_tiny, sentences

pytestmark = pytest.mark.usefixtures("quiet_warnings")  # transformers' GGUF loader logs dequantization progress

VOCAB = 320  # > the tokenizer's 300 ids: the rest are written as [PAD<id>] (llama.cpp's rule)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(qwen2_split: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (300 ids) trained on conftest's sentences; GPT-2's split, or Qwen2's Split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not qwen2_split)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                  byte_level]) if qwen2_split else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences(200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[0])
    fast.chat_template = CHAT
    return fast


SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=64)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
}


def lora(**options) -> LoraConfig:
    """LoRA with random A and B (init_lora_weights=False), so the merged model differs from the base."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False,
                         **options})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: (model folder, adapter folder)}: each model saved with its tokenizer, plus a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        folder, adapter = root / f"tiny-{kind}", root / f"tiny-{kind}-lora"
        model.save_pretrained(folder)
        bpe_tokenizer(qwen2_split=kind == "qwen2").save_pretrained(folder)
        torch.manual_seed(1)
        get_peft_model(model, lora(use_rslora=kind == "llama")).save_pretrained(adapter)
        out[kind] = (str(folder), str(adapter))
    return out


def export(*args) -> int:
    return main(["export", *map(str, args)])


def token_ids(tokenizer, n: int = 8, seed: int = 3) -> torch.Tensor:
    """(n, T) ids of real sentences, padded to the longest."""
    return tokenizer(sentences(n, seed=seed), return_tensors="pt", padding=True)["input_ids"]


def merged_model(model_dir: str, adapter: str):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def gguf_model(path):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ---- merged exports, read back by transformers' GGUF loader ---------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merged_f32_logits_equal_merged_model(tiny, tmp_path, kind):
    model_dir, adapter = tiny[kind]
    out = tmp_path / "model.gguf"
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", out, "--type", "f32") == 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = token_ids(tokenizer)
    reloaded, merged = gguf_model(out), merged_model(model_dir, adapter)
    assert reloaded.config.tie_word_embeddings == (kind == "llama_tied")
    base_gap = (logits(AutoModelForCausalLM.from_pretrained(model_dir), ids) - logits(merged, ids)).abs().max()
    assert base_gap > 0.1  # the adapter moves the logits: the comparison below can tell merged from base
    torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["dora", "ia3", "vera"])
def test_merged_f32_other_methods_equal_adapter_forward(tiny, tmp_path, method):
    """Any mergeable method: the GGUF's logits equal the adapter model's own (unmerged) forward."""
    from peftlab import DoraConfig, IA3Config, VeraConfig

    model_dir, _ = tiny["llama"]
    config = {"dora": lambda: DoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False),
              "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                       init_ia3_weights=False),
              "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "o_proj"], init_weights=False)}[method]()
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    peft_model.save_pretrained(tmp_path / method)
    out = tmp_path / "model.gguf"
    assert export(model_dir, "--adapter", tmp_path / method, "--to", "gguf", out, "--type", "f32") == 0
    ids = token_ids(AutoTokenizer.from_pretrained(model_dir))
    torch.testing.assert_close(logits(gguf_model(out), ids), logits(peft_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_tokenizer_and_chat_template_round_trip(tiny, tmp_path, kind):
    model_dir, adapter = tiny[kind]
    out = tmp_path / "model.gguf"
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", out) == 0
    original = AutoTokenizer.from_pretrained(model_dir)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    texts = sentences(30, seed=7) + ["it's  2 spaces,\n a newline; and <|im_end|> inline"]
    assert [reloaded(t)["input_ids"] for t in texts] == [original(t)["input_ids"] for t in texts]
    chat = [{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "well thanks"}]
    assert (reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == tuple(SPECIALS[i] for i in (1, 2, 0))


def ggml_rounded(model, type_name: str):
    """The model with every 2-D weight rounded as GGML stores it (1-D norms stay f32), computed here from the
    formats' definitions: f16/bf16 round to nearest even (torch's casts); Q8_0 splits each row into blocks of 32,
    d = max|w| / 127 kept as f16, w' = d * round(w / d)."""
    def q8_0(w):
        blocks = w.reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(blocks / torch.where(d == 0, torch.ones_like(d), d))
        return (q * d.half().float()).reshape(w.shape)

    cast = {"f16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float(), "q8_0": q8_0}[type_name]
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(cast(p))
    return model


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0"])
def test_merged_low_precision_holds_the_rounded_merged_weights(tiny, tmp_path, type_name):
    """The f16 / bf16 / q8_0 file holds exactly the merged weights rounded to that format: its logits equal the
    merged model's with weights rounded by the reference above (1e-4), and differ from the unrounded ones.
    (Top-1 agreement with f32 on real text needs a real model: the slow test below and docs/export.md.)"""
    model_dir, adapter = tiny["llama"]
    out = tmp_path / "model.gguf"
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", out, "--type", type_name) == 0
    ids = token_ids(AutoTokenizer.from_pretrained(model_dir))
    reloaded = logits(gguf_model(out), ids)
    assert (reloaded - logits(merged_model(model_dir, adapter), ids)).abs().max() > 1e-3
    reference = logits(ggml_rounded(merged_model(model_dir, adapter), type_name), ids)
    torch.testing.assert_close(reloaded, reference, atol=1e-4, rtol=0)


def test_merged_q4_0_weights_within_block_rounding(tiny, tmp_path):
    """Q4_0 stores each 32-value block as 4-bit steps of d = max|w| / 8: every weight is within d of the merged
    one (token_embd/output are Q8_0, see gguf_file.py)."""
    from gguf import GGMLQuantizationType, GGUFReader

    model_dir, adapter = tiny["llama"]
    out = tmp_path / "model.gguf"
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", out, "--type", "q4_0") == 0
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    reloaded, merged = gguf_model(out).state_dict(), merged_model(model_dir, adapter).state_dict()
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        w = merged[key]
        step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 8
        assert ((reloaded[key] - w).reshape(-1, 32).abs() <= step * 1.001).all()


def test_base_model_export_without_adapter(tiny, tmp_path):
    model_dir, _ = tiny["qwen2"]
    out = tmp_path / "base.gguf"
    assert export(model_dir, "--to", "gguf", out, "--type", "f32") == 0
    ids = token_ids(AutoTokenizer.from_pretrained(model_dir))
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.testing.assert_close(logits(gguf_model(out), ids), logits(base, ids), atol=1e-4, rtol=0)


# ---- adapter-only: llama.cpp's LoRA adapter GGUF ----------------------------------------------------------------

def apply_like_llama_cpp(base_state: dict, adapter_path, config) -> dict:
    """W + alpha / r * B A for every `<gguf name>.lora_a/.lora_b` pair, as llama.cpp's llama-adapter.cpp does
    (r = lora_a's row count), in GGUF's layout; then undo llama.cpp's q/k permutation with transformers' own
    LlamaTensorProcessor (an implementation independent of ours) and map names with transformers' table."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(adapter_path)
    field = reader.fields
    assert field["general.type"].contents() == "adapter"
    assert field["adapter.type"].contents() == "lora"
    alpha = field["adapter.lora.alpha"].contents()
    pairs = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    model = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(model, processor)
    state = dict(base_state)
    for name in pairs:
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        A, B = pairs[name], pairs[f"{target}.lora_b"]  # (r, in), (out, r)
        delta = (alpha / A.shape[0]) * (B @ A)  # in llama.cpp's (permuted) row order
        if config.model_type in ("llama", "mistral"):
            delta = torch.from_numpy(processor.process(delta.numpy(), target).weights.copy())
        state[names[target]] = state[names[target]] + delta
    return state


def assert_adapter_gguf_on_base_equals_merged(model_dir: str, adapter, tmp_path) -> None:
    base_out, adapter_out = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    assert export(model_dir, "--to", "gguf", base_out, "--type", "f32") == 0
    assert export(model_dir, "--adapter", adapter, "--adapter-only", "--to", "gguf", adapter_out) == 0
    base = gguf_model(base_out)
    base.load_state_dict(apply_like_llama_cpp(base.state_dict(), adapter_out, base.config))
    ids = token_ids(AutoTokenizer.from_pretrained(model_dir))
    torch.testing.assert_close(logits(base, ids), logits(merged_model(model_dir, adapter), ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_adapter_only_on_base_gguf_equals_merged(tiny, tmp_path, kind):
    model_dir, adapter = tiny[kind]
    assert_adapter_gguf_on_base_equals_merged(model_dir, adapter, tmp_path)


def test_adapter_only_folds_rank_pattern_into_one_alpha(tiny, tmp_path):
    """Per-layer ranks and alphas (rank_pattern / alpha_pattern) still come out exact under llama.cpp's single
    alpha: each B is written pre-scaled by s * r / alpha."""
    model_dir, _ = tiny["llama"]
    adapter = tmp_path / "patterned"
    torch.manual_seed(2)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora(
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})).save_pretrained(adapter)
    assert_adapter_gguf_on_base_equals_merged(model_dir, adapter, tmp_path)


# ---- refusals: one line, nothing written ---------------------------------------------------------------------

def refused(capsys, *args) -> str:
    """The one error line of a refused export (stderr may also hold the model loader's progress bars)."""
    capsys.readouterr()
    assert export(*args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("peftlab export: error: "), lines
    assert sum("error" in line for line in lines) == 1, lines
    return lines[-1]


def test_refuses_existing_output_unless_overwrite(tiny, tmp_path, capsys):
    model_dir, adapter = tiny["llama"]
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    assert "--overwrite" in refused(capsys, model_dir, "--adapter", adapter, "--to", "gguf", out)
    assert out.read_text() == "keep me"
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", out, "--overwrite") == 0
    assert out.read_bytes()[:4] == b"GGUF"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not the temporary file's private 0600


def test_full_disk_leaves_no_file(tiny, tmp_path, capsys, monkeypatch):
    import gguf

    model_dir, adapter = tiny["llama"]
    pad = gguf.GGUFWriter.write_padding  # called after the header, the metadata and each tensor
    calls = []

    def fill_up(self, *args, **kwargs):  # the disk fills up after a few tensors are written
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pad(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_padding", fill_up)
    err = refused(capsys, model_dir, "--adapter", adapter, "--to", "gguf", tmp_path / "model.gguf")
    assert "disk is full" in err
    assert os.listdir(tmp_path) == []  # neither the final name nor the temporary file


def test_refuses_unsupported_architecture_by_name(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "gpt2", "gpt2")
    err = refused(capsys, model_dir, "--to", "gguf", tmp_path / "m.gguf")
    assert "'gpt2'" in err and "llama" in err and "qwen2" in err
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_tokenizer_gguf_cannot_describe(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "llama", "llama")  # conftest's word-level tokenizer
    assert "byte-level BPE" in refused(capsys, model_dir, "--to", "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_unmergeable_method(tiny, tmp_path, capsys):
    from peftlab import BottleneckConfig

    model_dir, _ = tiny["llama"]
    adapter = tmp_path / "bottleneck"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), BottleneckConfig()).save_pretrained(adapter)
    err = refused(capsys, model_dir, "--adapter", adapter, "--to", "gguf", tmp_path / "m.gguf")
    assert "bottleneck" in err and "cannot be merged" in err


def test_refuses_classification_adapter(tiny, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = tiny["llama"]
    adapter = tmp_path / "cls"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")).save_pretrained(adapter)
    err = refused(capsys, model_dir, "--adapter", adapter, "--to", "gguf", tmp_path / "m.gguf")
    assert "SEQ_CLS" in err and "score" in err and "head" in err


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_adapter_only_refuses_other_methods(tiny, tmp_path, capsys, method):
    from peftlab import DoraConfig, IA3Config

    model_dir, _ = tiny["llama"]
    adapter = tmp_path / method
    config = (DoraConfig(r=2, target_modules=["q_proj"]) if method == "dora"
              else IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(adapter)
    err = refused(capsys, model_dir, "--adapter", adapter, "--adapter-only", "--to", "gguf", tmp_path / "a.gguf")
    assert "plain LoRA" in err and ("DoRA" if method == "dora" else "ia3") in err
    assert export(model_dir, "--adapter", adapter, "--to", "gguf", tmp_path / "m.gguf") == 0  # merged is fine


def test_adapter_only_refuses_block_types(tiny, tmp_path, capsys):
    model_dir, adapter = tiny["llama"]
    err = refused(capsys, model_dir, "--adapter", adapter, "--adapter-only", "--to", "gguf", tmp_path / "a.gguf",
                  "--type", "q8_0")
    assert "q8_0" in err and "f32" in err


def test_to_safetensors_is_merge(tiny, tmp_path):
    model_dir, adapter = tiny["qwen2"]
    out = tmp_path / "merged"
    assert export(model_dir, "--adapter", adapter, "--to", "safetensors", out) == 0
    ids = token_ids(AutoTokenizer.from_pretrained(model_dir))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids),
                               logits(merged_model(model_dir, adapter), ids), atol=1e-5, rtol=0)


# ---- against a file llama.cpp wrote: the shipped SmolLM2 GGUF ----------------------------------------------------

@pytest.mark.slow
def test_shipped_smollm2_export_matches_llama_cpp_layout(tmp_path):
    """Exporting the shipped base model at f32 reproduces the shipped GGUF (written by llama.cpp's converter, Q4_1)
    tensor for tensor after dequantization (peftlab's copy *is* that file dequantized), including the permuted
    q/k rows, and the same vocabulary, merges, token types, special ids and chat template."""
    from gguf import GGUFReader, dequantize

    from peftlab.models import shipped_gguf

    out = tmp_path / "smollm2.gguf"
    assert export("smollm2", "--to", "gguf", out, "--type", "f32") == 0
    ours, theirs = GGUFReader(out), GGUFReader(os.path.join(*shipped_gguf()))
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        np.testing.assert_array_equal(np.asarray(mine[t.name].data), dequantize(t.data, t.tensor_type), t.name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


@pytest.mark.slow
def test_shipped_smollm2_q8_0_top1_agrees_on_real_text(tmp_path):
    """q8_0: top-1 token agreement >= 0.99 with the f32 model on 1000 positions of real chat text. (On 400 positions
    of every 50th conversation it was 0.9875: 5 flips, near-ties of this 135M model; docs/export.md.)"""
    import json

    from peftlab.data.shipped import chatterbot_jsonl
    from peftlab.models import load_model, load_tokenizer

    out = tmp_path / "smollm2-q8_0.gguf"
    assert export("smollm2", "--to", "gguf", out, "--type", "q8_0") == 0
    tokenizer = load_tokenizer("smollm2")
    rows = [json.loads(line) for line in open(chatterbot_jsonl(str(tmp_path / "chat.jsonl")), encoding="utf-8")]
    ids: list[int] = []
    for row in rows[::37]:  # as benchmarks/export_gguf.py: 1000 positions spread over the corpus' files
        ids += tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([ids[:1000]])
    assert ids.shape[1] == 1000
    agree = (logits(gguf_model(out), ids).argmax(-1) == logits(load_model("smollm2").eval(), ids).argmax(-1))
    assert agree.float().mean() >= 0.99


def test_pre_tokenizer_names_are_llama_cpp_spellings():
    # llama.cpp's vocabulary loader (src/llama-vocab.cpp) knows "gpt-2" and "smollm"; "gpt2" made it refuse the
    # whole file ("unknown pre-tokenizer type: 'gpt2'", found by benchmarks/llamacpp_check.py).
    from peftlab.export.tokenizer import pre_tokenizer_name

    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, {"type": "ByteLevel"}]}) == "smollm"
