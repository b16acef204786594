"""The DoRA fast path (peftlab/kernels/dora_linear.py) against its references: the norm from ||W||^2, W A^T and A A^T
against torch.linalg.norm(W + s B A), the fused node's output and every gradient against plain autograd over the
DoRA layer's forward, for the torch and Triton backends, and the switch inside a DoRA model.

The Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when there is
no GPU); those tests skip, with the reason, without triton. Shapes stay small (the interpreter runs numpy per program).

Tolerances.
- Norm, fp32: against an fp64 truth, the formula's n^2 is the sum of three fp32 terms, each a dot product of length
  in (or r) accumulated in fp32, so |n^2 - truth| <= ~in * 2^-24 * (||W_o||^2 + 2 s |<B_o, (W A^T)_o>| +
  s^2 B_o G B_o^T) (a worst case; observed errors are ~100x smaller); the test takes that bound (with in <= 64: a
  factor 64) and halves it for n (d n = d n^2 / 2n). bf16 weights are compared to the norm of the same bf16 values in
  fp32 (the layer's own reference), since the formula upcasts W exactly.
- Fused node vs reference, fp32: both sides are fp32 products of the same inputs, differing in accumulation order and
  in how the per-column factor is distributed (c (xW^T + s uB^T) vs PEFT's result + (c-1) base + c s uB^T):
  rtol = atol / max|ref| = 1e-5, as tests/test_kernels.py.
- bf16 (base and activations; fp32 adapter): y and dx: the reference rounds the base output, result - b and the
  sum to bf16, the fused node rounds once or twice (torch path: x W^T, then y): a few units of 2^-9 relative to the
  largest terms, so atol = 2^-6 max|ref|, rtol = 2^-7 (tests/test_kernels.py's bound). dA, dB come from the same
  bf16 dy and x in fp32 on both sides: fp32 tolerances. dm: the fused node recovers z from the bf16 output y, the
  reference multiplies by its bf16 base output; each term of sum_n dy z / n carries at most ~4 roundings of 2^-9 of
  |y| + |b| on the two sides together, so |dm_got - dm_ref| <= 2^-7 * sum_n |dy| (|y| + |b|) / |m| elementwise. db:
  one bf16 rounding of the same fp32 sum on either side (rtol 2^-7).
"""

from __future__ import annotations

import pytest
import torch

from peftlab import get_peft_model
from peftlab.kernels import (DoraLinearFunction, disable, dora_linear_reference, dora_weight_norm,
                             dora_weight_norm_reference, enable, fused_dora_linear)
from peftlab.methods.dora import DoraConfig, DoraLinear

from .conftest import tiny_llama
from .kernel_testing import BACKENDS, close, logits_and_grads


def dora_case(N=19, d_in=53, d_out=37, r=3, dtype=torch.float32, bias=True, lead=(), seed=0):
    """Odd sizes; W (out, in) frozen in `dtype`, fp32 adapter A, B, m (as DoraLinear keeps them on a bf16 base);
    m away from n so that m / n != 1, B large enough that s B A moves the norm by tens of percent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, d_in, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (torch.randn(d_out, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    B = (torch.randn(d_out, r, generator=g) * 0.5).requires_grad_()
    m = (torch.rand(d_out, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(*lead, N, d_out, generator=g).to(dtype)
    return x, W, b, A, B, m, dy


def truth_norm(W, A, B, s):
    return torch.linalg.norm(W.double() + s * (B.detach().double() @ A.detach().double()), dim=1)


def norm_bound(W, A, B, s, d_in):
    """The fp32 error bound of the formula's n (module docstring): d_in 2^-24 (sum of |terms|) / (2 n)."""
    Wd, Ad, Bd = W.double(), A.detach().double(), B.detach().double()
    terms = (Wd * Wd).sum(1) + 2 * s * (Bd * (Wd @ Ad.T)).sum(1).abs() + s * s * ((Bd @ (Ad @ Ad.T)) * Bd).sum(1)
    return d_in * 2.0 ** -24 * terms / (2 * truth_norm(W, A, B, s)) + 1e-30


