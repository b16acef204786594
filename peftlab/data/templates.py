"""Named chat templates for bases that ship none, and the template that travels with an adapter.

`data.chat_template: NAME | path.jinja` gives the training tokenizer a chat template (`install_chat_template`);
the run saves it as `chat_template.jinja` in the adapter folder (`save_adapter_template`), and `peftlab
generate`, `serve` and `export` put it back on the base's tokenizer (`apply_adapter_template`), so the prompt
seen at inference is rendered exactly as in training.

Why a `chat_template.jinja` file in the adapter folder (and not a field of run_config.yaml): generate, serve and
export are given the adapter folder, which is also what people copy and upload; run_config.yaml sits one folder
up in the run's output_dir and is not there after a copy. The file name is the one transformers itself writes
for a tokenizer's template (tokenizer.save_pretrained), so other tools that read a template file find it. The
vocabulary is not copied: it is the base's, unchanged.

The built-in templates are written here from each format's published description (one line each below).
`tokens` lists the format's special markers that must each be ONE token of the base vocabulary: a marker that
the tokenizer splits into pieces would train, but generation could not stop at the end of a turn (the stop is
a token id) and the markers' embeddings would be those of ordinary text. Pretrained bases usually carry them
(Llama 3 base: <|eot_id|> ...; Gemma base: <start_of_turn> ...; Qwen2 / SmolLM2 base: <|im_start|> ...), with
no template to use them. Formats whose markers are plain text (alpaca, zephyr, mistral v1) need only the
tokenizer's own bos/eos, so they fit any base with an eos token.

The assistant turn of every template ends with its end-of-turn token (rendered into the trained part: encode.py
trains exactly the tokens between "prompt + generation prompt" and "prompt + reply"), and `stop_token_ids`
finds that token for any template, built-in or from a file, by rendering a probe conversation.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass

from .config import DataError

log = logging.getLogger(__name__)

ADAPTER_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    tokens: tuple[str, ...]
    """Special markers that must each be a single token of the vocabulary."""
    about: str
    """The format, as published, in one line (generation prompt: what the model answers after)."""


_RAISE_TOOL = "{{ raise_exception('this template has no tool role; map tool turns to user or drop them') }}"

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
        ("<|im_start|>", "<|im_end|>"),
        "ChatML (OpenAI; Qwen, SmolLM2, Hermes): <|im_start|>ROLE\\nTEXT<|im_end|>\\n per turn; "
        "generation prompt <|im_start|>assistant\\n"),
    "llama-3": ChatTemplate(
        "{{- '<|begin_of_text|>' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role']) + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Meta Llama 3: <|begin_of_text|>, then <|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|> per turn "
        "(tool results as role ipython); generation prompt the assistant header"),
    "mistral": ChatTemplate(
        "{{- bos_token -}}"
        "{%- set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- set turns = messages[1:] if system else messages -%}"
        "{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('mistral: turns must alternate user/assistant, starting with the user') }}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}",
        (),
        "Mistral Instruct v0.1/v0.2: <s>[INST] USER [/INST] REPLY</s>[INST] ...; a system message opens the first "
        "user turn; the generation prompt is the closing [/INST]; markers are text, <s>/</s> the tokenizer's bos/eos"),
    "alpaca": ChatTemplate(
        "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
        "{%- else -%}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\\n\\n' }}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}"
        "{%- elif m['role'] == 'tool' -%}" + _RAISE_TOOL + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}",
        (),
        "Stanford Alpaca: the preamble (or the system message), then ### Instruction:\\nUSER\\n\\n and "
        "### Response:\\nREPLY</s> per turn; generation prompt ### Response:\\n"),
    "zephyr": ChatTemplate(
        "{%- for m in messages -%}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}",
        (),
        "Zephyr (HuggingFaceH4): <|ROLE|>\\nTEXT</s>\\n per turn, the role markers plain text and </s> the "
        "tokenizer's eos; generation prompt <|assistant|>\\n"),
    "gemma": ChatTemplate(
        "{{- bos_token -}}"
        "{%- set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for m in (messages[1:] if system else messages) -%}"
        "{%- if m['role'] == 'tool' -%}" + _RAISE_TOOL + "{%- endif -%}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n'"
        " + (system if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}",
        ("<start_of_turn>", "<end_of_turn>"),
        "Google Gemma: <bos>, then <start_of_turn>user|model\\nTEXT<end_of_turn>\\n per turn (no system role: "
        "it opens the first user turn); generation prompt <start_of_turn>model\\n"),
}


def template_name_problem(value: str) -> str | None:
    """What is wrong with `value` as data.chat_template (None: a built-in name, or a path to read later). Pure string
    work (no file access), so a config is checked before any model or file is at hand."""
    if value in TEMPLATES or _is_path(value):
        return None
    near = difflib.get_close_matches(value.lower(), list(TEMPLATES), n=3, cutoff=0.4)
    hint = f" Nearest: {', '.join(near)}." if near else ""
    return (f"data.chat_template={value!r} is not a built-in chat template.{hint} Built-in: {', '.join(TEMPLATES)}; "
            f"or give the path of a .jinja file.")


def _is_path(value: str) -> bool:
    return value.endswith(".jinja") or os.sep in value or "/" in value


def template_text(value: str) -> str:
    """The Jinja text for a built-in NAME or a .jinja path."""
    problem = template_name_problem(value)
    if problem:
        raise DataError(problem)
    if value in TEMPLATES:
        return TEMPLATES[value].jinja
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise DataError(f"data.chat_template: the template file {value} does not exist (absolute: "
                        f"{os.path.abspath(path)}). Give a .jinja file or a built-in name ({', '.join(TEMPLATES)}).")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if not text.strip():
        raise DataError(f"data.chat_template: the template file {value} is empty.")
    return text


def check_tokens(tokenizer, name: str) -> None:
    """A built-in template's markers must be single tokens of `tokenizer`; its eos must exist."""
    missing = [t for t in TEMPLATES[name].tokens if not _single_token(tokenizer, t)]
    if missing:
        fits = [n for n, t in TEMPLATES.items() if all(_single_token(tokenizer, m) for m in t.tokens)]
        raise DataError(f"data.chat_template={name}: the tokenizer has no single token for {', '.join(missing)} "
                        f"(it would split them into pieces, and generation could not stop at the end of a turn). "
                        f"Templates that fit this tokenizer: {', '.join(fits)}; or use a base whose vocabulary has "
                        f"these tokens, or a .jinja file.")
    if getattr(tokenizer, "eos_token", None) is None:
        raise DataError(f"data.chat_template={name}: the tokenizer has no eos_token, which ends every assistant turn. "
                        f"Set one (`tokenizer.eos_token = ...`).")


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1 and \
        tokenizer.convert_tokens_to_ids(text) not in (None, tokenizer.unk_token_id)


