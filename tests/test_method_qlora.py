"""QLoRA: LoRA on frozen 4-bit NF4 base weights with double-quantised scales.

Invariants checked:
- the NF4 reference (nf4.py): the 16 values are the paper's table (normal quantiles, rebuilt here); packing is
  exact and in bitsandbytes' nibble order; the round trip stays within half the largest NF4 gap x the block's
  absmax (+ the scale's own error with double quantisation), whose 8-bit error stays within half the largest gap of
  the 8-bit map x its block's absmax; zero and constant blocks come back exactly; shape, dtype and byte counts;
- where bitsandbytes runs: the same tables and 4-bit codes, the same fp32 scales, 8-bit scale codes that differ only
  where bitsandbytes' CPU search misses the nearest value (ours is never farther), and each side dequantises the
  other's state bit for bit;
- the layer: forward equals LoRA on the dequantised weight exactly (fp32 and bf16, nn.Linear and Conv1D, explicit
  compute dtype), gradients reach only A, B (and a trained bias) and equal LoRA's on the dequantised base, nothing
  of (out, in) size is saved for backward, the fp32 weights leave the model and its bytes drop;
- merging gives plain float layers holding W_hat + s B A (with a warning that they are not re-quantised), unmerge
  restores the 4-bit base exactly, unload gives nn.Linear with W_hat; dtype casts leave the scales alone;
- files are plain LoRA files: peftlab and PEFT load them onto the dequantised base with exactly the QLoRA model's
  logits, onto the full-precision base with logits that differ by the quantisation error only, and
  QLoraConfig.from_lora re-quantises a full-precision base to the same model;
- config errors, backends (auto == torch; an explicit bitsandbytes backend fails loudly when it cannot run),
  second adapters, a bad target found late leaves the model unquantised, and `peftlab train` runs with it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings

import peft as hf
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.core.config import ConfigError
from peftlab.core.model import read_config
from peftlab.methods.qlora import NF4Linear, QLoraConfig, QLoraLinear, bnb
from peftlab.methods.qlora.layer import QuantSettings
from peftlab.kernels.nf4 import (DYNAMIC_CODE, NF4_CODE, dequantize_blockwise_8bit, dequantize_nf4,
                                       dequantize_nf4_scratch, dynamic_map_8bit, nf4_nbytes, pack_4bit, quantize_blockwise_8bit,
                                       quantize_nf4, unpack_4bit)

from .conftest import BUILDERS, model_inputs, output_of

HALF_NF4_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2  # 0.1385: between 0.7230 and 1
HALF_DYN_GAP = float((DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max()) / 2  # 0.00703: steps of 0.9/64 near 1
BNB = bnb.import_error() is None
needs_bnb = pytest.mark.skipif(not BNB, reason=f"bitsandbytes is not importable here ({bnb.import_error()})")


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def _weights(shape, seed=0, dtype=torch.float32, std=0.05):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def _block_absmax(W, blocksize=64):
    flat = W.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize).abs().amax(1)


def _per_weight(values, n, blocksize=64):
    return values.repeat_interleave(blocksize)[:n]


def qlora_model(kind="llama", **cfg):
    cfg.setdefault("init_lora_weights", False)  # B random too, so the adapter changes the output
    cfg.setdefault("r", 4)
    return get_peft_model(BUILDERS[kind](), QLoraConfig(**cfg))


def dequantised_base(model):
    """The base as the QLoRA model holds it: a copy with the adapters unloaded (plain layers with W_hat)."""
    return copy.deepcopy(model).unload()


def lora_twin(qmodel):
    """Plain LoRA with the same config and adapter tensors on the dequantised base: what QLoRA must compute."""
    cfg = qmodel.peft_config["default"]
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
    twin = get_peft_model(dequantised_base(qmodel), LoraConfig(**fields))
    with torch.no_grad():
        for k, t in qmodel.adapter_tensors("default").items():
            twin.adapter_tensors("default")[k].copy_(t)
    return twin.train(qmodel.base_model.model.training)  # (a new PeftModel object itself starts in train mode)


# ---- the NF4 reference -------------------------------------------------------------------------------------

def test_nf4_table_is_the_papers_normal_quantiles():
    # QLoRA appendix / bitsandbytes create_normal_map(offset=0.9677083): 8 positive and 7 negative quantiles of
    # N(0, 1) plus an exact zero, divided by the largest.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4_CODE.double(), values / values.max(), rtol=0, atol=1e-7)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and (NF4_CODE.diff() > 0).all()
    dyn = dynamic_map_8bit()
    assert dyn.shape == (256,) and (dyn.diff() >= 0).all() and dyn[-1] == 1 and (dyn == 0).sum() == 1


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_packing_round_trips_exactly_in_bitsandbytes_nibble_order(n):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_4bit(packed, n), codes)
    assert pack_4bit(torch.tensor([1, 2, 15])).tolist() == [0x12, 0xF7]  # high nibble first; odd n pads NF4's zero


@pytest.mark.parametrize("shape,dtype", [((64, 128), torch.float32), ((96, 40), torch.float32), ((300, 7), torch.float32),
                                         ((33,), torch.float32), ((128, 96), torch.bfloat16), ((64, 64), torch.float16)])
def test_round_trip_error_within_half_the_largest_nf4_gap_times_absmax(shape, dtype):
    W = _weights(shape, dtype=dtype)
    packed, state = quantize_nf4(W, double_quant=False)
    W_hat = dequantize_nf4(packed, state)
    assert W_hat.shape == W.shape and W_hat.dtype == dtype and packed.numel() == (W.numel() + 1) // 2
    assert torch.equal(state.absmax, _block_absmax(W))  # no double quantisation: the scales are exact
    bound = _per_weight(HALF_NF4_GAP * _block_absmax(W), W.numel()).reshape(shape)
    err = (W.float() - dequantize_nf4(packed, state, torch.float32)).abs()
    assert (err <= bound * (1 + 1e-6)).all(), (err / bound).max()
    assert (err > 0).any(), "4 bits cannot be lossless on random weights"


def test_the_config_s_torch_free_blocksizes_are_the_kernels():
    from peftlab.kernels import nf4
    from peftlab.methods.qlora import config

    assert config.BLOCKSIZES == nf4.BLOCKSIZES


def test_scratch_dequantisation_equals_the_reference_and_reuses_its_buffers():
    """kernels/nf4.py dequantize_nf4_scratch: the same W_hat bit for bit (odd sizes, padded blocks, both blocksizes
    and double quantisation, every dtype), in buffers that a later call of the same or smaller size reuses."""
    results = {}
    for shape, blocksize, double in [((300, 7), 64, True), ((33,), 64, False), ((96, 40), 32, True),
                                     ((7, 9), 128, True), ((256, 128), 64, True)]:
        packed, state = quantize_nf4(_weights(shape, dtype=torch.bfloat16), blocksize, double)
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            got = dequantize_nf4_scratch(packed, state, dtype)
            assert got.shape == torch.Size(shape) and got.dtype == dtype
            assert torch.equal(got, dequantize_nf4(packed, state, dtype)), (shape, blocksize, double, dtype)
            results[shape, dtype] = got.data_ptr()
    # the largest (256 x 128) grew the buffers last; a smaller one now lands in the same memory
    packed, state = quantize_nf4(_weights((300, 7), dtype=torch.bfloat16))
    assert dequantize_nf4_scratch(packed, state, torch.bfloat16).data_ptr() == results[(256, 128), torch.bfloat16]


def test_training_layers_dequantise_into_scratch_and_keep_their_results():
    """The forward and backward of a 4-bit layer use the scratch buffers; two layers in a row (the second's W_hat
    overwrites the first's buffers) still give the reference gradients and outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24))
    ref = copy.deepcopy(model)
    peft_model = get_peft_model(model, QLoraConfig(r=2, target_modules=["0", "1"], bnb_4bit_blocksize=32))
    for layer in (ref[0], ref[1]):  # the reference: LoRA-free layers on the same dequantised weights
        layer.weight.requires_grad_(False)
    ref[0].weight.data = peft_model.base_model.model[0].base_layer.dequantized_weight(torch.float32).clone()
    ref[1].weight.data = peft_model.base_model.model[1].base_layer.dequantized_weight(torch.float32).clone()
    x1 = torch.randn(5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out = peft_model(x1)  # LoRA B is zero at init: the output is the base layers'
    expected = ref(x2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 128), (576, 96), (300, 7)])
