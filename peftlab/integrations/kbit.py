"""PEFT's `prepare_model_for_kbit_training`, for a base model loaded quantised by transformers (bitsandbytes 4/8-bit,
GPTQ, ...) before adapters are put on it."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

# Quantisation methods whose layers hold their own dtypes: PEFT leaves every parameter's dtype as it is for these.
KEEP_DTYPES = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None, auto_clear_cache: bool = True
                                    ) -> nn.Module:
    """PEFT's steps, in its order: freeze every parameter; cast fp16/bf16 parameters to fp32 (not the 4-bit ones, nor
    for the methods in KEEP_DTYPES); for a k-bit model with `use_gradient_checkpointing`, make the input embeddings'
    output require grad (reentrant checkpointing gives adapters inside checkpointed layers no gradient otherwise) and
    switch gradient checkpointing on. Returns the same model."""
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if getattr(model, "hqq_quantized", False):
        method = "hqq"
    quantised = kbit or method in KEEP_DTYPES
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    if method not in KEEP_DTYPES:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if quantised and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):  # non-reentrant checkpointing needs no help
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable
                                                                             ).parameters
        if not takes_kwargs and kwargs:
            warnings.warn("gradient_checkpointing_kwargs is not supported by this model's "
                          "gradient_checkpointing_enable (an old transformers); they are ignored.", FutureWarning,
                          stacklevel=2)
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {}))
    return model