# ---- the norm ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(d_out=37, d_in=53, r=3), dict(d_out=7, d_in=16, r=17), dict(d_out=64, d_in=9, r=1)])
def test_norm_formula_matches_the_direct_norm(backend, dtype, shape):
    """||W||^2 + 2 s <B, W A^T> + s^2 B (A A^T) B^T under the sqrt = ||W + s B A||_row (fp32 and bf16 weights)."""
    _, W, _, A, B, _, _ = dora_case(dtype=dtype, **shape)
    s = 1.7
    n = dora_weight_norm(W, A, B, s, backend=backend)
    assert n.dtype == torch.float32 and n.shape == (shape["d_out"],)
    truth = truth_norm(W, A, B, s)
    assert torch.all((n.double() - truth).abs() <= norm_bound(W, A, B, s, shape["d_in"])), (n.double() - truth)
    # ... and the layer's own norm (W + s B A built in fp32) agrees to fp32 precision.
    direct = dora_weight_norm_reference(W, A, B, s)
    torch.testing.assert_close(n, direct, rtol=1e-5, atol=0)
    # B A really moves the norm here (the test would notice a formula that dropped a term).
    assert (direct - torch.linalg.norm(W.float(), dim=1)).abs().max() > 0.05 * direct.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_under_cancellation_and_clamped_at_zero(backend):
    """s B A cancelling 90% of a low-rank W (n ~ 0.1 ||W||): still within the fp32 bounds; and a row
    cancelled exactly (W = -s B A in fp32) gives a finite n >= 0 at rounding level (n^2 clamped, no NaN)."""
    g = torch.Generator().manual_seed(4)
    out_f, in_f, r, s = 37, 53, 3, 2.0
    P, Q = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g) / in_f ** 0.5
    W = P @ Q + 1e-3 * torch.randn(out_f, in_f, generator=g)
    A, B = Q.clone(), -0.9 * P / s  # s B A = -0.9 P Q
    n = dora_weight_norm(W, A, B, s, backend=backend)
    truth = truth_norm(W, A, B, s)
    assert float((truth / torch.linalg.norm(W.double(), dim=1)).max()) < 0.2  # real cancellation
    assert torch.all((n.double() - truth).abs() <= norm_bound(W, A, B, s, in_f))
    # The docstring's rule: relative error of n about 2^-23 ||W_o||^2 / n_o^2 (a few 1e-5 here, 1e-7 at n ~ ||W||).
    rel = (n.double() - truth).abs() / truth
    assert torch.all(rel <= 2.0 ** -20 * (torch.linalg.norm(W.double(), dim=1) / truth) ** 2), rel

    W0 = -s * (B @ A)  # rows of W + s B A are exactly 0 in exact arithmetic
    n0 = dora_weight_norm(W0, A, B, s, backend=backend)
    assert torch.isfinite(n0).all() and (n0 >= 0).all()
    assert float(n0.max()) <= 1e-3 * float(torch.linalg.norm(W0, dim=1).max())


def test_norm_bad_shapes():
    _, W, _, A, B, _, _ = dora_case(d_out=6, d_in=8, r=2)
    with pytest.raises(ValueError, match="shapes do not fit"):
        dora_weight_norm(W, A.T, B, 1.0)


# ---- the fused node ----------------------------------------------------------------------------------------------

def grads(y, dy, tensors):
    return torch.autograd.grad(y, tensors, dy)


def dm_atol(y, b, dy, m):
    """2^-7 sum_n |dy| (|y| + |b|) / |m| per column (module docstring), from the reference's bf16 output."""
    y2, dy2 = y.detach().float().reshape(-1, y.shape[-1]), dy.float().reshape(-1, y.shape[-1])
    mag = y2.abs() + (b.detach().float().abs() if b is not None else 0)
    return 2 ** -7 * (dy2.abs() * mag).sum(0) / m.detach().abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(N=19, d_in=53, d_out=37, r=3),
                                   dict(N=5, d_in=16, d_out=7, r=17, bias=False, lead=(2,))])