def test_double_quantised_scales_stay_within_half_the_8bit_gap(shape):
    W = _weights(shape, seed=1)
    packed, state = quantize_nf4(W)  # double quantisation on (the default)
    c = _block_absmax(W)
    assert state.absmax.dtype == torch.uint8 and state.absmax.shape == c.shape
    assert state.absmax_scale.shape == ((c.numel() + 255) // 256,) and state.offset.shape == (1,)
    centred = c - c.mean()
    d = _per_weight(state.absmax_scale, c.numel(), 256)
    torch.testing.assert_close(d, _per_weight(_block_absmax(centred, 256), c.numel(), 256), rtol=0, atol=0)
    scale_err = (state.scales() - c).abs()
    assert (scale_err <= HALF_DYN_GAP * d * (1 + 1e-5) + 1e-9).all()
    # W_hat = NF4[q] c_hat: the 4-bit bound with the exact scale, plus |NF4[q]| |c - c_hat| <= |c - c_hat|.
    err = (W - dequantize_nf4(packed, state)).abs().reshape(-1)
    bound = _per_weight(HALF_NF4_GAP * c + scale_err, W.numel())
    assert (err <= bound * (1 + 1e-5) + 1e-9).all()
    codes, absmax = quantize_blockwise_8bit(centred, 256)
    assert torch.equal(codes, state.absmax) and torch.equal(absmax, state.absmax_scale)
    assert torch.equal(dequantize_blockwise_8bit(codes, absmax, 256) + state.offset, state.scales())


def test_zero_and_constant_weights_come_back_exactly():
    W = torch.zeros(128, 64)
    W[64:] = 0.25  # blocks of zeros, then blocks whose scales are all equal (centred scales: one block of zeros)
    for double_quant in (False, True):
        packed, state = quantize_nf4(W, double_quant=double_quant)
        assert torch.equal(dequantize_nf4(packed, state), W)


def test_memory_formula_matches_the_tensors_and_the_documented_bits_per_weight():
    for shape in [(1536, 576), (300, 7), (33,)]:
        W = _weights(shape)
        for dq in (True, False):
            packed, state = quantize_nf4(W, double_quant=dq)
            assert packed.numel() + state.nbytes() == nf4_nbytes(W.numel(), double_quant=dq)
    n = 64 * 256 * 1000  # whole second-level blocks: 4 + 8/64 + 32/(64*256) bits per weight (+ the 4-byte offset)
    assert nf4_nbytes(n) * 8 / n == pytest.approx(4 + 0.125 + 32 / (64 * 256), abs=1e-5)
    assert nf4_nbytes(n, double_quant=False) * 8 / n == 4.5


def test_quantize_refuses_what_it_cannot_quantise():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="positive integer block sizes"):
        quantize_nf4(torch.zeros(4, 4), blocksize=0)


