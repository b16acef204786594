"""FSDP for the training loop: sharded parameters, gradients and optimizer state, with whole adapters saved.

Who shards:
- Accelerate, where its FSDP plugin runs (`accelerate launch` with `distributed_type: FSDP` on GPUs): its
  `prepare` applies FSDP2's `fully_shard` to each transformer block and the root.
- peftlab itself on CPU: Accelerate 1.x turns a CPU launch into MULTI_CPU (gloo) and drops the FSDP plugin without
  a word, so when the launch asked for FSDP (ACCELERATE_USE_FSDP=true, which `accelerate launch` sets from a config
  file with `distributed_type: FSDP`) and Accelerate did not take it, `Sharding.shard` calls torch's `fully_shard`
  itself with the same plugin settings (read from the launch's environment by Accelerate's own plugin class): each
  module whose class is in `transformer_cls_names_to_wrap` (default: the model's `_no_split_modules`, e.g.
  LlamaDecoderLayer) is one FSDP unit, then the root (the PeftModel) holds what is left (embeddings, norm, head).

FSDP2 shards each parameter on its own (a DTensor split along dim 0 over the processes), so a block's frozen base
weights and its trainable adapter weights live in one unit (what FSDP1 needed `use_orig_params` for); only the
trainable ones get gradients, which are reduce-scattered (averaged over processes, as DDP does, so the loop's
loss scaling is the same).

What stays whole:
- The adapter files (final adapter and every checkpoint's): `full_adapter_tensors` gathers each sharded adapter
  tensor on every process (collective, same order everywhere) and puts the full tensor in its module for the
  duration of the block, so `save_pretrained` on the main process writes one ordinary PEFT folder; with
  `write_back=True` (loading a checkpoint) the full tensors are split back into the shards on exit.
- The optimizer state in a checkpoint: gathered with torch.distributed.checkpoint's `get_optimizer_state_dict`
  (full_state_dict, on the main process's CPU), keyed by parameter name, and split again on `--resume` by
  `set_optimizer_state_dict`. Only the adapter's tensors have optimizer state, so this is small.

Not supported: FSDP1 (`fsdp_version: 1`, whose flat parameters are not DTensors; peftlab gathers FSDP2 tensors), a
method's `prepare` phase under Accelerate's FSDP (see prepare.py), the chunked loss (it needs the whole lm_head
weight outside the forward; train.chunked_loss=auto uses the full logits, lm_loss.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.method import Method


def fsdp_launch_requested() -> bool:
    """Whether `accelerate launch` was asked for FSDP (it sets ACCELERATE_USE_FSDP=true for distributed_type FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class Sharding:
    """How the run's model is sharded: `mode` is None (not sharded: one process or DDP), "accelerate" (Accelerate's
    FSDP2 plugin shards in `prepare`) or "torch" (peftlab calls `fully_shard` itself: FSDP asked for on CPU)."""

    def __init__(self, accelerator) -> None:
        self.mode: str | None = None
        self.plugin = None
        kind = accelerator.distributed_type.value
        if kind == "FSDP":
            self.mode, self.plugin = "accelerate", accelerator.state.fsdp_plugin
        elif fsdp_launch_requested() and accelerator.num_processes > 1 and kind == "MULTI_CPU":
            from accelerate.utils import FullyShardedDataParallelPlugin

            self.mode, self.plugin = "torch", FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings
        if self.mode and self.plugin.fsdp_version != 2:
            raise ConfigError(
                f"FSDP version {self.plugin.fsdp_version} was asked for; peftlab trains and saves adapters under FSDP2 "
                "only (per-parameter sharding: frozen base and trainable adapter tensors in one unit). Set "
                "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp_cpu_2proc.yaml is an example).")

    @property
    def active(self) -> bool:
        return self.mode is not None

    def describe(self, world: int) -> str | None:
        """One line for the run's log, or None when not sharded."""
        if self.mode == "torch":
            return (f"FSDP2 over {world} CPU processes (gloo), sharded by peftlab with torch's fully_shard (Accelerate "
                    "does not run its FSDP plugin on CPU); adapters are gathered whole for every save")
        if self.mode == "accelerate":
            return f"FSDP2 over {world} processes (Accelerate's plugin); adapters are gathered whole for every save"
        return None

    def check_methods(self, peft_model) -> None:
        """Refuse what peftlab does not run under FSDP: methods whose hooks read or write whole tensors between steps
        (AdaLoRA's rank budget and regulariser, Delta-LoRA's base update), where every tensor is a shard, and
        input-side methods (untested under FSDP)."""
        if not self.active:
            return
        defaults = {f.name: f.default for f in dataclasses.fields(Method)}
        for adapter in peft_model.active_adapters:
            method = peft_model.method_of(adapter)
            hooks = [h for h in ("on_step", "extra_loss", "forward", "model_modules")
                     if getattr(method, h) is not defaults[h]]
            if hooks:
                raise ConfigError(
                    f"method {method.name} declares {', '.join(hooks)}: Method hooks that work on whole tensors "
                    "between steps or rewrite the inputs, which peftlab does not run under FSDP (every tensor is a "
                    "shard there). Launch it with DDP (accelerate launch --multi_gpu, "
                    "configs/accelerate/multi_cpu_2proc.yaml) or pick a method without them (lora, dora, ia3, ...).")

    def shard(self, peft_model: nn.Module) -> None:
        """peftlab's own sharding ("torch" mode; a no-op otherwise): fully_shard each transformer block, then the
        root. Must run before the optimizer is built: fully_shard replaces every parameter by its DTensor shard."""
        if self.mode != "torch":
            return
        from torch.distributed.fsdp import fully_shard

        base = peft_model.get_base_model()
        names = set(self.plugin.transformer_cls_names_to_wrap or getattr(base, "_no_split_modules", None) or ())
        # The plugin's other settings (offload, mixed-precision policy, prefetch) are for GPUs and not applied here:
        # parameters already live in CPU memory, and precision comes from the loop's autocast.
        kwargs = {"reshard_after_forward": bool(self.plugin.reshard_after_forward)}
        blocks = [m for m in base.modules() if type(m).__name__ in names]
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(peft_model, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Within: this micro-batch's gradients stay local (FSDP2's set_requires_gradient_sync(False)) when `skip`;
        the last micro-batch of a step then reduce-scatters the sum. Nothing to do when not sharded by peftlab."""
        if self.mode != "torch" or not skip:
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def full_adapter_tensors(self, peft_model, write_back: bool = False) -> Iterator[None]:
        """Within: every adapter tensor of `peft_model` (`PeftModel.adapter_tensors` of each adapter) that is a shard
        is replaced in its module by the full tensor, on every process (call it on all of them: each gather is a
        collective). `write_back`: on exit the full tensors (e.g. just loaded from a checkpoint) are split into the
        shards again; otherwise they are dropped and the shards put back unchanged."""
        if not self.active:
            yield
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        owned = {id(t) for name in peft_model.peft_config for t in peft_model.adapter_tensors(name).values()}
        swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        for module in peft_model.modules():  # the same order on every process: the gathers line up
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) in owned and isinstance(param, DTensor):
                    full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                    module._parameters[key] = full
                    swapped.append((module, key, param, full))
        try:
            yield
        finally:
            for module, key, param, full in swapped:
                if write_back:
                    with torch.no_grad():
                        param.copy_(distribute_tensor(full.detach(), param.device_mesh, param.placements))
                module._parameters[key] = param

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The optimizer's state_dict for a checkpoint: as is when not sharded; under FSDP the full (gathered) state
        keyed by parameter name, on the main process (collective: call on every process)."""
        if not self.active:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, _inner(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        """The inverse of `optimizer_state` (collective under FSDP: the main process's copy is split to all)."""
        by_name = any(isinstance(k, str) for k in state.get("state", {}))
        if not self.active:
            if by_name:
                raise ConfigError("--resume: this checkpoint's optimizer state was written under FSDP (keyed by "
                                  "parameter name); resume it with the FSDP launch it was written with.")
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if state.get("state") and not by_name:
            raise ConfigError("--resume: this checkpoint's optimizer state was written by an unsharded run (keyed by "
                              "position); resume it the way it was launched (without FSDP).")
        set_optimizer_state_dict(model, _inner(optimizer), state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper (AcceleratedOptimizer), or the optimizer itself."""
    return getattr(optimizer, "optimizer", optimizer)


__all__ = ["Sharding", "fsdp_launch_requested"]
