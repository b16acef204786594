"""The QLoRA fast path against its references: the Triton NF4 dequantisation against nf4.py's `dequantize_nf4`, the
fused QLoRA node (forward and every gradient) against plain autograd over dequantize -> F.linear + LoRA, and the
switch inside a QLoRA model (same logits and gradients with the kernels on as off; the 4-bit codes never move).

Triton runs under the CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU); shapes stay small.
What the interpreter cannot show, the compiled kernel's arithmetic, is checked on its sm_90 PTX (no FMA contraction,
round-to-nearest bf16 cast), which triton builds without a GPU; on a CUDA machine a test also runs it against nf4.py.

Tolerances. The dequantisation is compared bit for bit (fp32: same fp32 operations in the same order; bf16/fp16: the
reference's fp32 result cast once). So both sides of the node see the same W_hat, and the node is lora_linear.py's
with that W: the bounds of tests/test_kernels.py apply unchanged (their derivation is in its docstring):
- fp32: only the order of fp32 accumulation differs, K * 2^-24 relative to sum |terms| for K <= 131 here, < 1e-5:
  rtol = 1e-5, atol = 1e-5 * max|ref|;
- bf16: the reference rounds the base GEMM, the low-rank term and their sum to bf16 (3 roundings of 2^-9), the Triton
  epilogue once, and the torch path's dx adds two bf16-rounded terms: rtol = 2^-7, atol = 2^-6 * max|ref|.
  dA, dB (fp32 adapter weights, fp32 products of the same bf16 dy and x on both sides) get the fp32 bounds; db is a
  column sum of bf16 dy, rounded once to bf16 on both sides: the bf16 bounds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

from peftlab import get_peft_model
from peftlab.kernels import disable, enable, fused_qlora_linear, qlora_linear_reference
from peftlab.kernels import lora_linear as ll
from peftlab.methods.qlora import QLoraConfig, bnb
from peftlab.kernels.nf4 import dequantize_nf4, quantize_nf4
from peftlab.methods.lora.fused import fused_forward

from .conftest import tiny_gpt2, tiny_llama
from .kernel_testing import BACKENDS, close, logits_and_grads, needs_triton


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def quantised(shape, blocksize=64, double_quant=True, dq_blocksize=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.05
    W.view(-1)[:blocksize] = 0.0  # an all-zero block: scale 0, every code NF4's zero
    return quantize_nf4(W, blocksize, double_quant, dq_blocksize)


# ---- the Triton NF4 dequantisation ---------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(33,), (7, 13), (64, 96), (129, 131)])  # n = 33, 91 (odd, short last block),
# 6144 (whole blocks), 16899 (odd; 265 blocks of 64: two second-level blocks, the last one short)
@pytest.mark.parametrize("blocksize,double_quant,dq_blocksize", [(64, True, 256), (64, False, 256),
                                                                  (128, True, 256), (32, True, 3)])
def test_triton_dequant_is_the_reference_bit_for_bit(shape, blocksize, double_quant, dq_blocksize):
    from peftlab.kernels.nf4_dequant import dequantize_nf4_triton

    packed, state = quantised(shape, blocksize, double_quant, dq_blocksize)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got, want = dequantize_nf4_triton(packed, state, dtype), dequantize_nf4(packed, state, dtype)
        assert got.dtype == dtype and got.shape == torch.Size(shape)
        assert torch.equal(got, want), f"{dtype}: max diff {(got.float() - want.float()).abs().max()}"
    # bf16 is the fp32 result cast once (not a dequantisation computed in bf16)
    assert torch.equal(dequantize_nf4_triton(packed, state, torch.bfloat16),
                       dequantize_nf4_triton(packed, state, torch.float32).bfloat16())
    assert dequantize_nf4_triton(packed, state).dtype == torch.float32  # default: the original dtype


@needs_triton
def test_triton_dequant_refuses_bad_input():
    from peftlab.kernels.nf4_dequant import dequantize_nf4_triton

    packed, state = quantised((8, 16))
    with pytest.raises(ValueError, match="fp32, bf16 or fp16, not torch.float64"):
        dequantize_nf4_triton(packed, state, torch.float64)
    with pytest.raises(ValueError, match="ceil\\(n/2\\) = 64 bytes.*got torch.uint8 with 63"):
        dequantize_nf4_triton(packed[:63], state)
    other_packed, _ = quantised((8, 32))
    with pytest.raises(ValueError, match="ceil\\(n/2\\) = 64 bytes"):
        dequantize_nf4_triton(other_packed, state)


COMPILE_FOR_H100 = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peftlab.kernels import nf4_dequant as m

sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "nf4_ptr": "*fp32",
       "dyn_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32", "n_blocks": "i32", "blocksize": "i32",
       "dq_blocksize": "i32", "DOUBLE": "constexpr", "ROWS": "constexpr", "BS": "constexpr", "WIDE": "constexpr"}
counts = {}
for name, options in (("ours", m.LAUNCH_OPTIONS), ("fused", {**m.LAUNCH_OPTIONS, "enable_fp_fusion": True})):
    src = ASTSource(m._nf4_dequant_kernel, sig, constexprs={"DOUBLE": True, "ROWS": 32, "BS": 64, "WIDE": False})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    counts[name] = {"fma": len(re.findall(r"\bfma\.", ptx)), "cvt_rn_bf16": len(re.findall(r"cvt\.rn\.bf16\.f32", ptx))}
print(json.dumps(counts))
"""