# ---- against bitsandbytes ---------------------------------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("shape,dtype", [((576, 1536), torch.float32), ((1536, 576), torch.bfloat16),
                                         ((300, 7), torch.float32), ((1000, 1000), torch.float16), ((33,), torch.float32)])
def test_codes_and_values_match_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as bF

    assert torch.equal(NF4_CODE, bF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bF.create_dynamic_map())
    W = _weights(shape, seed=2, dtype=dtype)
    # Without double quantisation: identical codes, scales and dequantised values.
    q, qs = bF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, state = quantize_nf4(W, double_quant=False)
    assert torch.equal(q.reshape(-1), packed) and torch.equal(qs.absmax, state.absmax)
    assert torch.equal(bF.dequantize_4bit(q, qs), dequantize_nf4(packed, state))
    # With it: identical 4-bit codes, fp32 second-level scales and offset; the 8-bit codes of the scales may differ
    # where bitsandbytes' CPU search (an approximate bucket lookup) misses the nearest 8-bit value: ours is never
    # farther from the exact centred scale than bitsandbytes' choice.
    q, qs = bF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_nf4(W)
    assert torch.equal(q.reshape(-1), packed)
    assert torch.equal(qs.state2.absmax, state.absmax_scale) and torch.equal(qs.offset.reshape(1), state.offset)
    c = _block_absmax(W)
    x = (c - c.mean()) / _per_weight(state.absmax_scale, c.numel(), 256).clamp(min=1e-38)
    ours, theirs = (x - DYNAMIC_CODE[state.absmax.long()]).abs(), (x - DYNAMIC_CODE[qs.absmax.long()]).abs()
    assert (ours <= theirs + 1e-7).all()
    if c.numel() >= 256:  # (one scale alone centres to 0 / 0: bitsandbytes then writes code 0, we the zero code)
        assert (state.absmax != qs.absmax).float().mean() < 0.01  # 0.15-0.25 % on these shapes
    # Each side dequantises the other's state bit for bit.
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(bnb.dequantize(packed, state, dt), dequantize_nf4(packed, state, dt))
    theirs_packed, theirs_state = bnb.quantize(W, 64, True)
    assert torch.equal(dequantize_nf4(theirs_packed, theirs_state), bF.dequantize_4bit(q, qs))


