"""Writing GGUF files: a merged model (weights + tokenizer + chat template) or a llama.cpp LoRA adapter.

Both go through gguf-py's GGUFWriter into a temporary file beside OUT that is renamed over OUT only when complete
(peftlab.io.atomic): a crash or a full disk leaves no half-written .gguf under the final name.

Tensor types (`--type`), as llama.cpp's converter and llama-quantize choose them:
- 1-D tensors (norms, biases) stay F32 in every type;
- f32 / f16 / bf16: every 2-D tensor in that type;
- q8_0 / q4_0: 2-D tensors whose rows are a multiple of the 32-value block; others fall back to F16. With q4_0 the
  token embedding and output matrix are written Q8_0 (llama-quantize keeps them at 6+ bits, Q6_K, which gguf-py
  cannot encode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io.atomic import atomic_path
from .arch import ExportError, arch_spec, gguf_name, qk_permuted, tensor_name_map, write_hparams
from .tokenizer import write_tokenizer

if TYPE_CHECKING:
    import torch
    from torch import nn

# --type choices; _types maps them to gguf's enums (gguf imported only when a file is written)
TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ADAPTER_TYPE_NAMES = ("f32", "f16", "bf16")  # llama.cpp adapters: lora_a is (r, in), rarely a 32-block multiple


def _types(name: str):
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {"f32": (F.ALL_F32, Q.F32), "f16": (F.MOSTLY_F16, Q.F16), "bf16": (F.MOSTLY_BF16, Q.BF16),
             "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0), "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0)}
    if name not in table:
        raise ExportError(f"Unknown GGUF tensor type {name!r}; choose one of {', '.join(TYPE_NAMES)}.")
    return table[name]


def _add_tensor(writer, name: str, array: np.ndarray, want) -> None:
    """Encode one float32 array in type `want` (or the fallback the module docstring gives) and add it."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = want
    if array.ndim == 1:
        qtype = Q.F32
    elif want in (Q.Q8_0, Q.Q4_0):
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
            qtype = Q.F16
        elif want == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
            qtype = Q.Q8_0
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, array)
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:  # bf16 and block types: gguf-py's numpy encoders (bytes), shape given by raw_dtype
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _refuse_existing(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out!r} exists; pass --overwrite to replace it, or choose another path.")
    if os.path.isdir(out):
        raise ExportError(f"{out!r} is a folder; give a file path ending in .gguf.")


def _write(writer, out: str) -> None:
    """Write the writer's header, metadata and tensors to `out` atomically."""
    with atomic_path(out) as tmp:
        writer.open_output_file(Path(tmp))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        mask = os.umask(0)  # the temporary file is private (0600); the model file is as readable as any other
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)


def _lm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to write; lm_head left out when it shares the embedding's storage (tied: GGUF has no
    output.weight then, and transformers' loader reads its absence as tie_word_embeddings=True)."""
    state = model.state_dict()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def write_model_gguf(model: nn.Module, tokenizer, out: str, type_name: str = "f16", overwrite: bool = False,
                     name: str | None = None) -> str:
    """Write a plain transformers causal LM (e.g. a merge_and_unload result) as a llama.cpp GGUF at `out`."""
    import gguf
    import torch

    _refuse_existing(out, overwrite)
    config = model.config
    spec = arch_spec(config)
    file_type, qtype = _types(type_name)
    name_map = tensor_name_map(config, spec)
    writer = gguf.GGUFWriter(None, spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or os.path.splitext(os.path.basename(out))[0])
    write_hparams(writer, config, spec)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, tokenizer, config.vocab_size)
    with torch.no_grad():
        for key, tensor in _lm_tensors(model).items():
            module, suffix = key.rsplit(".", 1)
            target = f"{gguf_name(name_map, module)}.{suffix}"
            array = qk_permuted(target, tensor.detach().float().cpu().numpy(), config, spec)
            _add_tensor(writer, target, array, qtype)
    _write(writer, out)
    return out


def write_lora_gguf(peft_model, adapter_name: str, out: str, type_name: str = "f32", overwrite: bool = False) -> str:
    """Write adapter `adapter_name` of a PeftModel (plain LoRA on Linear layers) as a llama.cpp LoRA adapter GGUF.

    llama.cpp computes, for each base tensor W with pairs `<name>.lora_a` (r, in) and `<name>.lora_b` (out, r):
        y = W x + (alpha / r) * B (A x),   alpha = adapter.lora.alpha (one value per file), r = A's row count.
    peftlab's scaling s per layer (alpha/r, alpha/sqrt(r) with rsLoRA, per-layer rank/alpha patterns) is made exact
    by writing B * s * r / alpha, so one alpha serves every layer."""
    import gguf
    import torch

    _refuse_existing(out, overwrite)
    if type_name not in ADAPTER_TYPE_NAMES:
        raise ExportError(f"An adapter GGUF is written as {', '.join(ADAPTER_TYPE_NAMES)}; got --type {type_name}. "
                          "(Block types need rows in multiples of 32: lora_a has r rows.)")
    from ..core.layer import AdapterLayer
    from ..methods.lora.layer import LoraLinear

    base = peft_model.get_base_model()
    config = base.config
    spec = arch_spec(config)
    _, qtype = _types(type_name)
    name_map = tensor_name_map(config, spec)
    alpha = float(peft_model.peft_config[adapter_name].lora_alpha)
    writer = gguf.GGUFWriter(None, spec.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    count = 0
    with torch.no_grad():
        for path, layer in base.named_modules():
            if not isinstance(layer, AdapterLayer) or adapter_name not in getattr(layer, "r", {}):
                continue
            if not isinstance(layer, LoraLinear) or layer.fan_in_fan_out:
                raise ExportError(f"{path} carries LoRA on a {type(layer.base_layer).__name__}; llama.cpp adapter "
                                  "GGUFs hold LoRA on linear layers only. Export merged instead (without --adapter-only).")
            A, B = layer.lora_pair(adapter_name)
            r = layer.r[adapter_name]
            B = B.float() * (layer.scaling[adapter_name] * r / alpha)  # (out, r)
            target = f"{gguf_name(name_map, path)}.weight"
            _add_tensor(writer, f"{target}.lora_a", A.float().cpu().numpy(), qtype)  # (r, in)
            _add_tensor(writer, f"{target}.lora_b", qk_permuted(target + ".", B.cpu().numpy(), config, spec), qtype)
            count += 1
    if not count:
        raise ExportError(f"Adapter {adapter_name!r} has no LoRA layers to write; nothing was written.")
    _write(writer, out)
    return out
