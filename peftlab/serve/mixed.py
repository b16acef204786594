"""The mixed-adapter forward: every row of a batch runs the base model with its own adapter, from stacked tables.

Nothing is merged into the base weights and nothing is swapped between requests. Each adapted nn.Linear (or
transformers' Conv1D) of the serving copy is wrapped by a `MixedLinear` that holds, for the adapters loaded now,
stacked tables indexed by a per-row slot (slot 0 = no adapter):

    LoRA   y = W x + b + (s B) (A x)                          A (r, in), s B (out, r)
    DoRA   y = W x + b + (f - 1) (W x) + f (s B) (A x)        f = m / ||W + s B A||_row (out,), a constant at inference
    VeRA   y = W x + b + (b_v B_l) ((d A_l) x)                the same low-rank form, d and b_v folded into A_l, B_l
    IA3    y = l_out * (W (l_in * x) + b)                     l_in (in,) or l_out (out,), ones where not adapted

Low-rank terms are grouped into buckets by rank; in a bucket, row i gathers its own (A, B) by adapter index and one
batched matmul computes every row at once: h = bmm(x, A[idx]^T) (B, T, r), delta = bmm(h, B[idx]^T) (B, T, out).
Rows whose adapter has no term on this layer (no adapter, another method, a layer it does not target) index a zero
entry (or ones, for the scales), so they get exactly the base output. The cost of a step does not depend on how many
different adapters are in the batch, only on the ranks present.

The adapters' tensors are read with the methods' own code: each folder is loaded with `PeftModel.from_pretrained`
onto a copy of the base model that shares its weights (no weight is copied), and the terms above are read from the
wrapped layers (`TERMS`, one reader per layer class). That keeps config resolution (IA3's feedforward modules, VeRA's
projections regenerated from their seed, DoRA's magnitude) in one place; the method layers' own forward is untouched.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.layer import linear_shape
from ..core.method import method_for_config
from ..core.model import PeftModel, read_config
from ..io.adapter_files import AdapterFileError
from ..methods.dora.layer import DoraLinear
from ..methods.ia3.layer import IA3Linear
from ..methods.lora.layer import LoraLinear
from ..methods.vera.layer import VeraLinear

SERVED_METHODS = ("lora", "dora", "ia3", "vera")


class AdapterRefused(AdapterFileError):
    """An adapter folder that is readable but cannot be served in mixed batches (the message says why)."""


@dataclass
class Term:
    """One adapter's effect on one linear layer, in the base weight's dtype (fp32 for a half-precision base)."""

    A: torch.Tensor | None = None          # (r, in)
    B: torch.Tensor | None = None          # (out, r), scaling folded in
    factor: torch.Tensor | None = None     # (out,) DoRA's m / n
    in_scale: torch.Tensor | None = None   # (in,)  IA3 on a feedforward layer
    out_scale: torch.Tensor | None = None  # (out,) IA3 elsewhere


def _lora_term(layer: LoraLinear, name: str) -> Term:
    A, B = layer.lora_pair(name)
    return Term(A=A.detach(), B=B.detach() * layer.scaling[name])


def _dora_term(layer: DoraLinear, name: str) -> Term:
    term = _lora_term(layer, name)
    with torch.no_grad():
        term.factor = layer.scale(name).flatten()  # m / ||W + s B A||: W and the adapter are frozen, so computed once
    return term


def _ia3_term(layer: IA3Linear, name: str) -> Term:
    v = layer.ia3_l[name].detach().flatten()
    return Term(in_scale=v) if layer.feedforward[name] else Term(out_scale=v)


def _vera_term(layer: VeraLinear, name: str) -> Term:
    d, b = layer.vera_lambda_d[name].detach(), layer.vera_lambda_b[name].detach()
    A, B = layer._sliced(name, d.dtype)  # (r, in), (out, r): this layer's slices of the shared projections
    return Term(A=d[:, None] * A, B=b[:, None] * B)


# Exact layer class -> how to read its term (DoraLinear subclasses LoraLinear, so no isinstance chain).
TERMS = {LoraLinear: _lora_term, DoraLinear: _dora_term, IA3Linear: _ia3_term, VeraLinear: _vera_term}


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers are the original's tensors (nothing copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _warn_if_trained_on_another_base(folder: str, config) -> None:
    """A warning when the run beside `folder` trained it with a method that holds the base in another form (QLoRA's
    4-bit weights, whose files read as plain LoRA): served on the one full-precision base all adapters share, its
    outputs differ a little from the model it was trained as. `peftlab merge` folds it into that base exactly."""
    from ..core.config import ConfigError
    from ..core.save_load import config_as_trained
    from ..train.config import load_run_config, run_config_beside

    path = run_config_beside(folder)
    if path is None:
        return
    try:
        run = load_run_config(path)
    except ConfigError:
        return  # not this adapter's business to judge; the file itself is read as it says
    trained = config_as_trained(config, run.method)
    if type(trained) is not type(config) and method_for_config(trained).quantize_at_load is not None:
        warnings.warn(f"adapter {folder} was trained with method {run.method_name} ({path}) on a quantised base; "
                      "peftlab serve runs it on the shared full-precision base, so its outputs differ slightly from "
                      "the model it was trained as. For that model exactly, merge it (`peftlab merge`, which folds "
                      "the update into the dequantised weights) and serve the merged folder.", stacklevel=3)


def read_adapter(base: nn.Module, folder: str) -> tuple[str, dict[str, Term]]:
    """(method name, {module path: Term}) of the adapter in `folder`, read onto a weight-sharing copy of `base`.
    Raises AdapterFileError (bad folder) or AdapterRefused (a method or setting mixed batches cannot serve)."""
    config = read_config(folder)
    method = method_for_config(config).name
    where = f"adapter {folder}"
    _warn_if_trained_on_another_base(folder, config)
    if method not in SERVED_METHODS:
        raise AdapterRefused(f"{where} is {method}; peftlab serve mixes {', '.join(SERVED_METHODS)} adapters only "
                             f"({method} is not a per-layer weight update). Serve it with `peftlab generate`, or merge "
                             "it (`peftlab merge`) and serve the merged model.")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        raise AdapterRefused(f"{where} has init_lora_weights={init!r}: it needs its own residual base weights, which "
                             "a shared base cannot give. Merge it (`peftlab merge`) and serve the merged model.")
    if getattr(config, "bias", "none") != "none" or config.modules_to_save:
        raise AdapterRefused(f"{where} trains base-model tensors (bias={getattr(config, 'bias', 'none')!r}, "
                             f"modules_to_save={config.modules_to_save!r}), which rows of one batch cannot each have. "
                             "Merge it (`peftlab merge`) and serve the merged model.")
    holder = PeftModel.from_pretrained(shared_copy(base), folder, adapter_name="serve", config=config)
    terms: dict[str, Term] = {}
    for path, layer in holder.adapter_layers():
        reader = TERMS.get(type(layer))
        if reader is None:
            raise AdapterRefused(f"{where} adapts {path!r} with {type(layer).__name__}; mixed batches serve adapters "
                                 "on linear layers only. Retrain it without that target, or merge it and serve the "
                                 "merged model.")
        terms[path] = reader(layer, "serve")
    return method, terms


class BatchContext:
    """What every MixedLinear of one serving model reads during a forward: each row's adapter slot."""

    def __init__(self) -> None:
        self.rows = torch.zeros(1, dtype=torch.long)  # (B,) slot per row, 0 = no adapter
        self.present: frozenset[int] = frozenset()   # the slots in `rows` (Python side: no device sync per layer)

    def set(self, slots: list[int], device: torch.device) -> None:
        self.rows = torch.tensor(slots, dtype=torch.long, device=device)
        self.present = frozenset(slots)