@needs_bnb
def test_backends_auto_equals_torch_and_bitsandbytes_backend_is_self_consistent():
    torch_model = qlora_model(backend="torch", target_modules="all-linear")
    auto_model = qlora_model(backend="auto", target_modules="all-linear")
    bnb_model = qlora_model(backend="bitsandbytes", target_modules="all-linear")
    x = model_inputs("llama")
    assert torch.equal(output_of(auto_model, x), output_of(torch_model, x))  # same quantisation, same values
    if bnb.device_problem("cpu") is not None:  # auto fell back to nf4.py (checked above); the rest needs bnb's kernels
        pytest.skip(f"bitsandbytes on this machine: {bnb.device_problem('cpu')} (backend='auto' falls back to nf4.py, "
                    "as checked above)")
    for (_, t), (_, b) in zip(torch_model.adapter_layers(), bnb_model.adapter_layers()):
        assert torch.equal(t.base_layer.weight, b.base_layer.weight)  # 4-bit codes: identical
    torch.testing.assert_close(output_of(bnb_model, x), output_of(lora_twin(bnb_model), x), rtol=0, atol=0)


def test_an_explicit_bitsandbytes_backend_fails_loudly_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(bnb, "import_error", lambda: "ImportError: No module named 'bitsandbytes'")
    with pytest.raises(ConfigError, match=r"backend='bitsandbytes' but bitsandbytes cannot be imported.*pip install"):
        QLoraConfig(backend="bitsandbytes")
    model = qlora_model(backend="auto")  # auto: falls back quietly, same numbers
    monkeypatch.setattr(bnb, "device_problem", lambda device: "bitsandbytes cannot be imported (ImportError: ...)")
    x = model_inputs("llama")
    torch.testing.assert_close(output_of(model, x), output_of(lora_twin(model), x), rtol=0, atol=0)
    for _, layer in model.adapter_layers():
        layer.base_layer.backend = "bitsandbytes"
    with pytest.raises(RuntimeError, match=r"backend='bitsandbytes' cannot dequantise.*cannot be imported.*'auto'"):
        output_of(model, x)


# ---- the layer ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cfg", [("llama", {"target_modules": "all-linear"}), ("gpt2", {"bias": "lora_only"}),
                                      ("llama", {"bnb_4bit_use_double_quant": False, "bnb_4bit_blocksize": 128})])
def test_forward_equals_lora_on_the_dequantised_weight_exactly(kind, cfg):
    model = qlora_model(kind, **cfg)
    x = model_inputs(kind)
    torch.testing.assert_close(output_of(model, x), output_of(lora_twin(model), x), rtol=0, atol=0)
    with model.disable_adapter():  # the base alone: the dequantised base
        torch.testing.assert_close(output_of(model, x), output_of(dequantised_base(model), x), rtol=0, atol=0)


def test_bf16_model_computes_in_bf16_with_fp32_adapters():
    model = get_peft_model(BUILDERS["llama"]().to(torch.bfloat16), QLoraConfig(r=4, init_lora_weights=False))
    layer = next(layer for _, layer in model.adapter_layers())
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = model_inputs("llama")
    logits = output_of(model, x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, output_of(lora_twin(model), x), rtol=0, atol=0)
    base = layer.base_layer
    assert base.weight_dtype == torch.bfloat16 and base.to_float().weight.dtype == torch.bfloat16


