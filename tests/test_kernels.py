"""Every fast path in peftlab/kernels against its pure-torch reference: forward and every gradient, odd shapes, fp32
and bf16, the dropout-mask path, the backend choice, and the fused path switched on inside a LoRA model.

The Triton kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
on a machine without a GPU before anything imports triton), so CI needs no GPU. Those tests skip, with the
reason, where triton is not installed. Interpreted Triton is slow (numpy per program): the shapes stay small.

Tolerances. Both sides see the same (rounded) inputs and accumulate dot products in fp32, so they differ only by
- the order of fp32 accumulation: at most K * 2^-24 relative to sum |terms| for a K-long dot product (K <= 130
  here: < 1e-5); fp32 comparisons use rtol = atol/max|ref| = 1e-5;
- output roundings in bf16: the reference rounds the base GEMM to bf16, the low-rank term to bf16, and their sum
  again (3 roundings of unit roundoff 2^-9 each); the fused kernel rounds once. So |fused - ref| <= 4 * 2^-9 *
  (|x W^T| + |s u B^T|) elementwise; with cancellation the output can be smaller than those terms, so the bound is
  taken against the largest output: atol = 2^-6 * max|ref|, rtol = 2^-7. Gradients of the fp32 adapter (dA, dB)
  are computed in fp32 on both sides from the same bf16 dy and x: fp32 tolerances. (Against an fp64 truth, bf16
  outputs carry ~2^-8 * sqrt(K) relative error; the two sides here share that error, so the bound above is tighter.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.kernels import (backend as backend_mod, chunked_linear_cross_entropy, disable, enable,
                             fused_lora_linear, linear_cross_entropy_reference, lora_linear_reference, resolve)

from .conftest import tiny_llama
from .kernel_testing import BACKENDS, HAS_TRITON, close, logits_and_grads, needs_triton


def lora_case(N=37, d_in=65, d_out=130, r=3, dtype=torch.float32, bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, d_in, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)  # frozen base
    b = (torch.randn(d_out, generator=g) * 0.1).to(dtype) if bias else None
    A = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).requires_grad_()  # fp32 adapter, as LoraLinear keeps it
    B = (torch.randn(d_out, r, generator=g) * 0.5).requires_grad_()
    dy = torch.randn(*lead, N, d_out, generator=g).to(dtype)
    return x, W, b, A, B, dy


def grads(y, dy, *tensors):
    return torch.autograd.grad(y, tensors, dy)


# ---- fused LoRA linear ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(N=37, d_in=65, d_out=130, r=3), dict(N=5, d_in=16, d_out=7, r=17, bias=False)])
def test_lora_linear_matches_reference(backend, dtype, shape):
    """y, dx, dA, dB of the fused node equal plain autograd over the reference, odd shapes, r > 16 included."""
    x, W, b, A, B, dy = lora_case(dtype=dtype, **shape)
    ref = lora_linear_reference(x, W, b, A, B, 1.7)
    out = fused_lora_linear(x, W, b, A, B, 1.7, backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, dtype, "y")
    for name, got, want in zip(("dx", "dA", "dB"), grads(out, dy, x, A, B), grads(ref, dy, x, A, B)):
        assert got.dtype == want.dtype, name
        close(got, want, torch.float32 if name != "dx" else dtype, name)


def test_lora_linear_torch_forward_is_the_reference_bit_for_bit():
    x, W, b, A, B, _ = lora_case(dtype=torch.bfloat16, lead=(2,))
    assert torch.equal(fused_lora_linear(x, W, b, A, B, 2.0, backend="torch"),
                       lora_linear_reference(x, W, b, A, B, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_dropout_mask(backend):
    """With a dropout mask M (x * M is what nn.Dropout returns), every gradient matches the reference's."""
    x, W, b, A, B, dy = lora_case(N=9, d_in=20, d_out=11, r=4, lead=(2,))
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(x.shape, generator=g) > 0.3).float() / 0.7
    ref = lora_linear_reference(x, W, b, A, B, 0.5, mask)
    out = fused_lora_linear(x, W, b, A, B, 0.5, mask, backend=backend)
    close(out, ref, torch.float32, "y")
    for name, got, want in zip(("dx", "dA", "dB"), grads(out, dy, x, A, B), grads(ref, dy, x, A, B)):
        close(got, want, torch.float32, name)
    # The mask matters: without it the output differs (the test above could not pass with the mask ignored).
    assert not torch.allclose(fused_lora_linear(x, W, b, A, B, 0.5, backend=backend), out, atol=1e-3)


