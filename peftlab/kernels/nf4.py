"""NF4 (4-bit NormalFloat) with double quantisation in plain torch: the reference for QLoRA's frozen base weights,
beside its Triton twin (nf4_dequant.py). methods/qlora builds its layers on it; this module knows tensors only.

The format is QLoRA's (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3) as
bitsandbytes stores it (`bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4",
compress_statistics=True)`), code for code; tests/test_method_qlora.py compares the two where bitsandbytes runs.

Quantising W (any shape, n elements):

    W is flattened in storage order and cut into blocks of `blocksize` (64) consecutive weights; the last block is
    shorter when n is not a multiple of it. Per block b:
        c_b = max_i |W_i|                                  the block's absmax (fp32)
        q_i = argmin_j |W_i / c_b - NF4[j]|                one of 16 code values, 4 bits; a tie goes to the lower code
    Two 4-bit codes share a byte: element 2k in the high nibble, element 2k+1 in the low one (bitsandbytes' order);
    an odd n gets NF4's zero code (7) as padding in the last byte's low nibble, which is never decoded.

    Double quantisation (the paper's "Double Quantization") stores the n/64 scales c_b in 8 bits each:
        mu  = mean_b c_b                                   one fp32 offset (the scales are all positive: centring them
                                                           uses the 8-bit code's sign bit)
        the centred scales c_b - mu are cut into second-level blocks of `dq_blocksize` (256); per block k:
        d_k = max |c_b - mu|                               fp32
        e_b = argmin_j |(c_b - mu) / d_k - DYN[j]|         8 bits: bitsandbytes' signed dynamic map (below)

Dequantising (`dequantize_nf4`), everything in fp32, then one cast to the requested dtype:

    c_hat_b = DYN[e_b] * d_k + mu          (c_hat_b = c_b without double quantisation)
    W_hat_i = NF4[q_i] * c_hat_b

Error: with exact scales |W_i - W_hat_i| <= (largest gap between adjacent NF4 values) / 2 * c_b = 0.1385 c_b (the
gap 1 - 0.7230 at the top); double quantisation adds at most |c_b - c_hat_b| <= (largest gap of DYN) / 2 * d_k =
0.00703 d_k, because |NF4[q]| <= 1.

Memory per weight (`nf4_nbytes` computes it for a given n):

    4 bits (the code) + 8/64 bits (its block's scale code) + 32/(64 * 256) bits (the second-level fp32 scale)
    = 4 + 0.125 + 0.00195 = 4.127 bits ~= 0.516 bytes per weight, plus 4 bytes once per tensor for mu;
    without double quantisation the scale is fp32: 4 + 32/64 = 4.5 bits = 0.5625 bytes per weight.
    Against 32 bits per weight in fp32 that is 7.75x smaller (16 bits in bf16: 3.9x).

The 16 NF4 values are the exact float32 table of the paper's appendix and bitsandbytes' `get_4bit_type("nf4")`:
quantiles of N(0, 1) (8 on the positive side, 7 on the negative, and an exact zero, from the probabilities
linspace(0.9677083, 0.5, 9)[:-1] and linspace(0.9677083, 0.5, 8)[:-1]), normalised into [-1, 1]. Each code then
receives an equal share of normally distributed weights, which is what makes 4 bits enough for pretrained weights.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NF4 values, ascending (code j is NF4_CODE[j])."""

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""First-level block sizes bitsandbytes accepts (the reference takes any positive size; QLoRA uses 64)."""


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map(signed=True)`, Dettmers 2015), 256 ascending
    fp32 values in [-0.9930, 1]: for each decade i = 0..6, the 2**i midpoints of linspace(0.1, 1, 2**i + 1) times
    10**(i - 6), with both signs (254 values), plus 0 and 1. Small magnitudes get few, coarse values and values near
    1 many (step 0.9 / 64 = 0.014 in [0.1, 1]), which suits scales that cluster near their block's maximum.
    Computed with the same float32 operations as bitsandbytes, so the values agree bit for bit."""
    values: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map_8bit()
"""The 256 values of the 8-bit code for double-quantised scales, ascending."""


