"""What a method's `prepare` hook gets from the training loop: the means to run a phase before the main training.

`Method.prepare(model, adapter_name, run)` (peftlab/core/method.py) is called by `Trainer` once per active adapter,
after the adapter is injected and before the main optimizer is built; `run` is a `PrepareRun`. Nothing here names
a method: a hook picks rows, trains on them, scores them and reports, and the loop then trains as usual on whatever
the hook left.

`PrepareRun.train(steps, rows)` takes optimizer steps as the main loop takes them (`Trainer._step`), on `rows`:
    step k's global batch = rows k*G .. (k+1)*G - 1 of a seeded permutation of `rows` (G = global batch; a new
        permutation for each pass over them), split into grad_accum micro-batches x processes as the loop splits it;
    loss = (sum of the losses over the trained units of the global batch) / (their number), backward per micro-batch;
    several processes: the gradients are summed over them (all_reduce), so the step is the one-process step;
    clip to max_grad_norm, AdamW step (the run's lr and weight decay, the methods' param groups), the run's schedule
        (warmup, then linear/cosine/constant) stretched over `steps`.
Its AdamW and schedule are thrown away at the end: the main training starts with its own. The methods' extra_loss and
on_step hooks are not called (they belong to the main training; a hook that wants them calls them itself). The
model is used unwrapped (no DDP: the hook may re-tie parameters afterwards, which a DDP wrapper built now would not
follow), which is why gradients are summed here by hand.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.config import ConfigError
from ..io.atomic import atomic_write_text
from .optim import adamw_with_schedule, param_groups_with_decay


class PrepareRun:
    """The run as a `Method.prepare` hook sees it (see the module docstring)."""

    def __init__(self, trainer) -> None:
        """`trainer`: the loop's Trainer (loop.py), read for its rows, collator, task, config and accelerator."""
        self._trainer = trainer
        self.train_rows: int = len(trainer.train_examples)
        """How many training rows (examples after encoding and packing) the run has."""
        self.global_batch: int = trainer.global_batch
        """Rows per optimizer step: batch_size x grad_accum x processes."""
        self.seed: int = trainer.cfg.seed
        self.output_dir: str = trainer.cfg.output_dir
        self.is_main_process: bool = trainer.accelerator.is_main_process
        self.device = trainer.accelerator.device

    # ---- rows ----------------------------------------------------------------------------------------------

    def sample_rows(self, n: int, seed: int | None = None) -> list[int]:
        """Indices (ascending) of `n` training rows drawn without replacement, reproducibly from `seed` (default: the
        run's). Classification draws per label in proportion to the label's share of the rows (stratified, largest
        remainders get the rounding), so a small sample still holds every class; other tasks draw uniformly."""
        total = self.train_rows
        if not isinstance(n, int) or not 1 <= n <= total:
            raise ValueError(f"sample_rows(n={n!r}): n must be an integer from 1 to the {total} training rows.")
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        examples = self._trainer.train_examples
        if not self._trainer.task.classifies:
            return sorted(torch.randperm(total, generator=g)[:n].tolist())
        by_label: dict[Any, list[int]] = defaultdict(list)
        for i, ex in enumerate(examples):
            by_label[ex["label"]].append(i)
        labels = sorted(by_label, key=str)
        exact = {lab: n * len(by_label[lab]) / total for lab in labels}
        quota = {lab: math.floor(q) for lab, q in exact.items()}
        for lab in sorted(labels, key=lambda lab: quota[lab] - exact[lab])[: n - sum(quota.values())]:
            quota[lab] += 1
        chosen: list[int] = []
        for lab in labels:
            members = by_label[lab]
            chosen += [members[int(i)] for i in torch.randperm(len(members), generator=g)[: quota[lab]]]
        return sorted(chosen)

    def batches(self, rows: Sequence[int], batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches of `rows` in the given order (batch_size: the run's eval_batch_size), on the device, with
        every key the collator writes (input_ids, attention_mask, labels; packed rows also position_ids, seq_lens).
        Every process gets all of them, as every process evaluates all eval rows."""
        t = self._trainer
        bs = batch_size or t.cfg.eval_batch_size
        rows = list(rows)
        for start in range(0, len(rows), bs):
            yield t._to_device(t.collator([t.train_examples[i] for i in rows[start:start + bs]]))

    # ---- training --------------------------------------------------------------------------------------------

    def train(self, steps: int, rows: Sequence[int]) -> list[float]:
        """Take `steps` optimizer steps on `rows` (see the module docstring). Returns each step's loss (mean over the
        step's trained units: tokens, or examples for classification)."""
        t, cfg, acc = self._trainer, self._trainer.cfg, self._trainer.accelerator
        rows = list(rows)
        gb = self.global_batch
        if len(rows) < gb:
            raise ConfigError(
                f"A method's preparation phase asked to train on {len(rows)} rows, fewer than one global batch "
                f"({gb} = batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {acc.num_processes} processes). "
                "Sample more rows, or lower train.batch_size.")
        if acc.distributed_type.value in ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA"):
            raise ConfigError(
                f"A method's preparation phase trains the unwrapped model with gradients summed over processes; it "
                f"does not run under {acc.distributed_type.value} (sharded parameters). Launch with plain DDP "
                "(accelerate launch --multi_gpu) or on one process.")
        model = t.peft_model.to(acc.device)
        world, rank, bs = acc.num_processes, acc.process_index, cfg.batch_size
        optimizer, scheduler = adamw_with_schedule(param_groups_with_decay(model, cfg.lr, cfg.weight_decay), cfg, steps)
        # fp16 autocast needs loss scaling (what Accelerate's own optimizer wrapper would do); bf16 and fp32 do not.
        scaler = torch.amp.GradScaler(acc.device.type) if acc.mixed_precision == "fp16" else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Rows beyond the last full global batch of a pass are skipped in that pass (the next pass's permutation
        # differs), so every step has exactly G rows, as in the main loop.
        per_pass = len(rows) // gb
        order: torch.Tensor | None = None
        was_training = model.training
        model.train()
        losses = []
        for step in range(steps):
            rep, pos = divmod(step, per_pass)
            if pos == 0 or order is None:
                # Its own stream (the main loop seeds epoch e with seed * 1_000_003 + e), so the phase's order is
                # not the main training's first epoch order.
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (rep + 1))
                order = torch.tensor(rows)[torch.randperm(len(rows), generator=g)]
            step_rows = order[pos * gb:(pos + 1) * gb]
            batches = []
            for j in range(cfg.grad_accum):
                mine = step_rows[j * bs * world + rank * bs: j * bs * world + (rank + 1) * bs]
                batches.append(t._to_device(t.collator([t.train_examples[int(i)] for i in mine])))
            local = torch.tensor([sum(t.task.count_units(b) for b in batches)], device=acc.device)
            units = int((acc.reduce(local, "sum") if world > 1 else local)[0])
            total = torch.zeros(1, device=acc.device)
            for batch in batches:
                with acc.autocast():
                    loss_sum = t.task.forward(model, model, batch, t.run).loss_sum
                loss = loss_sum / max(units, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss_sum.detach()
            if world > 1:
                for p in trainable:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                total = acc.reduce(total, "sum")
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(total) / max(units, 1))
        model.train(was_training)
        return losses

    # ---- reporting ---------------------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        """Print through the run's logger (main process only)."""
        if self.is_main_process:
            self._trainer.log(text)

    def write_json(self, name: str, data: Any) -> str:
        """Write `data` as JSON to output_dir/name (atomically; main process only). Returns the path."""
        path = os.path.join(self.output_dir, name)
        if self.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path


__all__ = ["PrepareRun"]
