"""One training loop for every method and task, on Accelerate.

Per optimizer step:
    take grad_accum micro-batches (each process its own slice of every global micro-batch)
    count the trained units (tokens, examples or pairs) over the whole global batch
    for each micro-batch: loss = sum of losses / global units (x processes, which DDP averages over)
                          + the methods' extra losses; backward
    clip, optimizer step, scheduler step, then every active method's on_step hook
The loss of a micro-batch is the task's (`Task.forward`, tasks.py): one forward for most tasks, a policy and a
reference forward for dpo.
Before the first step (and before the optimizer is built) every active method's `prepare` hook runs once.
Dividing by the global count (not averaging per micro-batch) makes accumulation and multi-process runs
compute the same update as one large batch. Under FSDP (fsdp.py) the model is sharded before the optimizer is built,
and every save (checkpoints, the final adapter) gathers the adapter whole.

Data order is a function of (seed, epoch) only, so the position in the data is just the step number:
a checkpoint stores the step, and `--resume` continues to the same final adapter as an uninterrupted run.

`train()` also dispatches what this loop does not run: task ppo (ppo/, its own loop) and methods that take over a
run (Method.run: features, icl), which get a method_run.MethodRun. Shared by every trainer: optim.py (Accelerator,
AdamW groups, schedule), guards.py (non-finite stops), metrics_log.py (metrics.jsonl), model_card.py (README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..core.config import ConfigError
from ..core.method import method_for_config
from ..core.model import get_peft_model, trainable_parameters_line
from ..data import Collator, encode_rows, example_length, load_splits
from ..data.templates import save_adapter_template
from ..io.atomic import atomic_folder, atomic_write_text, remove_folder
from ..io.lock import folder_lock
from . import ppo
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .fsdp import Sharding
from .guards import TrainingDivergedError, check_weights_finite, diverged_error, non_finite_step
from .lm_loss import describe_lm_loss
from .method_run import MethodRun
from .metrics_log import MetricsLogger
from .model_card import format_before_after, write_model_card
from .model_loading import load_tokenizer_and_model
from .optim import adamw_with_schedule, lr_lambda, new_accelerator, param_groups_with_decay, resolve_precision
from .prepare import PrepareRun
from .sources import resolve_shipped
from .tasks import TASK_TABLE, Task, summarise_eval
from .trackers import RunTrackers


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "seq_lens" in batch:
        return int(torch.as_tensor(batch["seq_lens"]).sum())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


@dataclass
class RunState:
    """Everything beyond the weights that a resumed run needs to continue identically."""

    step: int = 0
    best_eval_loss: float = math.inf
    bad_evals: int = 0
    history: list = field(default_factory=list)


class Trainer:
    def __init__(self, run: RunConfig, accelerator: Accelerator | None = None, log=print, prepare: bool = True) -> None:
        """prepare=False skips the methods' phase before training (Method.prepare): for evaluating a saved adapter,
        whose file already holds that phase's outcome (e.g. LoRA-drop's shared pairs, copied under every layer)."""
        self.run, self.cfg, self.log = run, run.train, log
        self.task: Task = TASK_TABLE[run.task]
        self.accelerator = accelerator or new_accelerator(self.cfg.precision)
        set_seed(self.cfg.seed)
        splits = load_splits(resolve_shipped(run.data), run.task)
        self.data_report = splits.report
        self.label_names = splits.report.get("labels") if self.task.classifies else None
        label2id = {name: i for i, name in enumerate(self.label_names)} if self.label_names else None
        head_labels = self.label_names or (list(self.task.head_labels) if self.task.head_labels else None)
        if run.base_dtype_note:
            self.log(run.base_dtype_note)
        self.tokenizer, base = load_tokenizer_and_model(run.model, self.task.auto_model, head_labels,
                                                        dtype=run.base_dtype, method_config=run.method)
        self.train_examples = encode_rows(splits.train, run.task, self.tokenizer, run.data, label2id)
        self.eval_examples = encode_rows(splits.eval, run.task, self.tokenizer, run.data, label2id)
        # Packed rows rely on a 4D block-diagonal mask; the collator refuses attention kernels that ignore it.
        self.collator = Collator(self.tokenizer.pad_token_id, run.task,
                                 attn_implementation=getattr(base.config, "_attn_implementation", None))
        method_config = run.method
        if method_config.task_type is None:
            method_config = dataclasses.replace(method_config, task_type=self.task.task_type)
        if self.cfg.gradient_checkpointing:
            # Non-reentrant checkpointing sends gradients to adapter weights even though the embeddings'
            # output does not require grad (the reentrant variant would silently train nothing).
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            base.config.use_cache = False
        self.peft_model = get_peft_model(base, method_config)
        moving = self.peft_model.trains_base_in_place(self.peft_model.active_adapters)
        if self.task.reference_is_base and moving:
            raise ConfigError(
                f"task {run.task} uses the base model with adapters disabled as its reference, but method "
                f"{run.method_name} changes base weights in place while training (full, bitfit, bias != 'none' or "
                "Delta-LoRA), which would move the reference. Use an adapter that leaves the base alone (lora, dora, "
                "vera, ia3, ...) and bias: none.")
        world = self.accelerator.num_processes
        self.global_batch = self.cfg.batch_size * self.cfg.grad_accum * world
        # Rows left over after the last full global batch of an epoch are skipped in that epoch (the next
        # epoch's permutation differs), so every step has exactly the same number of rows.
        self.steps_per_epoch = len(self.train_examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"Only {len(self.train_examples)} training examples, fewer than one global batch (batch_size "
                f"{self.cfg.batch_size} x grad_accum {self.cfg.grad_accum} x {world} processes). "
                "Lower train.batch_size or grad_accum, or add data.")
        self.total_steps = self.cfg.max_steps or max(1, round(self.cfg.epochs * self.steps_per_epoch))
        # A method's phase before the main training (Method.prepare, e.g. LoRA-drop's layer selection) may change
        # which tensors train, so the optimizer is built after it. Markdown notes it returns go into the model card.
        self.method_notes = self.peft_model.prepare(PrepareRun(self)) if prepare else []
        if self.accelerator.is_main_process:  # PEFT's print_trainable_parameters line, after prepare (which may
            self.log(trainable_parameters_line(*self.peft_model.get_nb_trainable_parameters()))  # change it)
        # FSDP (fsdp.py): peftlab shards the model itself where Accelerate will not (CPU), before the optimizer is
        # built, since fully_shard replaces every parameter by its shard.
        self.sharding = Sharding(self.accelerator)
        self.sharding.check_methods(self.peft_model)
        self.sharding.shard(self.peft_model)
        if self.sharding.active:
            self.log(self.sharding.describe(world))
        self.optimizer, self.scheduler = adamw_with_schedule(
            param_groups_with_decay(self.peft_model, self.cfg.lr, self.cfg.weight_decay), self.cfg, self.total_steps)
        if self.sharding.mode == "torch":  # already sharded: Accelerate would wrap it in DDP on top
            self.model = self.peft_model
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.peft_model, self.optimizer)
        if self.task.chunkable:  # train.chunked_loss: say which loss runs (and fail now if `on` cannot be exact)
            probe = self._to_device(self.collator(self.train_examples[:1]))["input_ids"]
            self.log(describe_lm_loss(self.peft_model, self.cfg.chunked_loss, probe))
        self.state = RunState()
        self._perms: dict[int, torch.Tensor] = {}

    # ---- data order ------------------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for optimizer step `step`.

        The global batch of a step is a fixed slice of the epoch's permutation; accumulation and processes
        only partition it (micro-batch j, then process rank), so 1 process x 8 rows, 1 x 4 x 2 accumulation
        steps and 2 processes x 4 rows all see the same rows in the same step."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._perms:
            self._perms = {epoch: self._epoch_order(epoch)}
        rows = self._perms[epoch][pos * self.global_batch:(pos + 1) * self.global_batch]
        bs, world, rank = self.cfg.batch_size, self.accelerator.num_processes, self.accelerator.process_index
        batches = []
        for j in range(self.cfg.grad_accum):
            mine = rows[j * bs * world + rank * bs: j * bs * world + (rank + 1) * bs]
            batches.append(self._to_device(self.collator([self.train_examples[int(i)] for i in mine])))
        return batches

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The row order of one epoch: a seeded shuffle. With group_by_length, each window of 32 global batches
        is sorted by length and cut into global batches whose order is shuffled again, so a batch holds rows of
        similar length and little of it is padding (2x fewer tokens on short, varied reviews), while the
        order stays random across windows and a function of (seed, epoch) alone."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=g)
        if not self.cfg.group_by_length:
            return order
        lengths = torch.tensor([example_length(self.train_examples[int(i)]) for i in order])
        window, gb = 32 * self.global_batch, self.global_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[torch.argsort(lengths[start:start + window], descending=True, stable=True)]
            batches += [chunk[i:i + gb] for i in range(0, len(chunk) - gb + 1, gb)]
        batches = [batches[int(i)] for i in torch.randperm(len(batches), generator=g)]
        return torch.cat(batches) if batches else order

    def _to_device(self, batch):
        return {k: (v.to(self.accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ---- evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy/macro-F1 for classification, pair accuracy and rewards for preference tasks) on the
        eval rows. Every process evaluates all rows (deterministic and identical), so no gathering is needed."""
        model = self.peft_model
        was_training = model.training
        model.eval()
        loss_sum, units, preds, labels, sums = 0.0, 0, [], [], {}
        bs = self.cfg.eval_batch_size
        # Rows in length order: each batch pads to similar lengths (one-sentence reviews in file order were 2.2x
        # padding: 8,832 positions for 4,042 tokens). Every metric is a sum over rows, so the order changes nothing.
        ordered = sorted(self.eval_examples, key=example_length)
        for start in range(0, len(ordered), bs):
            batch = self._to_device(self.collator(ordered[start:start + bs]))
            with self.accelerator.autocast():
                out = self.task.forward(model, model, batch, self.run)
            loss_sum, units = loss_sum + float(out.loss_sum), units + out.units
            for key, value in out.sums.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if self.task.classifies:
                preds += out.logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
        model.train(was_training)
        return summarise_eval(self.task, loss_sum, units, preds, labels, len(self.label_names or []), sums)

    # ---- the loop ----------------------------------------------------------------------------------------

    def _checkpoint_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def resume(self) -> None:
        found = list_checkpoints(self._checkpoint_root())
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {self._checkpoint_root()}; "
                              "train.save_every must be > 0 in the run being resumed.")
        with self.sharding.full_adapter_tensors(self.peft_model, write_back=True):  # under FSDP: into every shard
            state = load_checkpoint(found[-1], self.peft_model)
        self.sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.state = RunState(**state["run_state"])
        self.log(f"resumed from {found[-1]} at step {self.state.step}")

    def _save_checkpoint(self) -> None:
        # Under FSDP every process takes part in gathering the adapter and the optimizer state; the main one writes.
        optimizer_state = self.sharding.optimizer_state(self.model, self.optimizer)
        with self.sharding.full_adapter_tensors(self.peft_model):
            self._check_weights_finite()
            if self.accelerator.is_main_process:
                state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                         "rng": rng_state(), "run_state": dataclasses.asdict(self.state)}
                save_checkpoint(self._checkpoint_root(), self.state.step, self.peft_model, state,
                                self.cfg.keep_checkpoints, self.run.data.chat_template)
        self.accelerator.wait_for_everyone()

    def _step(self) -> tuple[float, int, int]:
        """One optimizer step. Returns (summed loss, trained units, tokens seen) over the global batch."""
        acc, cfg = self.accelerator, self.cfg
        batches = self._micro_batches(self.state.step)
        local = torch.tensor([sum(self.task.count_units(b) for b in batches), sum(count_tokens(b) for b in batches)],
                             device=acc.device)
        units, tokens = (acc.reduce(local, "sum") if acc.num_processes > 1 else local).tolist()
        self.model.train()
        loss_total = torch.zeros((), device=acc.device)
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            with (contextlib.nullcontext() if sync else acc.no_sync(self.model)), \
                    self.sharding.no_sync(self.model, skip=not sync), acc.autocast():
                loss_sum = self.task.forward(self.model, self.peft_model, batch, self.run).loss_sum
                loss = loss_sum * acc.num_processes / max(units, 1)
                extra = self.peft_model.extra_loss()
                if extra is not None:
                    loss = loss + extra / len(batches)
            acc.backward(loss)
            loss_total += loss_sum.detach()
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        self._stop_if_non_finite(loss_total, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        # Before zero_grad: a method's hook may read this step's gradients (AdaLoRA's sensitivity scores).
        self.peft_model.on_step(self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        summed = acc.reduce(loss_total, "sum") if acc.num_processes > 1 else loss_total
        return float(summed), int(units), int(tokens)

    def _stop_if_non_finite(self, loss: torch.Tensor, grad_norm) -> None:
        """Raise TrainingDivergedError before the optimizer applies a NaN/inf update."""
        what = non_finite_step(loss, grad_norm, [p for p in self.model.parameters() if p.requires_grad],
                               self.accelerator)
        if what is not None:
            raise diverged_error(what, self.state.step + 1, self.cfg, self._checkpoint_root())

    def _check_weights_finite(self) -> None:
        """Before a checkpoint or the final adapter is written (the whole adapter in place, also under FSDP)."""
        check_weights_finite(dict(self.peft_model.trainable_tensors("default")), self.state.step, self.cfg,
                             self._checkpoint_root())

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        os.makedirs(cfg.output_dir, exist_ok=True)
        # metrics.jsonl, and the same records to train.report_to's trackers (TensorBoard included: trackers.py)
        logger = RunTrackers(self.run, MetricsLogger(cfg.output_dir, False), self.log) if main else None
        before = self.evaluate() if self.state.step == 0 else None
        if before and logger:
            logger.write({"step": 0, "split": "eval", **before})
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not (cfg.progress and main),
                   desc="train", unit="step", dynamic_ncols=True)
        window_loss, window_units, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        train_start, train_tokens = time.perf_counter(), 0
        stopped_early = False
        while self.state.step < self.total_steps:
            loss_sum, units, tokens = self._step()
            window_loss, window_units, window_tokens = window_loss + loss_sum, window_units + units, window_tokens + tokens
            train_tokens += tokens
            step = self.state.step
            if step % cfg.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "split": "train", "loss": window_loss / max(window_units, 1),
                          "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                self.state.history.append(record)
                if logger:
                    logger.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_units, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                metrics = self.evaluate()
                if logger:
                    logger.write({"step": step, "split": "eval", **metrics})
                if metrics["loss"] < self.state.best_eval_loss:
                    self.state.best_eval_loss, self.state.bad_evals = metrics["loss"], 0
                else:
                    self.state.bad_evals += 1
                if cfg.early_stopping_patience and self.state.bad_evals >= cfg.early_stopping_patience:
                    self.log(f"early stopping at step {step}: eval loss has not improved for {self.state.bad_evals} evaluations")
                    stopped_early = True
            if cfg.save_every and step % cfg.save_every == 0:
                self._save_checkpoint()
            if stopped_early:
                break
        bar.close()
        train_seconds = time.perf_counter() - train_start
        after = self.evaluate()
        result = {"before": before, "after": after, "steps": self.state.step, "train_seconds": train_seconds,
                  "tokens_per_s": train_tokens / max(train_seconds, 1e-9), "stopped_early": stopped_early,
                  "adapter_dir": os.path.join(cfg.output_dir, "adapter"), "data": self.data_report,
                  "method_notes": self.method_notes}
        result["trainable_params"], result["all_params"] = self.peft_model.get_nb_trainable_parameters()
        if logger:
            logger.write({"step": self.state.step, "split": "eval", **after})
            logger.close()
        with self.sharding.full_adapter_tensors(self.peft_model):  # FSDP: one whole adapter, not shards
            self._check_weights_finite()
            if main:  # adapter files and chat template (data/templates.py) replace the old folder as one
                with atomic_folder(result["adapter_dir"]) as staging:
                    self.peft_model.save_pretrained(staging)
                    save_adapter_template(staging, self.run.data.chat_template)
        if main:
            write_model_card(result["adapter_dir"], self.run, result)
            saved = self.run.to_dict()
            if self.label_names and saved["data"].get("labels") is None:
                # The label set found in the data, in class-id order: the run folder alone then says which head
                # output is which label (TextClassifier.from_run reads it; the adapter files do not hold names).
                saved["data"]["labels"] = list(self.label_names)
            atomic_write_text(os.path.join(cfg.output_dir, "run_config.yaml"), yaml.safe_dump(saved, sort_keys=False))
        acc.wait_for_everyone()
        return result


# What a run leaves in its output folder: a folder holding any of these holds (part of) an earlier run. wandb/ and
# mlruns/: train.report_to's offline W&B run and local MLflow store (trackers.py).
RUN_OUTPUTS = ("metrics.jsonl", "run_config.yaml", "checkpoints", "adapter", "tb", "wandb", "mlruns")


def train(run: RunConfig, resume: bool = False, log=print, overwrite: bool = False) -> dict:
    """Run `run` into train.output_dir, holding the folder's lock (io/lock.py) for the whole run: a second run into
    the same folder fails at once. A folder with an earlier run's outputs is refused unless `resume` (continue it) or
    `overwrite` (delete those outputs first): a new run never mixes its files or metrics with another's."""
    out = run.train.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"train.output_dir {out!r} is a file, not a folder; choose a folder path.")
    if os.environ.get("RANK", "0") != "0":  # the other processes of a distributed run: rank 0 holds the lock
        return _train(run, resume, log)
    with folder_lock(out, "train.output_dir", log):
        found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out, name))]
        if found and overwrite:
            log(f"--overwrite: deleting the earlier run's {', '.join(found)} in {out}")
            for name in found:
                path = os.path.join(out, name)
                if os.path.isdir(path):
                    remove_folder(path)
                else:
                    os.remove(path)
        elif found and not resume:
            raise ConfigError(
                f"train.output_dir {out!r} already holds a run ({', '.join(found)}). Pass --overwrite to replace it, "
                "--resume to continue it from its last checkpoint, or choose another train.output_dir.")
        return _train(run, resume, log)


def _train(run: RunConfig, resume: bool, log) -> dict:
    if run.task == "ppo":  # rollouts + PPO updates: its own loop (ppo/); looked up on the package at call time
        return ppo.train_ppo(run, resume=resume, log=log)
    method = method_for_config(run.method)
    if method.run is not None:  # not trained by gradient steps (features, icl): the method does the whole run,
        if resume:             # through the context train hands it (method_run.py)
            log(f"{run.method_name} keeps no checkpoints (no training steps); running it again (cached embeddings "
                "are reused)")
        return method.run(MethodRun(run, log))
    trainer = Trainer(run, log=log)
    if resume:
        trainer.resume()
    return trainer.fit()


# Re-exported: the helpers that lived here before optim.py / guards.py / model_card.py held them.
__all__ = ["RUN_OUTPUTS", "RunState", "Trainer", "TrainingDivergedError", "format_before_after", "lr_lambda",
           "new_accelerator", "param_groups_with_decay", "resolve_precision", "train"]