def install_chat_template(tokenizer, value: str | None, base: str = "the base model") -> str | None:
    """Give `tokenizer` the run's chat template (a built-in NAME or a .jinja path); return its text, or None when
    `value` is None (the tokenizer keeps its own). Installing the same text again does nothing; replacing a template
    the base ships with is allowed but warned about, since tools that load the base's tokenizer would render prompts
    the other way."""
    if value is None:
        return None
    text = template_text(value)
    if value in TEMPLATES:
        check_tokens(tokenizer, value)
    own = getattr(tokenizer, "chat_template", None)
    if own == text:
        return text
    if own:
        log.warning("data.chat_template=%s replaces the chat template that %s ships with: the adapter is trained on "
                    "prompts rendered with %s, which is saved in the adapter folder (%s) and used by peftlab "
                    "generate / serve / export; other tools that load the base's tokenizer will render prompts the "
                    "base's way, which the adapter was not trained on.", value, base, value, ADAPTER_TEMPLATE_FILE)
    tokenizer.chat_template = text
    return text


def save_adapter_template(adapter_dir: str, value: str | None) -> str | None:
    """Write the run's chat template (data.chat_template) into the adapter folder as chat_template.jinja
    (atomically); nothing when the run set none. Returns the path written."""
    if value is None:
        return None
    from ..io.atomic import atomic_write_text

    path = os.path.join(adapter_dir, ADAPTER_TEMPLATE_FILE)
    atomic_write_text(path, template_text(value))
    return path


def adapter_template(adapter_dir: str | None) -> str | None:
    """The chat template saved with an adapter, or None: peftlab's chat_template.jinja, else the template in a
    tokenizer_config.json that other trainers (axolotl, LLaMA-Factory, TRL) save beside their adapters."""
    if not adapter_dir:
        return None
    path = os.path.join(adapter_dir, ADAPTER_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    config = os.path.join(adapter_dir, "tokenizer_config.json")
    if os.path.isfile(config):
        import json

        with open(config, encoding="utf-8") as fh:
            found = json.load(fh).get("chat_template")
        return found if isinstance(found, str) and found else None
    return None


def apply_adapter_template(tokenizer, adapter_dir: str | None, warn=None) -> list[int]:
    """Put the adapter's saved chat template on the base's `tokenizer` (when it saved one) and return the token ids
    generation must also stop at (its end of turn; [] when it saved none). `warn(message)` is told when this
    replaces a different template of the base."""
    text = adapter_template(adapter_dir)
    if text is None:
        return []
    own = getattr(tokenizer, "chat_template", None)
    if own and own != text and warn is not None:
        warn(f"using the chat template saved with the adapter ({os.path.join(adapter_dir, ADAPTER_TEMPLATE_FILE)}), "
             f"which differs from the base model's: the adapter was trained on it")
    tokenizer.chat_template = text
    return stop_token_ids(tokenizer)


def add_stop_ids(model, stops: list[int]) -> None:
    """Make `model.generate` (and a saved generation_config.json) also stop at `stops`."""
    config = getattr(model, "generation_config", None)
    if not stops or config is None:
        return
    eos = config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    config.eos_token_id = list(dict.fromkeys(eos + list(stops)))


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """The token that ends an assistant turn under `template` (default: the tokenizer's chat template), as [id],
    if it is a special (added) token; [] when the turn ends in ordinary text or the template cannot render a probe.

    Found by rendering user "x" + assistant "PROBE" and tokenising what follows the reply: "<|im_end|>\\n" gives
    <|im_end|>, "</s>\\n\\n" the eos."""
    probe = "Zq"
    try:
        probe_chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        text = tokenizer.apply_chat_template(probe_chat, tokenize=False, chat_template=template)
    except Exception:  # a template that refuses the probe: no stop token to add, generation keeps the model's
        return []
    tail = text[text.rfind(probe) + len(probe):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []


__all__ = ["ADAPTER_TEMPLATE_FILE", "ChatTemplate", "TEMPLATES", "adapter_template", "add_stop_ids",
           "apply_adapter_template", "install_chat_template", "save_adapter_template", "stop_token_ids",
           "template_name_problem", "template_text"]