def test_fused_dora_matches_reference(backend, dtype, shape):
    """y and dx, dA, dB, dm, db of the fused node equal plain autograd over the DoRA layer's forward."""
    x, W, b, A, B, m, dy = dora_case(dtype=dtype, **shape)
    s = 1.7
    ref = dora_linear_reference(x, W, b, A, B, m, s)
    out = fused_dora_linear(x, W, b, A, B, m, s, backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, dtype, "y")
    params = [x, A, B, m] + ([b] if b is not None else [])
    got, want = grads(out, dy, params), grads(ref, dy, params)
    for name, g_, w_ in zip(("dx", "dA", "dB", "dm", "db"), got, want):
        assert g_.dtype == w_.dtype, name
        if name == "dm" and dtype == torch.bfloat16:
            bound = dm_atol(ref, b, dy, m)
            assert torch.all((g_ - w_).abs() <= bound), f"dm: {(g_ - w_).abs()} > {bound}"
        else:
            close(g_, w_, dtype if name in ("dx", "db") else torch.float32, name)
    # Not a degenerate case: n and m / n are far from 1, so a dm without its 1 / n or a y without its factor c
    # would fail the comparisons above.
    n = dora_weight_norm_reference(W, A, B, s)
    assert (n - 1).abs().min() > 0.05 and (m.detach() / n - 1).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_magnitude_column_gets_its_gradient(backend):
    """m_o = 0 (c_o = 0: the output keeps no trace of z_o): dm_o is recomputed from x and W_o, and matches."""
    x, W, b, A, B, m, dy = dora_case(N=9, d_in=20, d_out=11, r=2)
    with torch.no_grad():
        m[[2, 7]] = 0.0
    ref = dora_linear_reference(x, W, b, A, B, m, 0.5)
    out = fused_dora_linear(x, W, b, A, B, m, 0.5, backend=backend)
    got, want = grads(out, dy, [m, x]), grads(ref, dy, [m, x])
    assert got[0][[2, 7]].abs().min() > 0
    close(got[0], want[0], torch.float32, "dm")
    close(got[1], want[1], torch.float32, "dx")


def test_fused_dora_keeps_u_and_its_output_only():
    """Saved beyond x and the parameters: u (N, r), the output y (N, out), c and n (out,) each. The reference (the
    plain layer's form) also keeps an fp32 copy of x, the fp32 low-rank output and the base output."""
    N, d_in, d_out, r = 64, 48, 40, 4
    x, W, b, A, B, m, _ = dora_case(N=N, d_in=d_in, d_out=d_out, r=r, dtype=torch.bfloat16, bias=False)
    sizes = {}
    for name, fn in (("fused", lambda: fused_dora_linear(x, W, None, A, B, m, 2.0, backend="torch")),
                     ("reference", lambda: dora_linear_reference(x, W, None, A, B, m, 2.0))):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        params = {(p.data_ptr(), p.dtype, tuple(p.shape)) for p in (x, W, A, B, m)}
        sizes[name] = sum(v for k, v in seen.items() if k not in params)
    assert sizes["fused"] == N * r * 4 + N * d_out * 2 + 2 * d_out * 4  # u fp32, y bf16, c and n fp32
    assert sizes["reference"] >= N * d_in * 4 + N * d_out * 4 + N * d_out * 2  # x fp32, B A x fp32, base bf16


def test_trainable_base_weight_gets_its_gradient():
    """W is frozen under DoRA; if it trains anyway the node returns dW = (c dy)^T x, n staying a constant (as in the
    plain layer, whose norm is computed without gradient)."""
    x, W, b, A, B, m, dy = dora_case(N=6, d_in=10, d_out=8, r=2)
    W.requires_grad_()
    got = grads(fused_dora_linear(x, W, b, A, B, m, 2.0, backend="torch"), dy, [W])[0]
    want = grads(dora_linear_reference(x, W, b, A, B, m, 2.0), dy, [W])[0]
    close(got, want, torch.float32, "dW")


def test_fused_dora_bad_shapes():
    x, W, b, A, B, m, _ = dora_case(N=4, d_in=8, d_out=6, r=2)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_dora_linear(x, W, b, A, B, m[:3], 1.0, backend="torch")
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_dora_linear(x, W, b, A, B.T, m, 1.0, backend="torch")


