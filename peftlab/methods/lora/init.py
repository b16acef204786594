"""LoRA initialisers: a table from the config's `init_lora_weights` value to a function.

Each function takes (layer, adapter_name) and fills that adapter's A and B in place. New schemes are new rows; a
function may also rewrite the base weight through `layer` (PiSSA's and OLoRA's residual). A row whose config value
carries a number (PEFT's "pissa_niter_[number of iters]") is listed in NUMBERED, and receives that number as a
keyword argument.
Shapes: Linear/Conv1D A (r, in), B (out, r); Embedding A (r, vocab), B (dim, r); Conv2d A (r, in, kh, kw),
B (out, r, 1, 1). W below is the base weight as an (out, in) matrix (Conv1D's stored (in, out) is transposed on
the way in and out), s the adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).

Rows that rewrite the base weight (both as in HF PEFT's `pissa_init` / `olora_init`, value for value):

- "pissa" (PiSSA, Meng et al. 2024): W = U S V^T (full SVD, S descending). With the top r triplets,
      A = sqrt(S_r / s) V_r^T          (r, in)
      B = U_r sqrt(S_r / s)            (out, r)
  so s B A = U_r S_r V_r^T, W's principal rank-r part, and the base weight becomes the residual
      W_res = W - s B A = U_{r+} S_{r+} V_{r+}^T.
  The model's output is unchanged at init (W_res + s B A = W up to one rounding), but training then moves the
  principal directions instead of starting from zero.
- "pissa_niter_K": the same with torch.svd_lowrank(W, q=r, niter=K) (randomised, K subspace iterations) instead of
  the full SVD: much cheaper for large W, approximate top-r triplets, and random (it draws from torch's global
  generator, so seed it to reproduce).
- "olora" (OLoRA, Büyükakyüz 2024): W = Q R (reduced QR, Q (out, k) orthonormal columns, R (k, in) upper
  triangular, k = min(out, in)); B = Q[:, :r], A = R[:r] (not rescaled by s), and the base weight becomes
  W_res = W - s B A. (HF PEFT takes the QR of the stored weight, which for GPT-2's Conv1D is (in, out) and gives
  A, B of the wrong shapes, so a forward pass fails; here the QR is of the (out, in) matrix, as for nn.Linear.)

Both need r <= min(out, in) and a Linear-like layer (nn.Linear, Conv1D); on an Embedding or Conv2d they raise
(PEFT silently falls back to the default init for embeddings and raises for convs).

What rewriting the base weight means for files:
- The adapter file holds A and B only, never W_res. Loading it (`PeftModel.from_pretrained`, as in PEFT) creates
  the adapter with the config's init again, which turns the *original* base weight into W_res again and then
  overwrites A and B with the file's: the trained model comes back exactly for "pissa" and "olora" (a deterministic
  decomposition of the same W, up to the SVD/QR kernel's rounding on other hardware), but not for "pissa_niter_K",
  whose W_res depends on the random state at load time. To keep such an adapter usable, save the residual base
  too (`model.save_pretrained(adapter_dir)`, then `model.unload().save_pretrained(residual_dir)`) and load the
  adapter onto that base with the init switched off, or the residual would be decomposed a second time:
  `PeftModel.from_pretrained(residual, adapter_dir, config=dataclasses.replace(read_config(adapter_dir),
  init_lora_weights=True))` (read_config from peftlab.core.model).
- `disable_adapter()` and `unload()` give the residual model W_res, not the original W.
- PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` (which rewrites the adapter as a plain
  rank-2r LoRA of the original W: A' = [A; A_0], B' = [B, -B_0] with twice the alpha, so that
  W + s B' A' = W_res + s B A) is not implemented. peftlab's `save_pretrained` ignores unknown keywords, so
  passing that argument writes the PiSSA/OLoRA adapter unconverted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import parse_init  # the value parser lives in config.py (torch-free)
from .loftq import loftq_init


def _identity_start(layer, name: str) -> None:
    """A random, B zero: the update B A starts at zero. For embeddings the roles swap (A zero, B normal)
    because a one-hot input makes a zero A the natural "no change" start, as in the LoRA reference code."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        nn.init.zeros_(A)
        nn.init.normal_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own default init
        nn.init.zeros_(B)


def _gaussian(layer, name: str) -> None:
    """A normal with std 1/r, B zero (embeddings as in the default)."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        return _identity_start(layer, name)
    nn.init.normal_(A, std=1 / layer.r[name])
    nn.init.zeros_(B)


def _random(layer, name: str) -> None:
    """A and B both random, so the adapter changes the output from the start (for tests)."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        nn.init.normal_(A)
        nn.init.normal_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))