def test_adapters_are_fp32_on_a_bf16_base_and_compute_dtype_is_honoured():
    lin = nn.Linear(96, 80, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(_weights((80, 96), dtype=torch.bfloat16))
    layer = QLoraLinear(lin)
    layer.add_adapter("default", QLoraConfig(r=4, init_lora_weights=False), "lin")
    layer.set_active(["default"])
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.base_layer.weight_dtype == torch.bfloat16
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    W_hat = layer.base_layer.dequantized_weight()
    assert W_hat.dtype == torch.bfloat16
    base = F.linear(x, W_hat, lin.bias)
    expected = base + (layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]).to(
        torch.bfloat16)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # compute_dtype="float32" on bf16 inputs: the matmul in fp32, the output back in bf16.
    nf4 = NF4Linear.from_float(copy.deepcopy(lin), QuantSettings(compute_dtype="float32"))
    out = nf4(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x.float(), nf4.dequantized_weight(torch.float32),
                                             lin.bias.float()).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind,cfg", [("llama", {"target_modules": "all-linear"}), ("gpt2", {"bias": "lora_only"})])
def test_gradients_reach_only_the_adapter_and_equal_loras(kind, cfg):
    model = qlora_model(kind, **cfg)  # eval mode: gpt2's dropout off, so both models see the same graph
    twin = lora_twin(model)
    x = model_inputs(kind)
    for m in (model, twin):
        m(**x).logits.pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    for name, layer in model.adapter_layers():
        assert layer.base_layer.weight.dtype == torch.uint8 and not layer.base_layer.weight.requires_grad
        assert layer.base_layer.weight.grad is None
    twin_params = dict(twin.named_parameters())
    for n in trainable:
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, twin_params[n].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_backward_matches_autograd_through_the_dequantised_weight(conv1d):
    torch.manual_seed(0)
    module = Conv1D(48, 80) if conv1d else nn.Linear(80, 48)  # Conv1D(nf=out, nx=in) stores (in, out)
    nf4 = NF4Linear.from_float(module)
    W_hat = nf4.dequantized_weight().detach()
    x = torch.randn(2, 5, 80, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = nf4.bias
    bias.requires_grad_(True)
    out = nf4(x)
    ref = (torch.addmm(bias, x_ref.reshape(-1, 80), W_hat).reshape(2, 5, 48) if conv1d
           else F.linear(x_ref, W_hat, bias))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    (dx, db) = torch.autograd.grad(out, (x, bias), g)
    (dx_ref, db_ref) = torch.autograd.grad(ref, (x_ref, bias), g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(db, db_ref, rtol=1e-6, atol=1e-7)


def test_no_out_by_in_float_matrix_is_kept_for_backward():
    lin = nn.Linear(192, 160)
    nf4 = NF4Linear.from_float(lin)
    saved = []
    x = torch.randn(4, 192, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nf4(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert not any(t.numel() >= 160 * 192 and t.is_floating_point() for t in saved), [t.shape for t in saved]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved.clear()
        F.linear(x, lin.weight * 1.0, lin.bias).sum().backward()  # plain autograd keeps the weight it multiplied
    assert any(t.numel() == 160 * 192 for t in saved)


def test_quantising_frees_the_fp32_weights_and_memory_drops():
    base = BUILDERS["llama"]()
    targeted = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}

    def nbytes(model):
        tensors = list(model.parameters()) + list(model.buffers())
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    before = nbytes(base)
    model = get_peft_model(base, QLoraConfig(r=4, target_modules="all-linear"))
    held = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not any(w.untyped_storage().data_ptr() in held for w in targeted.values())
    layers = [layer.base_layer for _, layer in model.adapter_layers()]
    weights = sum(w.numel() for w in targeted.values())
    assert sum(layer.nbytes() for layer in layers) < 0.14 * 4 * weights  # 4.1-4.2 bits per weight (small layers)
    adapters = sum(t.numel() * 4 for t in model.adapter_tensors("default").values())
    assert nbytes(model) == before - 4 * weights + sum(layer.nbytes() for layer in layers) + adapters


def test_dtype_casts_move_the_device_copy_but_never_round_the_scales():
    model = qlora_model("llama")
    layer = next(layer for _, layer in model.adapter_layers()).base_layer
    before = layer.dequantized_weight(torch.float32)
    model.to(torch.bfloat16)
    model.half()
    model.float()
    assert layer.absmax_scale.dtype == torch.int32 and layer.weight_dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(torch.float32), before)


# ---- merging and unloading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_gives_plain_float_layers_not_requantised_and_unmerge_restores_the_4bit_base(kind):
    model = qlora_model(kind)
    x = model_inputs(kind)
    unmerged = output_of(model, x)
    layers = dict(model.adapter_layers())
    codes = {n: {k: t.clone() for k, t in layer.base_layer.state_dict().items()} for n, layer in layers.items()}
    expected = {n: layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight("default")
                for n, layer in layers.items()}
    with pytest.warns(UserWarning, match="NOT re-quantised"):
        model.merge_adapter()
    plain_type = Conv1D if kind == "gpt2" else nn.Linear
    for n, layer in layers.items():
        assert type(layer.base_layer) is plain_type and layer.base_layer.weight.dtype == torch.float32
        assert torch.equal(layer.base_layer.weight, expected[n])
    torch.testing.assert_close(output_of(model, x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for n, layer in layers.items():
        assert isinstance(layer.base_layer, NF4Linear)
        for k, t in layer.base_layer.state_dict().items():
            assert torch.equal(t, codes[n][k]), (n, k)
    assert torch.equal(output_of(model, x), unmerged)
    with pytest.warns(UserWarning, match="NOT re-quantised"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, (NF4Linear, QLoraLinear)) for m in merged.modules())
    for n in layers:
        assert torch.equal(merged.get_submodule(n).weight, expected[n])
    torch.testing.assert_close(output_of(merged, x), unmerged, rtol=1e-5, atol=1e-5)


def test_unload_gives_nn_linear_with_the_dequantised_weight():
    model = qlora_model("llama", target_modules="all-linear")
    layers = dict(model.adapter_layers())
    W_hat = {n: layer.base_layer.dequantized_weight() for n, layer in layers.items()}
    x = model_inputs("llama")
    with model.disable_adapter():
        base_out = output_of(model, x)
    plain = model.unload()
    for n in layers:
        module = plain.get_submodule(n)
        assert type(module) is nn.Linear and not module.training and torch.equal(module.weight, W_hat[n])
    assert torch.equal(output_of(plain, x), base_out)


def test_merged_layers_follow_the_device_and_dtype_of_the_model():
    model = qlora_model("llama")
    model.merge_adapter()
    model.to(torch.float64)  # the set-aside 4-bit base follows (here: its nominal dtype) and comes back with it
    model.unmerge_adapter()
    layer = next(layer for _, layer in model.adapter_layers())
    assert isinstance(layer.base_layer, NF4Linear) and layer.base_layer.weight_dtype == torch.float64


# ---- files --------------------------------------------------------------------------------------------------

def test_files_are_plain_lora_files_that_load_onto_the_dequantised_base_exactly(tmp_path):
    model = qlora_model("llama", target_modules="all-linear", lora_dropout=0.1, task_type="CAUSAL_LM")
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    assert not set(QLoraConfig.file_omits) & set(data), "PEFT and peftlab's LoRA reader refuse these keys"
    assert type(read_config(str(tmp_path))) is LoraConfig
    ours = PeftModel.from_pretrained(dequantised_base(model), tmp_path)
    torch.testing.assert_close(output_of(ours, x), expected, rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = hf.PeftModel.from_pretrained(dequantised_base(model), tmp_path)
    assert not [w for w in caught if "nexpected" in str(w.message)], "PEFT must find no unknown config key"
    torch.testing.assert_close(output_of(theirs, x), expected, rtol=0, atol=0)


def test_onto_the_full_precision_base_the_difference_is_the_quantisation_error(tmp_path):
    model = qlora_model("llama", target_modules="all-linear")
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path)
    full = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)  # LoRA on the fp32 weights
    full_out = output_of(full, x)
    torch.testing.assert_close(output_of(hf.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path), x), full_out,
                               rtol=0, atol=0)  # PEFT: the same tensors on the same base
    with full.disable_adapter(), model.disable_adapter():
        quant_gap = output_of(model, x) - output_of(full, x)  # the quantisation error of the bases alone
    # Same adapter tensors on both; the models differ by the base error only: small against the logits, of the same
    # size as the bases' own difference, and zero once the full base's weights are replaced by W_hat (test above).
    assert not torch.equal(full_out, expected)
    rel = ((full_out - expected).norm() / full_out.norm()).item()
    assert rel < 0.5 and (full_out - expected).norm() < 2 * quant_gap.norm()
    # A single NF4 layer on normally distributed weights: about 9 % relative error in W and in W x.
    lin = nn.Linear(576, 1536)
    with torch.no_grad():
        lin.weight.copy_(_weights((1536, 576)))
    nf4 = NF4Linear.from_float(copy.deepcopy(lin))
    inputs = torch.randn(16, 576)
    with torch.no_grad():
        assert ((nf4(inputs) - lin(inputs)).norm() / lin(inputs).norm()).item() < 0.1
    # Loading as QLoRA again re-quantises the full base deterministically: the same model, exactly.
    again = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path,
                                      config=QLoraConfig.from_lora(read_config(str(tmp_path))))
    assert isinstance(next(layer for _, layer in again.adapter_layers()), QLoraLinear)
    torch.testing.assert_close(output_of(again, x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_quantisation_error_is_small():
    from peftlab.models import load_model

    base = load_model("smollm2").eval()
    ids = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = base(input_ids=ids).logits
        model = get_peft_model(base, QLoraConfig(target_modules="all-linear"))
        quantised = model(input_ids=ids).logits
    assert ((quantised - full).norm() / full.norm()).item() < 0.25  # 0.175 on real text (benchmarks/qlora_memory.py)


# ---- config, adapters, training -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"bnb_4bit_quant_type": "fp4"}, "'fp4' is not implemented"),
    ({"bnb_4bit_blocksize": 48}, "bnb_4bit_blocksize=48 is not valid; use one of 32, 64"),
    ({"compute_dtype": "int8"}, "compute_dtype='int8' is not valid"),
    ({"backend": "cuda"}, "backend='cuda' is not valid"),
    ({"bnb_4bit_use_double_quant": "yes"}, "bnb_4bit_use_double_quant='yes' is not valid"),
    ({"init_lora_weights": "pissa"}, "4-bit base cannot hold"),
    ({"init_lora_weights": "olora"}, "Use True"),
])
def test_config_errors_say_what_was_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QLoraConfig(**kwargs)