def test_lora_linear_trainable_base_and_bias_get_gradients():
    """W and b are frozen under LoRA; if they train anyway the node still returns dW = dy^T x and db = sum dy."""
    x, W, b, A, B, dy = lora_case(N=6, d_in=10, d_out=8, r=2)
    W.requires_grad_(), b.requires_grad_()
    got = grads(fused_lora_linear(x, W, b, A, B, 2.0, backend="torch"), dy, W, b)
    want = grads(lora_linear_reference(x, W, b, A, B, 2.0), dy, W, b)
    for g_, w_ in zip(got, want):
        close(g_, w_, torch.float32, "dW/db")


def test_lora_linear_keeps_only_x_and_the_rank_r_intermediate():
    """Saved for backward: x itself (no fp32 copy), W, A, B and u (N, r); the reference also keeps x.to(fp32)."""
    x, W, b, A, B, _ = lora_case(N=64, d_in=48, d_out=40, r=4, dtype=torch.bfloat16)
    sizes = {}
    for name, fn in (("fused", lambda: fused_lora_linear(x, W, b, A, B, 2.0, backend="torch")),
                     ("reference", lambda: lora_linear_reference(x, W, b, A, B, 2.0))):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        params = {(p.data_ptr(), p.dtype, tuple(p.shape)) for p in (x, W, A, B)}
        sizes[name] = sum(v for k, v in seen.items() if k not in params)  # bytes beyond x and the weights
    assert sizes["fused"] == 64 * 4 * 4  # u: (N, r) fp32
    assert sizes["reference"] >= 64 * 48 * 4  # includes the fp32 copy of x


def test_lora_linear_bad_shapes():
    x, W, b, A, B, _ = lora_case(N=4, d_in=8, d_out=6, r=2)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_lora_linear(x, W, b, A.T, B, 1.0, backend="torch")
    with pytest.raises(ValueError, match="dropout_mask has shape"):
        fused_lora_linear(x, W, b, A, B, 1.0, torch.ones(3, 8), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast path: checked where CUDA runs bf16 autocast")
def test_lora_linear_under_autocast_cuda():
    x, W, b, A, B, dy = (t.cuda() if t is not None else None for t in lora_case())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_lora_linear(x, W, b, A, B, 2.0, backend="auto")
        ref = lora_linear_reference(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 2.0)
    close(out, ref, torch.bfloat16, "y")


# ---- backend selection --------------------------------------------------------------------------------------

def test_backend_auto_on_cpu_is_torch_and_unknown_names_fail():
    assert resolve("auto", torch.device("cpu")) == "torch"
    assert resolve("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="Unknown kernel backend 'cuda'.*auto"):
        resolve("cuda", torch.device("cpu"))


def test_backend_triton_without_triton_fails_loudly(monkeypatch):
    monkeypatch.setattr(backend_mod, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"backend='triton'.*not importable.*pip install triton"):
        resolve("triton", torch.device("cuda"))
    assert resolve("auto", torch.device("cuda")) == "torch"  # quietly
    x, W, b, A, B, _ = lora_case(N=3, d_in=4, d_out=5, r=2)
    with pytest.raises(RuntimeError, match="not importable"):
        fused_lora_linear(x, W, b, A, B, 1.0, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_backend_triton_on_cpu_without_interpreter_fails_loudly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"on 'cpu'.*CUDA.*TRITON_INTERPRET=1"):
        resolve("triton", torch.device("cpu"))


@pytest.mark.slow  # a fresh interpreter importing peftlab: ~10-20 s on this shared machine
def test_importing_kernels_does_not_import_triton():
    code = "import sys, peftlab, peftlab.kernels; assert 'triton' not in sys.modules, 'imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---- chunked linear + cross-entropy -------------------------------------------------------------------------

def ce_case(N=37, d=65, V=130, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    c = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100  # prompt / padding tokens
    return h, W, c, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_ce_matches_full_logits(dtype, reduction, chunk):
    """Loss, d hidden and d weight equal F.cross_entropy on the full fp32 logits, for any chunking. bf16: both
    sides round the logits GEMM to bf16 (the chunk's GEMM may round a different way: 1 ulp = 2^-8 relative) and the
    gradient GEMMs' inputs to bf16, hence rtol 2^-7 and atol 2^-6 * max."""
    h, W, c, y = ce_case(dtype=dtype, bias=dtype == torch.float32)
    params = (h, W) + ((c,) if c is not None else ())
    got = chunked_linear_cross_entropy(h, W, y, c, reduction=reduction, chunk_size=chunk)
    want = linear_cross_entropy_reference(h, W, y, c, reduction=reduction)
    assert got.dtype == torch.float32
    close(got, want, dtype, "loss")
    got_grads = torch.autograd.grad(got * 1.5, params)
    for name, a, b in zip(("dh", "dW", "db"), got_grads, torch.autograd.grad(want * 1.5, params)):
        assert a.dtype == b.dtype, name
        close(a, b, dtype, name)
    assert got_grads[0][::4].abs().max() == 0  # ignored rows get no gradient


def test_chunked_ce_frozen_weight_and_no_grad():
    h, W, _, y = ce_case(N=10, d=6, V=9)
    W.requires_grad_(False)
    loss = chunked_linear_cross_entropy(h, W, y, chunk_size=3)
    (dh,) = torch.autograd.grad(loss, h)
    close(dh, torch.autograd.grad(linear_cross_entropy_reference(h, W, y), h)[0], torch.float32, "dh")
    with torch.no_grad():
        close(chunked_linear_cross_entropy(h, W, y, chunk_size=3), linear_cross_entropy_reference(h, W, y),
              torch.float32, "no-grad loss")


def test_chunked_ce_leading_dims_and_errors():
    h, W, _, y = ce_case(N=12, d=5, V=7)
    got = chunked_linear_cross_entropy(h.reshape(3, 4, 5), W, y.reshape(3, 4), reduction="mean", chunk_size=5)
    close(got, linear_cross_entropy_reference(h, W, y, reduction="mean"), torch.float32, "loss")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\).*saw values from"):
        chunked_linear_cross_entropy(h, W, torch.full((12,), 7))
    with pytest.raises(ValueError, match="leading shape"):
        chunked_linear_cross_entropy(h, W, y[:5])
    with pytest.raises(RuntimeError, match="no Triton version.*backend='auto'"):
        chunked_linear_cross_entropy(h, W, y, backend="triton")


# ---- the switch inside a LoRA model ---------------------------------------------------------------------------

def _lora_llama(dropout=0.0):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                    target_modules="all-linear"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_enable_matches_plain_forward_and_gradients(backend):
    """peftlab.kernels.enable(model) leaves logits and every adapter gradient as the plain forward computes them."""
    model = _lora_llama()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))

    def run():
        return logits_and_grads(model, ids)

    plain_logits, plain_grads = run()
    layers = enable(model, backend=backend)
    assert layers == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    calls = []
    from peftlab.kernels import lora_linear as ll
    original = ll.LoraLinearFunction.forward

    def counting(ctx, *a):
        calls.append(1)
        return original(ctx, *a)

    ll.LoraLinearFunction.forward = staticmethod(counting)
    try:
        fast_logits, fast_grads = run()
    finally:
        ll.LoraLinearFunction.forward = staticmethod(original)
        disable(model)
    assert len(calls) == layers  # the fused node ran in every adapted layer
    close(fast_logits, plain_logits, torch.float32, "logits")
    for name, g in plain_grads.items():
        close(fast_grads[name], g, torch.float32, name)


