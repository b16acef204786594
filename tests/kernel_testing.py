"""What the kernel tests share: which backends run here, tolerances, the comparison and the plain-vs-fused check.

TOL is derived in tests/test_kernels.py's docstring (fp32: accumulation order; bf16: one rounding against the
reference's three, bounded against the largest output).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                  reason="triton is not installed (pip install triton) or TRITON_INTERPRET!=1: the "
                                         "Triton kernels are tested under the CPU interpreter")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TOL = {torch.float32: dict(rtol=1e-5, scale=1e-5), torch.bfloat16: dict(rtol=2 ** -7, scale=2 ** -6)}


def close(actual, expected, dtype, what, atol=None):
    """assert_close with TOL[dtype]; atol defaults to TOL's scale times the largest expected value."""
    tol = TOL[dtype]
    if atol is None:
        atol = tol["scale"] * float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what}: {m}")


def logits_and_grads(model, ids):
    """One forward + backward of a toy loss: (logits, {name: grad} of every trainable parameter)."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
