"""The language-modelling loss without the (tokens x vocab) logits: train.chunked_loss.

HF's causal LMs compute logits = lm_head(h) for every position, (B, T, V), and the loss then takes a fp32 copy and,
in backward, a fp32 gradient of the same size: for SmolLM2 (V = 49152) at 8 x 1024 tokens that is 0.8 + 1.6 + 1.6 GB
(sizes computed from the shapes; benchmarks/gpu_lora.py measures peak memory with the chunked loss on a GPU). The
chunked path runs the same forward with the lm_head replaced by a stand-in that returns its input, so `.logits` of
the output are the last hidden states h (B, T, d), and computes sum_t CE(W h_t + b, y_t) with
peftlab.kernels.chunked_ce, one chunk of target rows at a time (512 MiB of fp32 logits: 2,688 rows at V = 49152).

Why the stand-in rather than calling the backbone (`model.model`, `model.transformer`) directly: the forward still
goes through the caller's module (the DDP wrapper in multi-process training, whose forward sets up the gradient
all-reduce), the PeftModel (input-side methods: prompt tuning's virtual tokens, prefix tuning's cache) and the
causal LM's own forward (its argument handling, and anything it does to h before the head, e.g. MiniCPM's scaling),
for every architecture alike; only the (B, T, d) x (d, V) product is left out.

The loss is exactly the full-logits loss when (checked by `chunked_loss_blocker`):
- the output embedding is a plain nn.Linear (tied to the input embedding or not, frozen or trained: the kernel
  returns dW and db), or a modules_to_save wrapper around one (the active adapter's copy is the one used);
- the model does nothing to the logits after the head. Known cases are read from the config (Gemma 2/3 soft-capping,
  Cohere's logit_scale, Granite's logits_scaling, ...); for the rest a probe compares, once per model, the logits
  of a short input with W h + b from the stand-in's output;
- virtual tokens (prompt tuning, P-tuning) are handled: h then has `extra` leading positions that predict nothing,
  and the targets get `extra` leading -100s, as lm_loss_sum does for the logits.
Otherwise `auto` falls back to the full logits and `on` raises with the reason.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ConfigError
from ..core.layer import AdapterLayer
from ..core.modules_to_save import ModulesToSaveWrapper
from ..kernels.chunked_ce import chunked_linear_cross_entropy
from .config import CHUNKED_LOSS_MODES, CHUNKED_LOSS_TASKS  # noqa: F401  (checked by the run config, torch-free)

# Config attributes under which transformers' causal LMs change the logits after the lm_head, each with the value
# that changes nothing: tanh soft-capping (Gemma 2/3, Nanochat, ...), scaling (Cohere, Granite, Falcon-H1, ...),
# cutting a padded vocabulary (Inkling). Read from the model's config and its text config.
LOGIT_CHANGES = {"final_logit_softcapping": None, "logit_softcapping": None, "logits_soft_cap": None,
                 "output_logit_soft_cap": None, "logit_scale": 1.0, "logits_scaling": 1.0, "output_multiplier": 1.0,
                 "lm_head_multiplier": 1.0, "logits_mup_width_multiplier": 1.0, "unpadded_vocab_size": None}

PROBE_TOKENS = 16
"""Tokens of the one-row probe input (the first row of the first batch, cut to this length)."""


def lm_targets(batch: dict[str, torch.Tensor], length: int | None = None) -> torch.Tensor:
    """(B, length) next-token targets of a batch: position t predicts labels[t + 1] (-100: no target).
    Packed rows: a token at position 0 starts a new example and is never a target (as in an unpadded row, whose
    first token has no predecessor), so the last token of one example never learns to predict the next.
    `length` > T (prompt tuning / P-tuning put `extra` = length - T virtual tokens first, PEFT's layout): the extra
    leading positions predict nothing and real position t still predicts labels[t + 1]."""
    labels = batch["labels"]
    if "position_ids" in batch:
        labels = labels.masked_fill(batch["position_ids"] == 0, -100)
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the whole (B, T, V) tensor; padding the
    # labels costs nothing.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
    extra = (length or targets.shape[1]) - targets.shape[1]
    if extra > 0:
        targets = F.pad(targets, (extra, 0), value=-100)  # (B, extra + T)
    return targets


@dataclass(frozen=True)
class ChunkedPlan:
    """Where the logits come from: the output embedding's path in the base model and the nn.Linear whose weight and
    bias the chunked loss uses (a modules_to_save wrapper's active copy, else the head itself)."""

    path: str
    head: nn.Linear


def _base_of(peft_model) -> nn.Module:
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def _output_head(base: nn.Module) -> tuple[ChunkedPlan | None, str | None]:
    """(plan, None) when the output embedding is a plain linear layer, else (None, why not)."""
    fn = getattr(base, "get_output_embeddings", None)
    module = fn() if callable(fn) else None
    if module is None:
        return None, f"{type(base).__name__} has no output embedding (get_output_embeddings() is None)"
    path = next((n for n, m in base.named_modules() if m is module), None)
    if not path:
        return None, f"the output embedding ({type(module).__name__}) is not a submodule of {type(base).__name__}"
    linear = module._current() if isinstance(module, ModulesToSaveWrapper) else module
    if isinstance(linear, AdapterLayer):
        return None, (f"{path!r} carries an adapter layer ({type(linear).__name__}), whose output is not a plain "
                      "W h + b")
    if type(linear) is not nn.Linear:
        return None, (f"{path!r} is a {type(linear).__name__}, not a plain torch.nn.Linear (e.g. a quantised or "
                      "custom layer)")
    if linear.weight.device.type == "meta":
        return None, f"{path!r} has its weight on the meta device (offloaded); the loss needs it in memory"
    if _sharded(base, linear):
        return None, f"the model is sharded (FSDP): the loss would need {path!r}'s whole weight outside the forward"
    return ChunkedPlan(path, linear), None


def _sharded(base: nn.Module, linear: nn.Module) -> bool:
    """Whether FSDP2 shards the model (peftlab/train/fsdp.py): its blocks are FSDP modules, or the head's weight is a
    DTensor shard (a root-only unit)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(linear.weight, DTensor) or any(isinstance(m, FSDPModule) for m in base.modules())


def _logit_change(base: nn.Module) -> str | None:
    configs = [getattr(base, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in configs:
        for name, neutral in LOGIT_CHANGES.items():
            value = getattr(config, name, None)
            if value is None or value == neutral:
                continue
            if name == "unpadded_vocab_size" and value == getattr(config, "vocab_size", None):
                continue
            return (f"its config sets {name}={value!r}: {type(base).__name__}'s forward changes the logits after the "
                    "lm_head, which the chunked loss does not do")
    return None


@contextlib.contextmanager
def lm_head_returns_hidden(base: nn.Module, path: str):
    """Within this block the module at `path` (the output embedding) is replaced by one that returns its input, so
    the model's `.logits` are the last hidden states (B, T, d). The original is put back on exit."""
    parent_name, _, child = path.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    original = getattr(parent, child)
    setattr(parent, child, _HiddenStates())
    try:
        yield
    finally:
        setattr(parent, child, original)


class _HiddenStates(nn.Module):
    """Stands in for the lm_head during one forward: returns the hidden states it is given."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


# (base model) -> {(head type, input-side adapter): reason or None}: the probe runs once per model and setting.
_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _probe(peft_model, plan: ChunkedPlan, input_ids: torch.Tensor) -> str | None:
    """Run one short row through the model twice, as is and with the head replaced, in eval mode without gradients
    or autocast, and compare the logits with W h + b. None when they agree."""
    base = _base_of(peft_model)
    modes = {m: m.training for m in peft_model.modules()}
    peft_model.eval()
    ids = input_ids[:1, :PROBE_TOKENS]
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            logits = peft_model(input_ids=ids).logits
            with lm_head_returns_hidden(base, plan.path):
                hidden = peft_model(input_ids=ids).logits
    except Exception as err:  # noqa: BLE001 - any failure of the stand-in forward means: do not use it
        return f"the forward fails with the lm_head replaced ({type(err).__name__}: {err})"
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not torch.is_tensor(hidden) or hidden.shape[:-1] != logits.shape[:-1] or \
            hidden.shape[-1] != plan.head.in_features:
        return (f"with the lm_head replaced the forward returns {tuple(getattr(hidden, 'shape', ()))}, not the hidden "
                f"states of the {tuple(logits.shape[:-1])} positions the logits have")
    with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):  # as the forwards above: fp32 both sides
        again = F.linear(hidden.to(plan.head.weight.dtype), plan.head.weight, plan.head.bias).float()
    logits = logits.float()
    diff = float((again - logits).abs().max()) / max(1.0, float(logits.abs().max()))
    tolerance = 1e-4 if plan.head.weight.dtype == torch.float32 else 2e-2
    if not diff <= tolerance:
        return (f"the logits {type(base).__name__} returns differ from lm_head(hidden states) (largest difference "
                f"{diff:.2g} of the largest logit on a probe row): its forward changes them after the lm_head")
    return None


def chunked_loss_blocker(peft_model, input_ids: torch.Tensor | None = None) -> tuple[ChunkedPlan | None, str | None]:
    """(plan, None) when the chunked loss computes exactly this model's next-token loss, else (None, the reason).
    `input_ids` (B, T) feed the probe (its first row, PROBE_TOKENS long), run once per model, head type and input-side
    adapter; without them the probe is skipped (config checks only)."""
    base = _base_of(peft_model)
    plan, reason = _output_head(base)
    if reason is None:
        reason = _logit_change(base)
    if reason is not None or input_ids is None:
        return (plan if reason is None else None), reason
    hook = getattr(peft_model, "_input_hook_adapter", lambda: None)()
    key = (type(base.get_submodule(plan.path)).__name__, type(peft_model.peft_config[hook]).__name__ if hook else None)
    probed = _PROBED.setdefault(base, {})
    if key not in probed:
        probed[key] = _probe(peft_model, plan, input_ids)
    reason = probed[key]
    return (plan if reason is None else None), reason


def chunked_loss_plan(peft_model, mode: str, input_ids: torch.Tensor | None = None) -> ChunkedPlan | None:
    """The plan for train.chunked_loss = `mode`: None for off, and for auto when the chunked loss would not be exact;
    a ConfigError for on in that case."""
    if mode == "off":
        return None
    plan, reason = chunked_loss_blocker(peft_model, input_ids)
    if reason is not None and mode == "on":
        raise ConfigError(f"train.chunked_loss=on, but the chunked loss would not compute this model's loss exactly: "
                          f"{reason}. Use chunked_loss: auto (it then uses the full logits) or off.")
    return plan


def describe_lm_loss(peft_model, mode: str, input_ids: torch.Tensor | None = None) -> str:
    """One line for the run's log: which loss runs and, when auto falls back, why (raises for on, as the plan does)."""
    plan = chunked_loss_plan(peft_model, mode, input_ids)
    if plan is not None:
        return (f"loss: chunked lm_head + cross-entropy over the hidden states of {plan.path!r} "
                f"(train.chunked_loss={mode}; the tokens x vocab logits are never held)")
    if mode == "off":
        return "loss: full logits (train.chunked_loss=off)"
    return f"loss: full logits (train.chunked_loss=auto: {chunked_loss_blocker(peft_model, input_ids)[1]})"


def chunked_lm_loss_sum(model, peft_model, plan: ChunkedPlan, inputs: dict[str, torch.Tensor],
                        batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """lm_loss_sum(model(**inputs).logits, batch) without the logits: (summed next-token loss, target count).
    `model` is what gradients flow through (the DDP wrapper in training, else the PeftModel)."""
    with lm_head_returns_hidden(_base_of(peft_model), plan.path):
        hidden = model(**inputs).logits  # (B, extra + T, d)
    if hidden.shape[-1] != plan.head.in_features:
        raise RuntimeError(f"With the lm_head replaced the model returned {tuple(hidden.shape)}, not hidden states of "
                           f"width {plan.head.in_features}; set train.chunked_loss: off for this model.")
    targets = lm_targets(batch, hidden.shape[1]).to(hidden.device)
    loss = chunked_linear_cross_entropy(hidden, plan.head.weight, targets, plan.head.bias, reduction="sum")
    return loss, int((targets != -100).sum())


__all__ = ["CHUNKED_LOSS_MODES", "CHUNKED_LOSS_TASKS", "ChunkedPlan", "chunked_lm_loss_sum", "chunked_loss_blocker",
           "chunked_loss_plan", "describe_lm_loss", "lm_head_returns_hidden", "lm_targets"]