@dataclass
class NF4State:
    """What `dequantize_nf4` needs besides the packed codes. Tensors live on the packed codes' device.

    Without double quantisation `absmax` holds the fp32 scales c_b (n_blocks,); with it, their uint8 codes e_b
    (n_blocks,), and `absmax_scale` (fp32 (n_blocks2,), d_k) and `offset` (fp32 (1,), mu) say how to read them."""

    shape: torch.Size
    """Shape of the quantised tensor, restored by dequantisation."""

    dtype: torch.dtype
    """Its dtype before quantisation: dequantisation's default output dtype."""

    blocksize: int
    """Weights per first-level block (one scale each)."""

    absmax: torch.Tensor
    """fp32 scales (no double quantisation) or their uint8 codes (double quantisation), (n_blocks,)."""

    absmax_scale: torch.Tensor | None = None
    """fp32 (n_blocks2,): the absmax d_k of each second-level block of centred scales; None without double quant."""

    offset: torch.Tensor | None = None
    """fp32 (1,): mu, the mean of the scales, subtracted before their 8-bit quantisation; None without double quant."""

    dq_blocksize: int = 256
    """Scales per second-level block."""

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def scales(self) -> torch.Tensor:
        """The fp32 scale of every first-level block, (n_blocks,): c_b, or c_hat_b with double quantisation."""
        if not self.double_quant:
            return self.absmax.to(torch.float32)
        centred = dequantize_blockwise_8bit(self.absmax, self.absmax_scale, self.dq_blocksize)
        return centred + self.offset

    def nbytes(self) -> int:
        """Bytes of the state's tensors (the packed codes not included)."""
        tensors = [self.absmax] + ([self.absmax_scale, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> int:
    """Bytes NF4 takes for `numel` weights: packed codes + scales (+ second-level scales and the offset)."""
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // dq_blocksize) + 4


# byte b -> (NF4[b >> 4], NF4[b & 15]): the two values a packed byte holds, high nibble first.
_PAIR_TABLE = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)

NF4_ZERO = 7
"""The code of NF4's exact zero (padding code, as bitsandbytes writes it)."""


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15, (n,) -> (ceil(n/2),) bytes, element 2k in the high nibble (an odd n is padded with
    NF4_ZERO)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of `pack_4bit`: (ceil(n/2),) bytes -> (n,) uint8 codes."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the value of ascending `code` nearest to each element of `scaled`; a tie goes to the lower index
    (bucketize against the midpoints with right=False: x == midpoint lands in the lower bucket)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device))


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) -> (n_blocks, blocksize), zero-padded at the end (zeros change no block's absmax but an all-padding
    block's, which has no real element to decode)."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 -> (uint8 codes of DYNAMIC_CODE (n,), fp32 absmax per block (n_blocks,)): the second level of
    double quantisation, e = nearest(x / d_k) (division, as bitsandbytes' CPU kernel; ties to the lower code)."""
    flat = x.reshape(-1).to(torch.float32)
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # An all-equal set of scales centres to zeros: d_k = 0, and every code must then decode to exactly 0.
    normed = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1)
    codes = _nearest(normed, DYNAMIC_CODE).to(torch.uint8).reshape(-1)
    # clone a slice of the padded grid: a view would keep the whole grid's storage (up to 255 bytes per tensor) alive.
    return (codes[: flat.numel()].clone() if codes.numel() != flat.numel() else codes), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """(n,) uint8 codes + fp32 absmax per block -> (n,) fp32: DYNAMIC_CODE[e] * d_k."""
    n = codes.numel()
    values = DYNAMIC_CODE.to(codes.device)[codes.reshape(-1).long()]
    return (_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[:n]


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 dq_blocksize: int = 256) -> tuple[torch.Tensor, NF4State]:
    """W (any shape; fp32/bf16/fp16) -> (packed uint8 codes (ceil(n/2),), NF4State). See the module docstring.

    Memory: n/2 bytes of codes + n/blocksize bytes of scale codes + 4 bytes per second-level block + 4 (double quant),
    or n/2 + 4 n/blocksize bytes without it. The arithmetic runs in fp32 whatever W's dtype (a bf16 W is exact in
    fp32); transient memory is a few fp32 copies of W."""
    if not W.is_floating_point():
        raise TypeError(f"quantize_nf4 quantises floating-point weights; got a {W.dtype} tensor of shape "
                        f"{tuple(W.shape)}. Pass the full-precision weight (fp32/bf16/fp16).")
    if not isinstance(blocksize, int) or blocksize < 1 or not isinstance(dq_blocksize, int) or dq_blocksize < 1:
        raise ValueError(f"quantize_nf4 needs positive integer block sizes; got blocksize={blocksize!r}, "
                         f"dq_blocksize={dq_blocksize!r}. QLoRA uses 64 and 256.")
    if W.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty tensor (shape {tuple(W.shape)}); there is nothing to quantise.")
    flat = W.detach().reshape(-1).to(torch.float32)
    blocks = _blocks(flat, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,) c_b
    # Multiply by the reciprocal (bitsandbytes' 4-bit kernel does the same); clamp guards an all-zero block (c_b = 0:
    # every code is then NF4 zero) and the rounding of W_i * (1 / c_b) just past +-1.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = _nearest(scaled, NF4_CODE).reshape(-1)[: flat.numel()]
    packed = pack_4bit(codes)
    if not double_quant:
        return packed, NF4State(W.shape, W.dtype, blocksize, absmax)
    offset = absmax.mean()
    scale_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset, dq_blocksize)
    return packed, NF4State(W.shape, W.dtype, blocksize, scale_codes, absmax_scale, offset.reshape(1), dq_blocksize)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The approximation W_hat of the quantised tensor: state.shape, in `dtype` (default: the original dtype).
    Computed in fp32 (NF4[q] * c_hat, one product per weight) and cast once, as bitsandbytes' kernels do."""
    device = packed.device
    out = _dequantize_into(packed, state, dtype, lambda role, numel, dt: torch.empty(numel, dtype=dt, device=device))
    # fp32 W_hat is a view of the grid, which is longer when the last block is padded: own storage, so that the
    # padded grid does not stay alive with the weight
    return out.clone() if out.untyped_storage().nbytes() != out.numel() * out.element_size() else out


