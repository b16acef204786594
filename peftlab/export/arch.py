"""Which transformers architectures go into a GGUF, and how: llama.cpp's metadata keys and tensor layout.

Three architectures are written, each the way llama.cpp's own converter (convert_hf_to_gguf.py) writes it, so
that llama.cpp and transformers' GGUF loader both read the file:

| model_type | general.architecture | q/k weights            | notes                                           |
|------------|----------------------|------------------------|-------------------------------------------------|
| llama      | llama                | permuted (see below)   | no attention/MLP biases                         |
| mistral    | llama                | permuted               | llama.cpp runs Mistral as llama; context_length |
|            |                      |                        | is capped at the sliding window (exact inside)  |
| qwen2      | qwen2                | as in transformers     | q/k/v biases                                    |

llama.cpp's rotary embedding rotates adjacent pairs (x0, x1), (x2, x3), ... of each head, while transformers'
Llama rotates the two halves (x_i, x_{i + d/2}). llama.cpp's converter therefore reorders the rows of q_proj and
k_proj inside each head (`permute` below: rows [0, d/2, 1, d/2 + 1, ...]); transformers' GGUF loader undoes it
(LlamaTensorProcessor._reverse_permute_weights). A row permutation of W = W0 + s B A is the same permutation of
W0 and of B, which is how the adapter-only export permutes lora_b.

Anything these metadata keys cannot say (rope scaling, biases on llama, a head size other than hidden / heads for
qwen2, another activation) is refused by name rather than written into a file that runs differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ExportError(ValueError):
    """An export that cannot be written as asked. The message says what was seen and what to do."""


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    """general.architecture, also the prefix of the hyperparameter keys (`llama.block_count`)."""

    permute_qk: bool
    """Reorder q/k rows for llama.cpp's adjacent-pair rotary embedding (see the module docstring)."""

    writes_rope_dim: bool
    """Write `<arch>.rope.dimension_count` (transformers reads it back as head_dim for llama)."""


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True, writes_rope_dim=True),
    "mistral": ArchSpec("llama", permute_qk=True, writes_rope_dim=True),
    "qwen2": ArchSpec("qwen2", permute_qk=False, writes_rope_dim=False),
}


def arch_spec(config) -> ArchSpec:
    """The spec for a transformers config, or ExportError naming what the GGUF could not carry."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise ExportError(
            f"model_type {model_type!r} cannot be exported to GGUF by peftlab, which writes {sorted(ARCHS)} (the "
            "llama.cpp layouts its tests check). Merge instead (peftlab merge MODEL ADAPTER OUT, or --to "
            "safetensors) and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    problems = []
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} (only plain RoPE is written)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's {spec.gguf_arch} uses silu)")
    if model_type in ("llama", "mistral"):
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            problems.append("attention_bias/mlp_bias (transformers' GGUF loader builds Llama without biases)")
    if model_type == "qwen2":
        if getattr(config, "use_sliding_window", False):
            problems.append("use_sliding_window=True (llama.cpp's qwen2 attends to the whole context)")
        if head_dim(config) != config.hidden_size // config.num_attention_heads:
            problems.append(f"head_dim {head_dim(config)} != hidden_size / num_attention_heads")
    if problems:
        raise ExportError(f"This {model_type} model cannot be written to GGUF faithfully: {'; '.join(problems)}. "
                          "Export it with --to safetensors instead.")
    return spec


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def context_length(config) -> int:
    """max_position_embeddings, capped at Mistral's sliding window: llama.cpp's llama graph attends to the whole
    context, which equals sliding-window attention exactly as long as no sequence is longer than the window."""
    n = config.max_position_embeddings
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return min(n, window) if window else n


def write_hparams(writer, config, spec: ArchSpec) -> None:
    """The `<arch>.*` keys llama.cpp reads for llama/qwen2 (and transformers maps back to the config)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if spec.writes_rope_dim:
        writer.add_rope_dimension_count(head_dim(config))
        if head_dim(config) != config.hidden_size // config.num_attention_heads:  # llama.cpp's default is n_embd/n_head
            writer.add_key_length(head_dim(config))
            writer.add_value_length(head_dim(config))


def tensor_name_map(config, spec: ArchSpec):
    """gguf-py's HF-module-name -> GGUF-name table for this architecture (the one llama.cpp's converter uses)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_name(name_map, module_path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`, or ExportError for a module llama.cpp has no slot for."""
    found = name_map.get_name(module_path)
    if found is None:
        raise ExportError(f"The module {module_path!r} has no tensor name in llama.cpp's layout; nothing was written.")
    return found


def permute_rows(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: within each head of d rows, order them [0, d/2, 1, d/2 + 1, ...].
    weight: (n_heads * d, ...) for q (n_head) or k (n_head_kv); biases and lora_b permute the same way."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def qk_permuted(name: str, array: np.ndarray, config, spec: ArchSpec) -> np.ndarray:
    """The array as llama.cpp stores GGUF tensor `name` (`blk.N.attn_q.weight`, `...attn_k.weight.lora_b`, ...)."""
    if not spec.permute_qk:
        return array
    heads = config.num_attention_heads
    if ".attn_q." in name:
        return permute_rows(array, heads, heads)
    if ".attn_k." in name:
        return permute_rows(array, heads, config.num_key_value_heads or heads)
    return array
