"""QLoRA's config: LoRA's fields plus how the frozen base weights are held (4-bit NF4), written to files as plain
LoRA (peft_type "LORA")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ...core.config import ConfigError, check_choice
from ..lora.config import LoraConfig, init_key

QUANT_TYPES = ["nf4"]
COMPUTE_DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
BACKENDS = ["auto", "torch", "bitsandbytes"]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""kernels/nf4.py's BLOCKSIZES (bitsandbytes' first-level block sizes), repeated here so that a config is checked
without importing torch (kernels import it); tests/test_method_qlora.py checks that the two agree."""


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA (Dettmers et al., 2023): LoRA on a base whose targeted linear weights are frozen in 4-bit NF4 with
    double-quantised scales, dequantised just before each matmul (see methods/qlora/layer.py, kernels/nf4.py).

    At inference a QLoRA adapter is a LoRA adapter on the (dequantised) base, W_hat + s B A, so its file is a plain
    LoRA file (peft_type "LORA", LoraConfig's keys only; the five quantisation fields below are left out): PEFT,
    vLLM and peftlab's `lora` load it onto a full-precision base, whose output then differs from the QLoRA model's
    by the quantisation error only. To load it as QLoRA again (re-quantising a full-precision base), pass the config:
    `PeftModel.from_pretrained(base, folder, config=QLoraConfig.from_lora(read_config(folder)))`.

    Only targeted layers are quantised (the paper quantises every linear layer of the blocks and adapts them all):
    use target_modules="all-linear" for the paper's setting and the memory it saves."""

    peft_type: ClassVar[str] = "LORA"
    file_omits: ClassVar[tuple[str, ...]] = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_blocksize",
                                             "compute_dtype", "backend")

    bnb_4bit_quant_type: str = "nf4"
    """The 4-bit data type of the base weights: "nf4" (NormalFloat4, the QLoRA paper's; the only one implemented).
    Named as in transformers' BitsAndBytesConfig."""

    bnb_4bit_use_double_quant: bool = True
    """Quantise the per-block scales too (8-bit codes in blocks of 256, plus one fp32 scale per 256 and one mean
    offset): 4.127 bits per weight in all, against 4.5 with fp32 scales (QLoRA's "double quantization")."""

    bnb_4bit_blocksize: int = 64
    """Weights per first-level block, each with its own scale (absmax): 32 to 4096, powers of two (bitsandbytes'
    sizes). Smaller blocks follow the weights more closely and cost more scales; QLoRA uses 64."""

    compute_dtype: str = "auto"
    """Dtype the dequantised weight and the matmul use: "auto" (the input's dtype, so bf16 inputs compute in bf16 and
    fp32 in fp32), "float32", "bfloat16" or "float16" (the input is cast to it and the output back)."""

    backend: str = "auto"
    """Kernels for quantising and dequantising: "auto" (peftlab's NF4 reference quantises; bitsandbytes dequantises
    where it is installed and reproduces the reference exactly on the device, else the reference: the same results
    either way), "torch" (the reference only) or "bitsandbytes" (bitsandbytes for both; an error if it is missing or
    does not run on the device). See peftlab/methods/qlora/bnb.py."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ConfigError(f"{name}.bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not implemented; peftlab's "
                              "QLoRA holds base weights in 'nf4' (the QLoRA paper's type). Use 'nf4'.")
        if not isinstance(self.bnb_4bit_use_double_quant, bool):
            raise ConfigError(f"{name}.bnb_4bit_use_double_quant={self.bnb_4bit_use_double_quant!r} is not valid; "
                              "use true or false.")
        if self.bnb_4bit_blocksize not in BLOCKSIZES or isinstance(self.bnb_4bit_blocksize, bool):
            raise ConfigError(f"{name}.bnb_4bit_blocksize={self.bnb_4bit_blocksize!r} is not valid; use one of "
                              f"{', '.join(map(str, BLOCKSIZES))} (QLoRA uses 64).")
        check_choice(name, "compute_dtype", self.compute_dtype, COMPUTE_DTYPE_CHOICES)
        check_choice(name, "backend", self.backend, BACKENDS)
        if init_key(self.init_lora_weights) in ("pissa", "pissa_niter", "olora"):
            raise ConfigError(
                f"{name}.init_lora_weights={self.init_lora_weights!r} rewrites the base weight as W - s B A, which a "
                "4-bit base cannot hold without re-quantising the residual (not implemented). Use True (the default), "
                "'gaussian' or False."
            )
        if self.backend == "bitsandbytes":
            from . import bnb

            why = bnb.import_error()
            if why is not None:
                raise ConfigError(f"{name}.backend='bitsandbytes' but bitsandbytes cannot be imported ({why}). "
                                  f"Install it ({bnb.INSTALL_HINT}), or use backend='auto' or 'torch' (peftlab's own "
                                  "NF4 kernels, same format).")

    @classmethod
    def from_lora(cls, config: LoraConfig, **quantisation) -> "QLoraConfig":
        """A QLoraConfig with `config`'s LoRA fields (e.g. read from a QLoRA adapter's file, which is a LoRA file)
        and the given quantisation fields (defaults otherwise)."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig)}
        return cls(**fields, **quantisation)