# ---- the switch inside a DoRA model --------------------------------------------------------------------------

def _dora_llama(dropout=0.0):
    model = get_peft_model(tiny_llama(), DoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                    target_modules="all-linear"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.add_(torch.randn(t.shape, generator=g) * 0.2)  # B != 0, m / n != 1
    return model


def test_reference_is_the_dora_layer_forward():
    """dora_linear_reference (the oracle above) is DoraLinear's plain forward, bit for bit."""
    model = _dora_llama()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, DoraLinear)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    base = layer.base_layer
    with torch.no_grad():
        assert torch.equal(layer(x), dora_linear_reference(x, base.weight, base.bias, layer.lora_A["default"].weight,
                                                           layer.lora_B["default"].weight, layer.magnitude("default"),
                                                           layer.scaling["default"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_enable_gives_the_plain_logits_and_gradients(backend):
    """kernels.enable on a DoRA model: every adapted linear runs the fused node; logits and the gradients of every A,
    B and m equal the plain forward's; the frozen base weights get no gradient."""
    model = _dora_llama()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))

    def run():
        return logits_and_grads(model, ids)

    plain_logits, plain_grads = run()
    assert any("lora_magnitude_vector" in n for n in plain_grads)
    layers = enable(model, backend=backend)
    assert layers == 2 * 7
    calls = []
    original = DoraLinearFunction.forward

    def counting(ctx, *a):
        calls.append(1)
        return original(ctx, *a)

    DoraLinearFunction.forward = staticmethod(counting)
    try:
        fast_logits, fast_grads = run()
    finally:
        DoraLinearFunction.forward = staticmethod(original)
        disable(model)
    assert len(calls) == layers
    close(fast_logits, plain_logits, torch.float32, "logits")
    assert fast_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        close(fast_grads[name], g, torch.float32, name)
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert not p.requires_grad and p.grad is None, name


def test_enable_trains_a_dora_model():
    """A few SGD steps with the fused path: the loss falls, A, B and m move, the base weights do not."""
    model = _dora_llama()
    enable(model, backend="torch")
    ids = torch.randint(1, 96, (4, 8), generator=torch.Generator().manual_seed(3))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
        else:
            assert not torch.equal(p, adapter[n]), n


def test_fused_path_only_where_it_is_the_layer_forward():
    """Dropout in training, a merged adapter (even with another one live), two live adapters: the plain forward runs;
    eval mode with dropout configured, and after unmerging: the fused one, with the plain result."""
    model = _dora_llama(dropout=0.1)
    enable(model, backend="torch")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(6))
    model.train()
    assert layer._fused_adapter((), {}) is None  # dropout at work
    model.eval()
    assert layer._fused_adapter((), {}) == "default"
    with torch.no_grad():
        fused = layer(x)
        disable(model)
        plain = layer(x)
        enable(model, backend="torch")
    close(fused, plain, torch.float32, "eval output")
    layer.merge()
    assert layer._fused_adapter((), {}) is None
    layer.unmerge()
    assert layer._fused_adapter((), {}) == "default"
    assert layer._fused_adapter((x,), {}) is None  # extra forward arguments
    disable(model)
    assert layer._fused_adapter((), {}) is None


def test_fused_norm_follows_a_base_weight_rewritten_through_data():
    """peftlab rewrites base weights through `weight.data` (merge/unmerge, PiSSA/OLoRA init), which does not bump
    weight._version: a norm cache keyed by data_ptr + _version would go stale. The fused path recomputes ||W||^2 each
    forward, so after such a write it still gives the plain layer's output."""
    model = _dora_llama()
    model.eval()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(7))
    enable(model, backend="torch")
    with torch.no_grad():
        before = layer(x)
        weight = layer.base_layer.weight
        version = weight._version
        weight.data.copy_(weight.data * 1.5 + 0.01)
        assert weight._version == version  # the write torch does not count
        after = layer(x)
        disable(model)
        plain = layer(x)
    assert not torch.allclose(before, after, atol=1e-3)
    close(after, plain, torch.float32, "output after the rewrite")
