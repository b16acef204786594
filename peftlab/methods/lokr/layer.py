"""LoKr layers: a Kronecker-product update.

Math (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", §3;
the LyCORIS form PEFT implements), for a base weight of shape (out, in) (a Conv2d's (out, in, kh, kw)), s = alpha / r:

    out = a·b, in = c·d                  (`factorization`: the most balanced divisor pairs, a <= b, c <= d)
    ΔW = s · W1 ⊗ W2                     W1 (a, c)      W2 (b, d) (conv: (b, d, kh, kw))    ΔW (a·b, c·d)

    (W1 ⊗ W2)[i·b + j, k·d + l] = W1[i, k] W2[j, l]

W2 (the larger factor) is itself factorised W2 = W2a W2b (W2a (b, r), W2b (r, d·kh·kw)) when r < max(b, d) / 2,
i.e. when that saves parameters; W1 likewise (W1a (a, r), W1b (r, c)) only with decompose_both. Conv2d with
use_effective_conv2d (kernel larger than 1x1) and a factorised W2 holds the kernel in a core tensor:
W2[j, l, h, w] = Σ_pq T2[p, q, h, w] W2a[p, j] W2b[q, l], T2 (r, r, kh, kw), W2a (r, b), W2b (r, d).

A rank-r W2 gives ΔW rank <= rank(W1)·r; a 4096 x 4096 layer with r = 8 trains 64² + 2·8·64 = 5,120 numbers.

Init (PEFT's): W1 (or W1a) zero, every other factor Kaiming-uniform (a = √5), so ΔW = 0; init_weights="lycoris":
W1's factors random and W2 (or W2b) zero; False: all random. The draws run in PEFT's order (W1 or W1a, W1b; W2 or
W2a, W2b; T2), so the same torch seed gives PEFT's tensors.

rank_dropout zeroes output rows of ΔW in training (rescaled only with rank_dropout_scale); module_dropout skips the
update (peftlab/methods/loha/layer.py's LycorisLayer, shared with LoHa). Tensor names follow PEFT (`lokr_w1`,
`lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`, `lokr_t2`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..loha.layer import LycorisLayer, kaiming_


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n. factor > 0 dividing `dimension`: (factor, dimension/factor) as given
    (not reordered, PEFT's rule). Otherwise the pair found by raising m through the divisors of `dimension` while
    m < n, m + n does not grow and m <= factor (-1: no bound), which for -1 is the pair closest to √dimension:
    256 -> (16, 16), 96 -> (8, 12), 127 -> (1, 127), (128, factor 4) -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if nxt + dimension // nxt > m + n or nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    """LoKr on nn.Linear, transformers' Conv1D or nn.Conv2d (module docstring)."""

    factor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    adapter_containers = LycorisLayer.shared_containers + factor_names
    rescale_rank_dropout = False

    def create_factors(self, adapter_name: str, r: int, config) -> None:
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(self.in_features, config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = not (r < max(b, d) / 2)
        k = self.kernel_size  # () for Linear/Conv1D, (kh, kw) for Conv2d
        new = self.new_factor
        if full_w1:
            w1 = [new("lokr_w1", adapter_name, a, c)]
        else:
            w1 = [new("lokr_w1_a", adapter_name, a, r), new("lokr_w1_b", adapter_name, r, c)]
        if full_w2:
            w2 = [new("lokr_w2", adapter_name, b, d, *k)]
        elif self.effective_conv(config):
            w2 = [new("lokr_w2_a", adapter_name, r, b), new("lokr_w2_b", adapter_name, r, d),
                  new("lokr_t2", adapter_name, r, r, *k)]
        else:
            flat = d * (k[0] * k[1] if k else 1)
            w2 = [new("lokr_w2_a", adapter_name, b, r), new("lokr_w2_b", adapter_name, r, flat)]
        init = config.init_weights
        # The zero factor: W1 (or W1a) by default, W2 (or W2b) for "lycoris", none for False.
        if init == "lycoris":
            zero = w2[0] if len(w2) == 1 else w2[1]
        else:
            zero = w1[0] if init else None
        for t in w1 + w2:
            if t is zero:
                nn.init.zeros_(t)
            else:
                kaiming_(t)

    def _factor(self, adapter_name: str, full: str, left: str, right: str) -> torch.Tensor:
        store = getattr(self, full)
        if adapter_name in store:
            return store[adapter_name]
        return getattr(self, left)[adapter_name] @ getattr(self, right)[adapter_name]

    def build_delta(self, adapter_name: str) -> torch.Tensor:
        w1 = self._factor(adapter_name, "lokr_w1", "lokr_w1_a", "lokr_w1_b")  # (a, c)
        if adapter_name in self.lokr_t2:
            # (r, r, kh, kw) core x (r, b) x (r, d) -> (b, d, kh, kw)
            w2 = torch.einsum("pqhw,pj,ql->jlhw", self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name],
                              self.lokr_w2_b[adapter_name])
        else:
            w2 = self._factor(adapter_name, "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # (b, d) or (b, d·kh·kw)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]  # kron over (out, in) only: (a·b, c·d, kh, kw)
        return torch.kron(w1, w2.contiguous()) * self.scaling[adapter_name]