def _linear_weight(layer, scheme: str) -> torch.Tensor:
    """The base weight as an fp32 (out, in) matrix, after checking that `scheme` can decompose it."""
    weight = layer.base_layer.weight
    if layer.is_embedding or weight.ndim != 2:
        raise ValueError(
            f"init_lora_weights={scheme!r} decomposes a Linear-like weight, but this target is a "
            f"{type(layer.base_layer).__name__} (weight shape {tuple(weight.shape)}). Leave it out of target_modules "
            "(or exclude_modules), or use init_lora_weights=True for it in a separate adapter."
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"init_lora_weights={scheme!r} needs a float32/float16/bfloat16 base weight to decompose; this "
            f"{type(layer.base_layer).__name__} holds {weight.dtype}. Initialise on an unquantised model, then "
            "quantise the residual."
        )
    matrix = weight.detach().to(torch.float32)
    return matrix.T if getattr(layer, "fan_in_fan_out", False) else matrix


def _check_rank(layer, name: str, matrix: torch.Tensor, scheme: str) -> None:
    r, (out_f, in_f) = layer.r[name], matrix.shape
    if r > min(out_f, in_f):
        raise ValueError(
            f"init_lora_weights={scheme!r} takes r={r} directions from a ({out_f}, {in_f}) weight, which has at most "
            f"{min(out_f, in_f)}. Lower r, or give this module a smaller rank with rank_pattern."
        )


def _write_residual(layer, residual: torch.Tensor) -> None:
    """Replace the base weight by `residual` ((out, in), fp32), in the base's own layout and dtype."""
    weight = layer.base_layer.weight
    residual = residual.T if getattr(layer, "fan_in_fan_out", False) else residual
    weight.data.copy_(residual.to(weight.dtype))


def _pissa_from(layer, name: str, W: torch.Tensor, U_r: torch.Tensor, S_r: torch.Tensor,
                Vh_r: torch.Tensor) -> None:
    """A = sqrt(S_r/s) Vh_r, B = U_r sqrt(S_r/s), W <- W - (s B) A (PEFT's order of operations)."""
    s = layer.scaling[name]
    root = torch.sqrt(S_r / s)  # (r,)
    A_new = root[:, None] * Vh_r  # (r, in)
    B_new = U_r * root[None, :]  # (out, r)
    A, B = layer.lora_pair(name)
    A.copy_(A_new)
    B.copy_(B_new)
    _write_residual(layer, W - (s * B_new) @ A_new)


def _pissa(layer, name: str) -> None:
    """PiSSA with the full SVD: s B A = the top-r part of W, base weight <- the rest (module docstring)."""
    W = _linear_weight(layer, "pissa")
    _check_rank(layer, name, W, "pissa")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in); k = min(out, in)
    r = layer.r[name]
    _pissa_from(layer, name, W, U[:, :r], S[:r], Vh[:r])


def _pissa_fast(layer, name: str, niter: int) -> None:
    """PiSSA with torch.svd_lowrank's randomised top-r SVD after `niter` subspace iterations."""
    scheme = f"pissa_niter_{niter}"
    W = _linear_weight(layer, scheme)
    _check_rank(layer, name, W, scheme)
    U_r, S_r, V_r = torch.svd_lowrank(W, q=layer.r[name], niter=niter)  # (out, r), (r,), (in, r)
    _pissa_from(layer, name, W, U_r, S_r, V_r.T)


def _olora(layer, name: str) -> None:
    """OLoRA: B = Q[:, :r], A = R[:r] from W = Q R, base weight <- W - (s B) A (module docstring)."""
    W = _linear_weight(layer, "olora")
    _check_rank(layer, name, W, "olora")
    Q, R = torch.linalg.qr(W)  # reduced: Q (out, k), R (k, in)
    r, s = layer.r[name], layer.scaling[name]
    B_new, A_new = Q[:, :r].contiguous(), R[:r].contiguous()
    A, B = layer.lora_pair(name)
    A.copy_(A_new)
    B.copy_(B_new)
    _write_residual(layer, W - (s * B_new) @ A_new)


# Each row's name is also listed in config.INIT_SCHEMES (what LoraConfig accepts, checked without torch); the two
# are kept equal by tests/test_layers.py.
INITIALIZERS = {
    "default": _identity_start,
    "gaussian": _gaussian,
    "random": _random,
    "pissa": _pissa,
    "pissa_niter": _pissa_fast,  # written "pissa_niter_<K>" (see NUMBERED)
    "olora": _olora,
    "loftq": loftq_init,  # takes the config: see WITH_CONFIG
}

# Rows that read more of the config than init_lora_weights (LoftQ: loftq_config, a QLoRA config's block size); they
# receive it as the keyword `config`.
WITH_CONFIG = {"loftq"}


def initialise(layer, name: str, config) -> None:
    """Fill adapter `name`'s A and B on `layer` as `config.init_lora_weights` says (the row, its number, the config
    where the row reads it). Callers hold torch.no_grad()."""
    key, options = parse_init(config.init_lora_weights)
    if key in WITH_CONFIG:
        options["config"] = config
    INITIALIZERS[key](layer, name, **options)