_SCRATCH = threading.local()  # per thread: {(role, dtype, device): 1-D tensor}, grown to the largest size asked


def _scratch(role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The first `numel` elements of this thread's reused buffer for `role` (grown, never shrunk)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (role, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers[key] = None  # drop the old one before the bigger one is made
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def dequantize_nf4_scratch(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_nf4`, equal to it bit for bit, computed in and returned as a view of buffers this thread reuses:
    the result is valid only until the next call on this thread. For a matmul that uses W_hat at once and drops it
    (QLoRA's forward and backward); never for a weight that is kept (unload, merge: use `dequantize_nf4`).

    Why: `dequantize_nf4` allocates per call an int32 index (2 bytes per weight), the fp32 grid (4) and the result
    (2 in bf16): 92 MB for a 1.1B Llama's 11.5M-weight MLP matrix (the implementation before these buffers made 12
    bytes per weight). On a CPU, glibc serves such blocks from its heap once its dynamic mmap threshold has risen,
    and the holes they leave between the activations kept for backward stay resident; pinning the threshold low
    instead gives them back but maps and zeroes fresh pages at every call. Reused buffers avoid both: on an 8-layer
    1.1B-shaped Llama (LoRA r16 all-linear, 1 x 256 tokens, bf16 autocast, 2-core CPU), a QLoRA training step took
    2.26 s and peaked 0.39 GB above its start, against 2.37 s and 0.60 GB with the earlier per-call tensors, and
    5.20 s and 0.29 GB with the threshold pinned at 1 MiB (docs/benchmarks.md). Memory kept: one buffer per role of
    the largest tensor's size (~8 bytes per weight)."""
    return _dequantize_into(packed, state, dtype, lambda role, numel, dt: _scratch(role, numel, dt, packed.device))


def _dequantize_into(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None, buffer) -> torch.Tensor:
    """W_hat (state.shape, in `dtype` or the original dtype) computed in 1-D tensors from `buffer(role, numel,
    dtype)`: fresh ones (`dequantize_nf4`) or reused ones (`dequantize_nf4_scratch`). Returns a view of the last."""
    n, blocksize = state.numel, state.blocksize
    m = packed.numel()  # bytes: 2 codes each
    n_blocks = -(-n // blocksize)
    grid_numel = max(2 * m, n_blocks * blocksize)
    # One lookup per byte in a (256, 2) table of (NF4[high nibble], NF4[low nibble]) instead of unpacking the
    # nibbles first; index_select with int32 indices: 2.2 ms for a 1536 x 576 matrix on one CPU core, against
    # 6.2 ms for unpack + advanced indexing with int64 indices.
    index = buffer("nf4-index", m, torch.int32)
    index.copy_(packed.reshape(-1))
    grid = buffer("nf4-grid", grid_numel, torch.float32)
    torch.index_select(_PAIR_TABLE.to(packed.device), 0, index, out=grid[:2 * m].view(m, 2))
    if grid_numel > 2 * m:
        grid[2 * m:].zero_()  # the padded grid's tail, as _blocks pads with zeros
    grid[:n_blocks * blocksize].view(n_blocks, blocksize).mul_(state.scales()[:, None])
    dtype = dtype or state.dtype
    if dtype == torch.float32:
        return grid[:n].view(state.shape)
    out = buffer("nf4-out", n, dtype)
    out.copy_(grid[:n])
    return out.view(state.shape)


__all__ = ["NF4_CODE", "DYNAMIC_CODE", "BLOCKSIZES", "NF4State", "quantize_nf4", "dequantize_nf4",
           "dequantize_nf4_scratch", "pack_4bit",
           "unpack_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "dynamic_map_8bit", "nf4_nbytes"]