def test_a_second_adapter_shares_the_4bit_base_and_must_match_its_quantisation(tmp_path):
    model = qlora_model("llama")
    model.add_adapter("other", QLoraConfig(r=2, init_lora_weights=False))
    layer = next(layer for _, layer in model.adapter_layers())
    assert layer.adapter_names == ["default", "other"] and isinstance(layer.base_layer, NF4Linear)
    with pytest.raises(ConfigError, match="already holds its base weight quantised.*same bnb_4bit_blocksize"):
        model.add_adapter("third", QLoraConfig(r=2, bnb_4bit_blocksize=128))
    assert "third" not in model.peft_config and isinstance(layer.base_layer, NF4Linear)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    model.load_adapter(tmp_path / "other", "loaded", config=QLoraConfig.from_lora(read_config(str(tmp_path / "other"))))
    model.set_adapter("loaded")
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.set_adapter("other")
    assert torch.equal(output_of(model, x), expected)
    model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")  # LoRA's combine, same base
    assert "combined" in layer.adapter_names and isinstance(layer.base_layer, NF4Linear)


def test_a_bad_target_found_late_leaves_every_layer_unquantised():
    base = BUILDERS["llama"]()
    originals = {n: m.weight for n, m in base.named_modules() if n.endswith("q_proj")}
    with pytest.raises(ConfigError, match="LlamaRMSNorm, which qlora cannot adapt"):
        get_peft_model(base, QLoraConfig(target_modules=["q_proj", "post_attention_layernorm"]))
    for n, w in originals.items():
        module = base.get_submodule(n)
        assert type(module) is nn.Linear and module.weight is w


def test_peftlab_train_runs_qlora(llama_dir, tmp_path):
    from peftlab.train import train

    from .conftest import run_config, sentences

    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    method = {"name": "qlora", "r": 4, "target_modules": "all-linear"}
    result = train(run_config(llama_dir, "causal_lm", str(txt), tmp_path / "run", method=method),
                   log=lambda *_: None)
    assert result["after"]["loss"] < result["before"]["loss"]
    data = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and "backend" not in data
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
