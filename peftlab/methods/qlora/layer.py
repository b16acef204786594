"""QLoRA's layers: `NF4Linear`, a frozen linear layer whose weight is held in 4-bit NF4, and `QLoraLinear`, LoRA's
linear wrapper around one.

    y = W_hat x + b + s B A x          W_hat = dequantize(NF4 codes, scales)  (out, in), frozen
                                       A (r, in), B (out, r) fp32 and trained, s = alpha / r (alpha / sqrt(r), rsLoRA)

Memory. `get_peft_model(model, QLoraConfig(...))` replaces each targeted nn.Linear (or transformers' Conv1D) by a
QLoraLinear whose `base_layer` is an NF4Linear built from it: the packed codes (n/2 bytes for n weights) and the scales
(about n/64 bytes with double quantisation; see kernels/nf4.py) replace the fp32 weight, which is dropped (freed unless
something else still refers to it, e.g. an output head tied to the input embeddings). The bias stays as it was.

Forward. W_hat is rebuilt from the codes on every call, just before the matmul, in the compute dtype (the input's
dtype by default; fp32 arithmetic, one cast, as bitsandbytes does), and dropped after it: holding it would give the
memory back. Backward rebuilds it once more for the input's gradient instead of keeping it from the forward
(`_NF4Matmul`), so training holds no (out, in) float matrix per layer between the passes either. W gets no gradient.
Cost on CPU (one core): 2.3 ms per dequantisation of a 1536 x 576 matrix to fp32 with the torch kernels, 0.6 ms
with bitsandbytes'; on SmolLM2 with every linear layer adapted a training step (batch 2 x 64) took 1.30-1.39x (torch
kernels) or 1.06-1.19x (bitsandbytes') the time of LoRA on the fp32 base in two runs of benchmarks/qlora_memory.py on
a shared 2-core machine.

Fast path. `peftlab.kernels.enable(model, backend)` switches QLoraLinear, like LoraLinear, onto one fused autograd
node (kernels/qlora_linear.py): W_hat is dequantised just before the base GEMM (Triton: kernels/nf4_dequant.py, one
pass from the codes to the compute dtype, then the GEMM with the low-rank term in its epilogue), and again for dx in
backward; the node keeps x and the (N, r) product x A^T only, not the fp32 copy of x that the plain path's A matmul
keeps. Same numbers as the plain path (the torch backend bit for bit in forward). It runs where methods/lora/fused.py's
conditions hold (one live adapter, no dropout at work) and `QLoraLinear.fused_base_forward`'s: the base is this
layer's NF4 base (not merged, not Conv1D), compute_dtype is "auto" or the input's dtype, and backend is not
"bitsandbytes": an explicit request for bitsandbytes' kernels keeps the plain path, which runs them. (With "auto" the
torch backend dequantises through `NF4Linear.dequantized_weight`, i.e. bitsandbytes where the layer picks it, which it
does only where it reproduces kernels/nf4.py bit for bit; the triton backend always uses peftlab's kernel.)

Merging (`merge_adapter`, `merge_and_unload`): W_hat + s B A is computed in fp32 and the layer's base becomes a plain
nn.Linear (Conv1D) holding it in the base weight's original dtype: the merged model is NOT re-quantised (re-quantising
would round most of the update away: its entries are far below the NF4 steps of 0.08-0.28 x the block's absmax), so
merged layers take full-precision memory again. While merged, the NF4 base is kept aside (1/8 of an fp32 weight), so
that `unmerge_adapter` restores it exactly. (Core's merge loop runs it: `weight_to_merge_into` gives W_hat,
`store_merged_weight` swaps in the float layer.) `peftlab merge` does the same from a saved adapter, whose file reads as
plain LoRA: the run's run_config.yaml (or --method qlora) says it is QLoRA, and the base is loaded and quantised as the
run did before the merge.

Unloading (`unload`, deleting a layer's last adapter) puts a plain nn.Linear (Conv1D) with W_hat back into the model:
the original full-precision weights are gone since quantisation, so quantise -> unload is lossy (the error bound is
in kernels/nf4.py).

Files. An adapter file holds A and B (and trained biases; PEFT's LoRA layout), so it applies to any copy of the base:
onto the dequantised base (the model `unload()` returns) it gives this model's output exactly, and onto the original
full-precision base a model that differs from this one by the quantisation error alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import ConfigError
from ...core.layer import linear_shape
from ...core.targets import Conv1D
from ...kernels.qlora_linear import fused_qlora_linear
from ..lora.layer import LoraLayer, LoraLinear
from . import bnb
from ...kernels.nf4 import NF4State, dequantize_nf4, dequantize_nf4_scratch, nf4_nbytes, quantize_nf4

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantSettings:
    """How a base weight is quantised and computed with (the QLoraConfig fields that describe the base)."""

    blocksize: int = 64
    """Weights per first-level block (QLoraConfig.bnb_4bit_blocksize)."""

    double_quant: bool = True
    """8-bit scales (QLoraConfig.bnb_4bit_use_double_quant)."""

    backend: str = "auto"
    """Kernels: "auto", "torch" or "bitsandbytes" (QLoraConfig.backend)."""

    compute_dtype: str = "auto"
    """The matmul's dtype: "auto" (the input's) or a COMPUTE_DTYPES name (QLoraConfig.compute_dtype)."""

    @classmethod
    def of(cls, config) -> "QuantSettings":
        return cls(config.bnb_4bit_blocksize, config.bnb_4bit_use_double_quant, config.backend, config.compute_dtype)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor as int32 words with the same bits. `model.to(torch.bfloat16)` / `.half()` cast every floating
    buffer; a scale rounded to bf16 (8 mantissa bits) would move all 64 weights of its block by up to 0.4 %, so the
    fp32 scales are kept as integers, which dtype casts leave alone (device moves still apply)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def _from_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.float32)


class _NF4Matmul(torch.autograd.Function):
    """y = W_hat x + b with W_hat dequantised in forward and again in backward, never saved between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        weight = layer.dequantized_weight(x.dtype, scratch=True)  # used here and dropped: reused buffers
        return layer.matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer.dequantized_weight(grad_out.dtype, scratch=True)  # (out, in), or (in, out) for Conv1D
            grad_x = (grad_out @ (weight.T if layer.fan_in_fan_out else weight)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, layer.out_features).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer (nn.Linear, or transformers' Conv1D with its (in, out) weight) held in NF4.

    `weight` is the packed uint8 codes, (ceil(n/2),), a parameter without gradient (as bitsandbytes' Linear4bit holds
    it), so code reading `module.weight` finds the 4-bit tensor, not a float matrix: use `dequantized_weight()`. The
    scales are buffers (`absmax`, and with double quantisation `absmax_scale`, `absmax_offset`; fp32 ones stored as
    int32 bits, see `_as_bits`). `bias` is the original module's bias parameter, unchanged."""

    linear_like = True  # a linear layer to target matching ("all-linear"), e.g. when quantised at load (load.py)

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: nn.Parameter | None, in_features: int,
                 out_features: int, fan_in_fan_out: bool = False, backend: str = "auto",
                 compute_dtype: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = in_features, out_features, fan_in_fan_out
        self.shape, self.weight_dtype = torch.Size(state.shape), state.dtype
        self.blocksize, self.dq_blocksize = state.blocksize, state.dq_blocksize
        self.backend, self.compute_dtype = backend, compute_dtype
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax", state.absmax if state.double_quant else _as_bits(state.absmax))
        self.register_buffer("absmax_scale", _as_bits(state.absmax_scale) if state.double_quant else None)
        self.register_buffer("absmax_offset", _as_bits(state.offset) if state.double_quant else None)
        self.bias = bias

    @classmethod
    def from_float(cls, module: nn.Module, settings: QuantSettings = QuantSettings(),
                   weight: torch.Tensor | None = None) -> "NF4Linear":
        """Quantise `module`'s weight (nn.Linear (out, in), Conv1D (in, out): each in its stored layout), or `weight`
        in its place (loading: the tensor just read for a module still on the meta device; see load.py)."""
        weight = module.weight.detach() if weight is None else weight
        if settings.backend == "bitsandbytes":
            packed, state = bnb.quantize(weight, settings.blocksize, settings.double_quant)
        else:  # "auto" quantises with the reference too: the same quantised model with or without bitsandbytes
            packed, state = quantize_nf4(weight, settings.blocksize, settings.double_quant)
        in_f, out_f, fan_in_fan_out = linear_shape(module)
        quantised = cls(packed, state, module.bias, in_f, out_f, fan_in_fan_out, settings.backend,
                        settings.compute_dtype)
        return quantised.train(module.training)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` reach the float tensors only; the 4-bit weight is not one, but it
        # stands for a float weight of `weight_dtype`, which must follow such a cast (so that unload and merge give
        # layers of the model's new dtype). `fn` is probed on an empty tensor of that dtype to see what it does.
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight.device)).dtype
        return super()._apply(fn, recurse)

    @property
    def settings(self) -> QuantSettings:
        return QuantSettings(self.blocksize, self.absmax_scale is not None, self.backend, self.compute_dtype)

    def state(self) -> NF4State:
        """The NF4State of the stored codes (views of the buffers, nothing copied)."""
        double = self.absmax_scale is not None
        return NF4State(self.shape, self.weight_dtype, self.blocksize,
                        self.absmax if double else _from_bits(self.absmax), _from_bits(self.absmax_scale),
                        _from_bits(self.absmax_offset), self.dq_blocksize)

    def _kernels(self, dtype: torch.dtype) -> str:
        """'bitsandbytes' or 'torch': who dequantises now (see bnb.py for what `backend` means)."""
        if self.backend == "torch":
            return "torch"
        device = self.weight.device.type
        problem = bnb.device_problem(device)
        if dtype not in COMPUTE_DTYPES.values():
            problem = problem or f"bitsandbytes dequantises to fp32/bf16/fp16 only, not {dtype}"
        elif self.shape[-1] % 2:
            # bitsandbytes' CPU kernel sends an odd last dimension to a torch.compile'd fallback (a compile per shape).
            problem = problem or f"an odd last dimension ({tuple(self.shape)}) goes to a slow fallback in bitsandbytes"
        if problem is None:
            return "bitsandbytes"
        if self.backend == "bitsandbytes":
            raise RuntimeError(f"QLoRA backend='bitsandbytes' cannot dequantise this layer's weight: {problem}. "
                               f"Use backend='auto' (falls back to peftlab's kernels, same results) or 'torch'.")
        return "torch"

    def dequantized_weight(self, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
        """W_hat in its stored layout ((out, in); Conv1D (in, out)), in `dtype` (default: the original dtype).
        scratch=True (for a matmul that drops W_hat at once): on a CPU, computed in buffers this thread reuses
        (kernels/nf4.py `dequantize_nf4_scratch`: same values, valid until the next such call); elsewhere as usual
        (CUDA's caching allocator already reuses the blocks)."""
        dtype = dtype or self.weight_dtype
        if self._kernels(dtype) == "bitsandbytes":
            return bnb.dequantize(self.weight, self.state(), dtype)
        if scratch and self.weight.device.type == "cpu":
            return dequantize_nf4_scratch(self.weight, self.state(), dtype)
        return dequantize_nf4(self.weight, self.state(), dtype)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """What the original module computes with `weight` (its ops, so that results match it bit for bit)."""
        bias = None if bias is None else bias.to(x.dtype)
        if not self.fan_in_fan_out:
            return F.linear(x, weight, bias)
        flat = x.reshape(-1, x.shape[-1])  # transformers' Conv1D: addmm(bias, x, W) on (in, out)
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype == "auto":
            return _NF4Matmul.apply(x, self.bias, self)
        compute = COMPUTE_DTYPES[self.compute_dtype]
        return _NF4Matmul.apply(x.to(compute), self.bias, self).to(x.dtype)

    def to_float(self, weight: torch.Tensor | None = None) -> nn.Module:
        """A plain nn.Linear (Conv1D) in the original dtype holding `weight` (default W_hat), sharing this layer's
        bias parameter, in this layer's train/eval mode (a new module would start in train mode)."""
        weight = self.dequantized_weight() if weight is None else weight.to(self.weight_dtype)
        if self.fan_in_fan_out:
            module = Conv1D(self.out_features, self.in_features)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = self.bias
        return module.train(self.training)

    def nbytes(self) -> int:
        """Bytes of the quantised weight: packed codes + scales (the bias not included)."""
        return self.weight.numel() + self.state().nbytes()

    def extra_repr(self) -> str:
        n = self.shape.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.absmax_scale is not None}, "
                f"{self.nbytes():,} bytes ({8 * self.nbytes() / n:.3f} bits/weight), backend={self.backend}, "
                f"compute_dtype={self.compute_dtype}")


class QLoraLinear(LoraLinear):
    """LoRA (fp32 A, B) on a frozen NF4 base: the wrapper quantises its nn.Linear / Conv1D base when its first
    adapter is added. See the module docstring for forward, merging, unloading and files."""

    def __init__(self, base_layer: nn.Module) -> None:
        if isinstance(base_layer, NF4Linear):  # a model holding NF4Linear modules of its own: LoRA's shape rule
            LoraLayer.__init__(self, base_layer)  # would read the packed (n/2,) codes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.fan_in_fan_out = base_layer.fan_in_fan_out
            self.lora_A = nn.ModuleDict()
            self.lora_B = nn.ModuleDict()
        else:
            super().__init__(base_layer)
        # The NF4 base while a merge has put a float layer in its place (a list: not a submodule, so the state dict
        # and parameter names stay those of the merged layer); `_apply` moves it with the model.
        self.set_aside: list[NF4Linear] = []

    @property
    def quantised_base(self) -> NF4Linear | None:
        """The NF4 base (set aside while merged); None before the first adapter has quantised it."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer
        return self.set_aside[0] if self.set_aside else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for module in self.set_aside:
            module._apply(fn, recurse)
        return self

    def fused_base_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """This layer's output through the fused QLoRA node, or None (the plain forward runs). lora/fused.py calls it
        once its own conditions hold (kernels enabled, one live adapter `adapter_name`, no dropout at work, no extra
        arguments); None here where the node would not compute this forward, or was not asked for (module docstring):
        base not the NF4 base or a Conv1D one, backend="bitsandbytes", compute_dtype other than "auto" and x's."""
        base = self.base_layer
        if not isinstance(base, NF4Linear) or base.fan_in_fan_out or base.backend == "bitsandbytes":
            return None
        if base.compute_dtype != "auto" and COMPUTE_DTYPES[base.compute_dtype] != x.dtype:
            return None  # the plain path casts x to compute_dtype for the base GEMM only, the adapter sees x itself
        return fused_qlora_linear(x, base.weight, base.state(), base.bias, self.lora_A[adapter_name].weight,
                                  self.lora_B[adapter_name].weight, self.scaling[adapter_name],
                                  backend=self.kernel_backend, dequantize=base.dequantized_weight)

    def _make_pair(self, r, dtype, device):
        # fp32 adapters whatever the base holds (LoRA's rule reads the base weight's dtype, here uint8 codes).
        return super()._make_pair(r, torch.float32, device)

    def add_adapter(self, adapter_name: str, config, module_name: str) -> None:
        settings = QuantSettings.of(config)
        quantised = self.quantised_base
        if quantised is not None and quantised.settings != settings:
            raise ConfigError(
                f"{module_name} already holds its base weight quantised with {quantised.settings}; adapter "
                f"{adapter_name!r} asks for {settings}. One base weight has one quantisation: give the new QLoraConfig "
                "the same bnb_4bit_blocksize, bnb_4bit_use_double_quant, backend and compute_dtype."
            )
        super().add_adapter(adapter_name, config, module_name)  # A, B first: a failure leaves the base untouched
        given = self.__dict__.pop("nf4_init", None)  # LoftQ's Q (lora/loftq.py): A, B were fitted to exactly it
        if quantised is None and given is not None:
            self.base_layer = NF4Linear(*given, self.base_layer.bias, self.in_features, self.out_features,
                                        self.fan_in_fan_out, settings.backend,
                                        settings.compute_dtype).train(self.base_layer.training)
        elif quantised is None:
            self.base_layer = NF4Linear.from_float(self.base_layer, settings)

    # ---- merging: into a float copy of the dequantised weight; the NF4 base is kept aside ------------------
    # Core's merge loop (AdapterLayer.merge: merged_weight, safe_merge, bookkeeping) runs with these two hooks.

    def weight_to_merge_into(self) -> torch.Tensor:
        """W_hat, the dequantised NF4 weight the adapter was trained against (fp32), for the first merge; then the
        merged float layer's weight."""
        if self.merged_adapters:
            return self.base_layer.weight.data
        return self.quantised_base.dequantized_weight(torch.float32)

    def store_merged_weight(self, weight: torch.Tensor) -> None:
        if self.merged_adapters:  # already a float layer: write into it
            super().store_merged_weight(weight)
            return
        warnings.warn(
            "QLoRA merge: the adapters were added to the dequantised 4-bit base weights, and the merged layers are "
            "plain full-precision nn.Linear layers, NOT re-quantised (re-quantising would round most of the update "
            "away); they take full-precision memory. unmerge_adapter() restores the 4-bit base exactly.",
            UserWarning, stacklevel=4,
        )
        quantised = self.quantised_base
        self.set_aside = [quantised]
        self.base_layer = quantised.to_float(weight)

    def unmerge(self) -> None:
        """Put the NF4 base back (exactly as before the merge) and drop the float layer."""
        if self.merged_adapters:
            self.base_layer = self.set_aside.pop()
            self.merged_adapters.clear()

    def unwrapped(self) -> nn.Module:
        """The merged float layer, or a plain nn.Linear (Conv1D) with the dequantised weight W_hat: lossy, the
        original full-precision weight is gone since quantisation."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.to_float()
        return self.base_layer


__all__ = ["NF4Linear", "QLoraLinear", "QuantSettings", "COMPUTE_DTYPES", "nf4_nbytes"]