@dataclass
class Bucket:
    """The low-rank terms of one rank on one layer: entry 0 is zeros; `local[slot]` is a slot's entry (0 if none)."""

    slots: frozenset[int]
    A: torch.Tensor       # (n + 1, r, in)
    B: torch.Tensor       # (n + 1, out, r)
    local: torch.Tensor   # (S + 1,) long


def _vector_table(values: dict[int, torch.Tensor], n_slots: int, size: int, like: torch.Tensor) -> torch.Tensor:
    table = torch.ones(n_slots + 1, size, dtype=like.dtype, device=like.device)  # ones: the identity scale
    for slot, v in values.items():
        table[slot] = v
    return table


class MixedLinear(nn.Module):
    """A base linear layer plus the stacked tables of the loaded adapters that target it (module docstring)."""

    def __init__(self, base_layer: nn.Module, ctx: BatchContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.in_features, self.out_features, _ = linear_shape(base_layer)
        self.set_terms({}, 0)

    @property
    def weight(self) -> torch.Tensor:  # tied heads and code that reads `module.weight` keep working
        return self.base_layer.weight

    def set_terms(self, terms: dict[int, Term], n_slots: int) -> None:
        """Rebuild the tables from {slot: Term} (slots 1..n_slots are the loaded adapters)."""
        w = self.base_layer.weight
        like = torch.empty(0, device=w.device, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16)
                           else w.dtype)  # adapter tensors stay fp32 on a half-precision base, as the methods keep them
        self.buckets: list[Bucket] = []
        ranks = sorted({t.A.shape[0] for t in terms.values() if t.A is not None})
        for r in ranks:
            members = [(slot, t) for slot, t in sorted(terms.items()) if t.A is not None and t.A.shape[0] == r]
            A = torch.zeros(len(members) + 1, r, self.in_features, dtype=like.dtype, device=like.device)
            B = torch.zeros(len(members) + 1, self.out_features, r, dtype=like.dtype, device=like.device)
            local = torch.zeros(n_slots + 1, dtype=torch.long, device=like.device)
            for i, (slot, t) in enumerate(members, start=1):
                A[i], B[i], local[slot] = t.A, t.B, i
            self.buckets.append(Bucket(frozenset(s for s, _ in members), A, B, local))
        picked = {k: {s: getattr(t, k).to(like) for s, t in terms.items() if getattr(t, k) is not None}
                  for k in ("factor", "in_scale", "out_scale")}
        self.factor_slots = frozenset(picked["factor"])
        self.in_slots = frozenset(picked["in_scale"])
        self.out_slots = frozenset(picked["out_scale"])
        sizes = {"factor": self.out_features, "in_scale": self.in_features, "out_scale": self.out_features}
        for key, size in sizes.items():  # (S + 1, size) tables, or None where no loaded adapter has such a vector
            setattr(self, key, _vector_table(picked[key], n_slots, size, like) if picked[key] else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, present = self.ctx.rows, self.ctx.present
        if present == {0}:
            return self.base_layer(x)
        n = x.shape[0]  # x (B, T, in): one row per request
        h_in = x
        if self.in_slots & present:
            scale = self.in_scale[rows].view(n, 1, -1)  # (B, 1, in)
            h_in = (x.to(scale.dtype) * scale).to(x.dtype)
        y = self.base_layer(h_in)
        if self.out_slots & present:
            y = (y * self.out_scale[rows].view(n, 1, -1)).to(y.dtype)
        delta = None
        for bucket in self.buckets:
            if not bucket.slots & present:
                continue
            idx = bucket.local[rows]  # (B,)
            A, B = bucket.A[idx], bucket.B[idx]  # (B, r, in), (B, out, r)
            xa = x.reshape(n, -1, x.shape[-1]).to(A.dtype)
            d = torch.bmm(torch.bmm(xa, A.transpose(1, 2)), B.transpose(1, 2))  # (B, T, r) -> (B, T, out)
            delta = d if delta is None else delta + d
        if self.factor_slots & present:
            f = self.factor[rows].view(n, 1, -1)  # (B, 1, out): ones for rows that are not DoRA
            bias = getattr(self.base_layer, "bias", None)
            base = y if bias is None else y - bias  # DoRA rescales W x, not the bias
            out = y + (f - 1) * base
            return (out if delta is None else out + f * delta.view_as(y)).to(y.dtype)
        return y if delta is None else y + delta.view_as(y).to(y.dtype)


class MixedModel:
    """A serving copy of a causal LM (weights shared with `base`) whose adapted layers are MixedLinear, and the
    loaded adapters in slot order. Not thread-safe: the engine calls load/unload between forward steps."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.net = shared_copy(base).eval()
        self.ctx = BatchContext()
        self.adapters: dict[str, tuple[str, str, dict[str, Term]]] = {}  # name -> (method, folder, terms)
        self.slots: dict[str, int] = {}

    def install(self, name: str, method: str, folder: str, terms: dict[str, Term]) -> None:
        """Add an adapter read by `read_adapter` and rebuild the tables."""
        self.adapters[name] = (method, folder, terms)
        for path in terms:
            module = self.net.get_submodule(path)
            if not isinstance(module, MixedLinear):
                parent, _, child = path.rpartition(".")
                setattr(self.net.get_submodule(parent) if parent else self.net, child, MixedLinear(module, self.ctx))
        self._rebuild()

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self._rebuild()

    def _rebuild(self) -> None:
        self.slots = {name: i for i, name in enumerate(self.adapters, start=1)}
        for path, module in self.net.named_modules():
            if isinstance(module, MixedLinear):
                module.set_terms({self.slots[n]: terms[path] for n, (_, _, terms) in self.adapters.items()
                                  if path in terms}, len(self.slots))
