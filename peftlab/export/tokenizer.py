"""A transformers tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Written as llama.cpp's converter writes a byte-level BPE vocabulary (its `get_vocab_base`): model "gpt2", one
token string per id up to the model's vocab_size (ids the tokenizer does not use become `[PAD<id>]`, type UNUSED),
token types (1 normal, 3 control = special added tokens, 4 user-defined = other added tokens, 5 unused), the
merges, special token ids, add_bos/add_eos and the chat template. The last four come from gguf-py's SpecialVocab,
the same reader llama.cpp uses, run over the tokenizer saved to a temporary folder.

`tokenizer.ggml.pre` names the text-splitting regex. llama.cpp recognises a tokenizer by hashing its output on a
test text; we name it from the tokenizer's pre_tokenizer instead:
- ByteLevel with its own (GPT-2) regex -> "gpt-2" (llama.cpp's spelling: its vocabulary loader refuses "gpt2",
  "unknown pre-tokenizer type", found by benchmarks/llamacpp_check.py);
- Digits(individual) then ByteLevel -> "smollm" (llama.cpp's starcoder/smollm regex: the GPT-2 one after
  splitting every digit);
- Split(regex) then ByteLevel(use_regex=False) -> the llama.cpp name transformers' GGUF loader gives that regex
  (GGUF_PRE_TOKENIZER_SPLITS: "qwen2", "llama3", ...).
Anything else (SentencePiece-style vocabularies, WordLevel, ...) is refused: a GGUF whose tokenizer splits text
differently from the one the adapter was trained with would run, but on other token ids.
"""

from __future__ import annotations

import json
import tempfile

from .arch import ExportError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizers pre_tokenizer (its JSON), or None if unknown."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        names = {}
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            names.setdefault(split, name)  # the first name listed for a regex (e.g. "llama3" before "llama-bpe")
        return names.get(regex)
    return None


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Add the tokenizer's vocabulary, merges, special tokens and chat template to a GGUFWriter."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"The tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) tokenizer; GGUF "
                          "export reads the vocabulary from tokenizer.json. Save the model with a fast tokenizer.")
    spec = json.loads(backend.to_str())
    model_type = spec["model"].get("type")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model_type != "BPE" or pre is None:
        raise ExportError(
            f"The tokenizer is {model_type} with pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}; GGUF "
            "export writes byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, Qwen2) only. Export with "
            "--to safetensors, or convert the merged folder with llama.cpp's convert_hf_to_gguf.py.")
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"The tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}; resize the model's embeddings to the tokenizer first.")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if tokenizer.pad_token_id is not None:  # also when pad was set in code, not in tokenizer_config.json
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)