@pytest.mark.slow  # a fresh interpreter (without TRITON_INTERPRET) compiling for sm_90: ~10 s, no GPU needed
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="triton with its NVIDIA backend is not installed")
def test_triton_dequant_compiles_for_h100_without_fma_contraction():
    """The compiled kernel (not the interpreter) keeps DYN[e] * d + mu as a multiply and an add (two fp32
    roundings, as the reference; an FMA rounds once and breaks bit-exactness) and casts to bf16 round-to-nearest.
    Checked on the sm_90 PTX, which triton produces without a GPU; the default fp fusion would contract it."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["ours"]["fma"] == 0 and counts["ours"]["cvt_rn_bf16"] > 0, counts
    assert counts["fused"]["fma"] > 0, counts  # the check can see a contraction


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel (in-kernel bf16 cast, no FMA "
                                                          "contraction) is checked where CUDA runs")
def test_triton_dequant_on_cuda_is_the_reference_bit_for_bit():
    from peftlab.kernels.nf4_dequant import dequantize_nf4_triton

    for shape, double_quant in (((1000, 999), True), ((4096, 512), True), ((4096, 512), False)):
        W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).cuda()
        packed, state = quantize_nf4(W, 64, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(dequantize_nf4_triton(packed, state, dtype), dequantize_nf4(packed, state, dtype))


# ---- the fused QLoRA node -------------------------------------------------------------------------------------

def qlora_case(N=37, d_in=65, d_out=131, r=3, dtype=torch.float32, bias=True, lead=(), seed=0, blocksize=64,
               double_quant=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, d_in, generator=g).to(dtype).requires_grad_()
    packed, state = quantize_nf4(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, blocksize, double_quant)
    b = (torch.randn(d_out, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None  # a trained bias
    A = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).requires_grad_()  # fp32 adapter, as QLoraLinear keeps it
    B = (torch.randn(d_out, r, generator=g) * 0.5).requires_grad_()
    dy = torch.randn(*lead, N, d_out, generator=g).to(dtype)
    return x, packed, state, b, A, B, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(N=37, d_in=65, d_out=131, r=3),  # n = 8515: odd, short last block
                                   dict(N=5, d_in=16, d_out=7, r=17, bias=False, blocksize=128, double_quant=False,
                                        lead=(2,))])
def test_qlora_node_matches_reference(backend, dtype, shape):
    """y, dx, dA, dB (and db for a trained bias) of the fused node equal plain autograd over the reference."""
    x, packed, state, b, A, B, dy = qlora_case(dtype=dtype, **shape)
    ref = qlora_linear_reference(x, packed, state, b, A, B, 1.7)
    out = fused_qlora_linear(x, packed, state, b, A, B, 1.7, backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, dtype, "y")
    names, tensors = ("dx", "dA", "dB", "db"), [x, A, B] + ([b] if b is not None else [])
    got, want = torch.autograd.grad(out, tensors, dy), torch.autograd.grad(ref, tensors, dy)
    for name, g_, w_ in zip(names, got, want):
        assert g_.dtype == w_.dtype and g_.shape == w_.shape, name
        close(g_, w_, dtype if name in ("dx", "db") else torch.float32, name)


def test_qlora_node_torch_forward_is_the_reference_bit_for_bit():
    x, packed, state, b, A, B, _ = qlora_case(dtype=torch.bfloat16, lead=(2,))
    assert torch.equal(fused_qlora_linear(x, packed, state, b, A, B, 2.0, backend="torch"),
                       qlora_linear_reference(x, packed, state, b, A, B, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_node_dropout_mask(backend):
    x, packed, state, b, A, B, dy = qlora_case(N=9, d_in=20, d_out=11, r=4, lead=(2,))
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3).float() / 0.7
    ref = qlora_linear_reference(x, packed, state, b, A, B, 0.5, mask)
    out = fused_qlora_linear(x, packed, state, b, A, B, 0.5, mask, backend=backend)
    close(out, ref, torch.float32, "y")
    for name, g_, w_ in zip(("dx", "dA", "dB"), torch.autograd.grad(out, (x, A, B), dy),
                            torch.autograd.grad(ref, (x, A, B), dy)):
        close(g_, w_, torch.float32, name)
    assert not torch.allclose(fused_qlora_linear(x, packed, state, b, A, B, 0.5, backend=backend), out, atol=1e-3)


def test_qlora_node_saves_x_and_u_only_and_dequantises_again_for_dx():
    """Saved for backward beyond x and the parameters: u (N, r) alone, nothing of W's (out, in) size; W_hat is
    rebuilt in backward (a second dequantisation) only when dx is needed."""
    x, packed, state, b, A, B, dy = qlora_case(N=64, d_in=48, d_out=40, r=4, dtype=torch.bfloat16, bias=False)
    calls = []

    def dequantize(dtype):
        calls.append(dtype)
        return dequantize_nf4(packed, state, dtype)

    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_qlora_linear(x, packed, state, None, A, B, 2.0, backend="torch", dequantize=dequantize)
    params = {(p.data_ptr(), p.dtype, tuple(p.shape)) for p in (x, A, B)}
    assert sum(v for k, v in seen.items() if k not in params) == 64 * 4 * 4  # u: (N, r) fp32
    assert not any(shape == (40, 48) for _, _, shape in seen)
    assert calls == [torch.bfloat16]
    out.backward(dy)
    assert calls == [torch.bfloat16] * 2 and x.grad is not None
    # Without dx (a first layer whose input needs no gradient): no second dequantisation.
    calls.clear()
    out = fused_qlora_linear(x.detach(), packed, state, None, A, B, 2.0, backend="torch", dequantize=dequantize)
    out.backward(dy)
    assert calls == [torch.bfloat16] and A.grad is not None


def test_qlora_node_bad_shapes():
    x, packed, state, b, A, B, _ = qlora_case(N=4, d_in=8, d_out=6, r=2)
    with pytest.raises(ValueError, match="qlora_linear: shapes do not fit.*quantised W \\(6, 8\\)"):
        fused_qlora_linear(x, packed, state, b, A.T, B, 1.0, backend="torch")
    with pytest.raises(ValueError, match="dropout_mask has shape"):
        fused_qlora_linear(x, packed, state, b, A, B, 1.0, torch.ones(3, 8), backend="torch")


# ---- the switch inside a QLoRA model --------------------------------------------------------------------------

def _qlora_llama(**cfg):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **cfg}
    return get_peft_model(tiny_llama(), QLoraConfig(**cfg))  # B random: the adapters move the output


@contextlib.contextmanager
def _count_fused():
    """Records, per LoraLinearFunction call, whether its weight came as a dequantiser (the QLoRA node)."""
    calls = []
    original = ll.LoraLinearFunction.forward

    def counting(ctx, *a):
        calls.append(callable(a[1]))
        return original(ctx, *a)

    ll.LoraLinearFunction.forward = staticmethod(counting)
    try:
        yield calls
    finally:
        ll.LoraLinearFunction.forward = staticmethod(original)


@pytest.mark.parametrize("backend", BACKENDS)
def test_enable_on_qlora_matches_plain_and_leaves_the_codes_alone(backend):
    """Logits and every adapter gradient equal the plain forward's; the fused node runs in every layer; the 4-bit
    codes get no gradient and do not move through an optimizer step."""
    model = _qlora_llama().train()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    layers = [m for _, m in model.adapter_layers()]
    codes = {id(m): m.base_layer.weight.detach().clone() for m in layers}

    def run():
        return logits_and_grads(model, ids)

    plain_logits, plain_grads = run()
    assert enable(model, backend=backend) == len(layers) == 2 * 7
    with _count_fused() as calls:
        fast_logits, fast_grads = run()
    assert calls == [True] * len(layers)
    close(fast_logits, plain_logits, torch.float32, "logits")
    assert plain_grads.keys() == fast_grads.keys() and all("lora_" in n for n in fast_grads)
    for name, g in plain_grads.items():
        close(fast_grads[name], g, torch.float32, name)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for m in layers:
        assert m.base_layer.weight.requires_grad is False and m.base_layer.weight.grad is None
        assert m.base_layer.weight.dtype == torch.uint8 and torch.equal(m.base_layer.weight, codes[id(m)])
    disable(model)
    assert all(m.kernel_backend is None for m in layers)


def test_enable_on_bf16_qlora_matches_plain():
    """A bf16 model: the node computes in bf16 with fp32 adapters, as the plain path; the torch backend's forward is
    the plain forward bit for bit (same ops on the same W_hat)."""
    model = get_peft_model(tiny_llama().to(torch.bfloat16),
                           QLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        enable(model, backend="torch")
        fast = model(input_ids=ids).logits
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, plain)


def test_qlora_falls_back_to_the_plain_path_where_the_node_does_not_apply():
    x = torch.randn(2, 3, 32)
    model = _qlora_llama(lora_dropout=0.1)
    enable(model, backend="torch")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.train()
    assert fused_forward(layer, x) is None  # dropout at work
    model.eval()
    y = fused_forward(layer, x)
    torch.testing.assert_close(y, layer.base_layer(x) + 2.0 * layer.lora_B["default"](layer.lora_A["default"](x)))
    layer.base_layer.compute_dtype = "bfloat16"  # plain path: x cast for the base GEMM only
    assert layer.fused_base_forward(x, "default") is None and fused_forward(layer, x) is None
    assert layer.fused_base_forward(x.bfloat16(), "default") is not None  # (x already in the compute dtype)
    layer.base_layer.compute_dtype = "auto"
    layer.base_layer.backend = "bitsandbytes"  # bitsandbytes' kernels asked for explicitly: they run, plain path
    assert fused_forward(layer, x) is None
    layer.base_layer.backend = "auto"
    layer.merge()
    assert fused_forward(layer, x) is None  # merged: no live adapter
    layer.unmerge()
    assert fused_forward(layer, x) is not None
    gpt2 = get_peft_model(tiny_gpt2(), QLoraConfig(r=4, target_modules=["c_attn"])).eval()  # Conv1D: (in, out)
    enable(gpt2, backend="torch")
    conv = gpt2.base_model.model.transformer.h[0].attn.c_attn
    assert conv.fused_base_forward(x, "default") is None and fused_forward(conv, x) is None


@pytest.mark.skipif(bnb.import_error() is not None, reason="bitsandbytes is not importable here")
def test_torch_backend_follows_the_layers_own_dequantisation(monkeypatch):
    """backend='auto' QLoRA: the node's torch path dequantises through NF4Linear.dequantized_weight (bitsandbytes
    where the layer picks it), twice per training step; it gives the reference's numbers."""
    model = _qlora_llama(target_modules=["q_proj"]).train()
    enable(model, backend="torch")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    original = type(layer.base_layer).dequantized_weight
    monkeypatch.setattr(type(layer.base_layer), "dequantized_weight",
                        lambda self, dtype=None: seen.append(dtype) or original(self, dtype))
    x = torch.randn(2, 3, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert seen == [torch.float32, torch.float32]
    base = layer.base_layer
    ref = qlora_linear_reference(x, base.weight, base.state(), base.bias, layer.lora_A["default"].weight,
                                 layer.lora_B["default"].weight, layer.scaling["default"])
    assert torch.equal(y, ref)
