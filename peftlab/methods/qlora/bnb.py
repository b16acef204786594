"""bitsandbytes as an optional set of kernels for the NF4 format of kernels/nf4.py (peftlab never requires it).

bitsandbytes stores NF4 exactly as nf4.py does: same 16 values, same nibble order, same scale layout (fp32 absmax,
or uint8 codes of the 8-bit dynamic map + an fp32 absmax per 256 scales + an fp32 mean offset). So a state made by
either side is dequantised by the other bit for bit (tests/test_method_qlora.py checks both directions), and a layer
can switch kernels without touching its tensors. What the two do differently (bitsandbytes 0.50.2 on CPU):

- 4-bit codes: identical (same reciprocal scaling, same nearest-value rule with ties to the lower code).
- the 8-bit codes of the double-quantised scales: nf4.py takes the nearest value of the 8-bit map; bitsandbytes' CPU
  kernel (a bucket-table search, then a check of one neighbour) returns another code for about 0.2 % of the scales,
  1 or 2 steps away (measured on 576 x 1536, 1536 x 576, 1000 x 1000 and 4096 x 256 normal matrices: 24 to 35 of
  13,824 to 16,384 scales; its pick lies up to 1.19 steps of the map from the exact scale, against at most 0.5 for
  the nearest). Those blocks' scales, and so their dequantised weights, differ by up to 0.9-1.4 % of the block's
  absmax on these matrices; every other block is identical.

`QLoraConfig.backend` picks the kernels:
- "torch": kernels/nf4.py for both quantising and dequantising.
- "auto": kernels/nf4.py quantises (so the quantised model is the same with or without bitsandbytes installed), and the
  per-call dequantisation uses bitsandbytes where it imports and, on a probe tensor, reproduces nf4.py's output on
  that device exactly (on CPU, one core, a 1536 x 576 matrix: 0.6 ms against 2.3 ms to fp32, 1.4 ms against 2.2 ms
  to bf16); otherwise kernels/nf4.py, quietly. Outputs are identical either way.
- "bitsandbytes": bitsandbytes for both (its codes, as a bitsandbytes-quantised model would hold them); fails with an
  error naming the cause when bitsandbytes is missing or does not run on the weight's device.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...kernels.nf4 import DYNAMIC_CODE, NF4_CODE, NF4State, dequantize_nf4, quantize_nf4

INSTALL_HINT = "pip install bitsandbytes; 0.50.2, the version tested, runs on CPU too"


@functools.cache
def import_error() -> str | None:
    """Why bitsandbytes cannot be imported (None when it can). Cached: importing it takes ~3.5 s (it imports
    torch._dynamo)."""
    # At import, bitsandbytes' CPU backend tries to fetch an optional gemm_4bit kernel from the hub and warns in every
    # run when it cannot (offline, untrusted repository); peftlab never calls that kernel, so the note is kept quiet.
    note = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = note.level
    note.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional  # noqa: F401  (the import is the check)
    except Exception as err:  # ImportError, or a broken install raising anything else at import time
        return f"{type(err).__name__}: {err}"
    finally:
        note.setLevel(level)
    return None


def functional():
    """bitsandbytes.functional, or a RuntimeError saying why it is unavailable and how to get it."""
    why = import_error()
    if why is not None:
        raise RuntimeError(f"QLoRA backend='bitsandbytes' needs bitsandbytes, which cannot be imported ({why}). "
                           f"Install it ({INSTALL_HINT}), or use backend='auto' or 'torch' (peftlab's own NF4 "
                           "kernels, same format).")
    import bitsandbytes.functional as F

    return F


@functools.cache
def device_problem(device_type: str) -> str | None:
    """Why bitsandbytes' NF4 kernels cannot stand in for kernels/nf4.py on this device type (None when they can): not
    importable, failing, or not reproducing kernels/nf4.py's dequantisation of a probe tensor bit for bit."""
    why = import_error()
    if why is not None:
        return f"bitsandbytes cannot be imported ({why})"
    try:
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(8, 160, generator=g).to(device_type)  # 1280 weights: 20 blocks, a partial 8-bit block
        packed, state = quantize_nf4(probe)
        for dtype in (torch.float32, torch.bfloat16):
            if not torch.equal(dequantize(packed, state, dtype), dequantize_nf4(packed, state, dtype)):
                return f"bitsandbytes' dequantize_4bit differs from peftlab's NF4 reference on {device_type} ({dtype})"
    except Exception as err:
        return f"bitsandbytes failed on {device_type} ({type(err).__name__}: {err})"
    return None


def _check_tables(state) -> None:
    """bitsandbytes' value tables must be kernels/nf4.py's: the packed codes mean nothing under other tables."""
    if not torch.equal(state.code.float().cpu(), NF4_CODE) or (
            state.state2 is not None and not torch.equal(state.state2.code.float().cpu(), DYNAMIC_CODE)):
        raise RuntimeError("This bitsandbytes version uses other NF4 or 8-bit value tables than peftlab's (the QLoRA "
                           "paper's); its codes cannot be read by peftlab. Use backend='torch'.")


def quantize(W: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, NF4State]:
    """bitsandbytes' `quantize_4bit(quant_type="nf4")`, returned in nf4.py's form: packed (ceil(n/2),) + NF4State."""
    F = functional()
    packed, qs = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    _check_tables(qs)
    if not double_quant:
        return packed.reshape(-1), NF4State(W.shape, W.dtype, blocksize, qs.absmax)
    return packed.reshape(-1), NF4State(W.shape, W.dtype, blocksize, qs.absmax, qs.state2.absmax,
                                        qs.offset.reshape(1).to(torch.float32), qs.state2.blocksize)


def dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` of kernels/nf4.py's packed codes and state, in `dtype` (fp32, bf16 or fp16)."""
    F = functional()
    code = NF4_CODE.to(packed.device)
    state2 = None
    if state.double_quant:
        state2 = F.QuantState(absmax=state.absmax_scale, code=DYNAMIC_CODE.to(packed.device),
                              blocksize=state.dq_blocksize, dtype=torch.float32)
    qs = F.QuantState(absmax=state.absmax, shape=state.shape, code=code, blocksize=state.blocksize,
                      quant_type="nf4", dtype=dtype, offset=None if state2 is None else state.offset.reshape(()),
                      state2=state2)
    return F.dequantize_4bit(packed.reshape(-1, 1), qs)