def test_enable_falls_back_where_the_fused_path_does_not_apply():
    """Dropout in training, a disabled or merged adapter: the plain forward runs (and gives the plain result)."""
    model = _lora_llama(dropout=0.1)
    enable(model, backend="torch")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    from peftlab.methods.lora.fused import fused_forward

    x = torch.randn(2, 3, 32)
    model.train()
    assert fused_forward(layer, x) is None  # dropout at work
    model.eval()
    assert fused_forward(layer, x) is not None
    torch.testing.assert_close(fused_forward(layer, x), layer.base_layer(x) + 2.0 * layer.lora_B["default"](
        layer.lora_A["default"](x)))
    layer.merge()
    assert fused_forward(layer, x) is None  # merged: no live adapter
    layer.unmerge()
    with pytest.raises(ValueError, match="found no layer with a fused path"):
        enable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- the GPU benchmark's CPU smoke mode -------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_lora.py runs end to end (one step, tiny shape, CPU); at the first step B = 0, so peftlab's
    chunked loss and HF PEFT's loss are the same model's loss on the same batch."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_lora.py"
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--steps", "1",
                           "--warmup", "0", "--batch", "2", "--seq", "16", "--setups", "peftlab,peft_eager",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s" in proc.stdout and "peft_eager" in proc.stdout
    results = {r["setup"]: r for r in json.loads(out.read_text())["results"]}
    assert results["peftlab"]["trainable"] == results["peft_eager"]["trainable"] > 0
    assert results["peftlab"]["loss"] == pytest.approx(results["peft_eager"]["loss"], rel=2 ** -6)  # bf16 logits
