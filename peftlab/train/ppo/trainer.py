"""PPOTrainer: rollouts, PPO updates, evaluation, checkpoints and the saved policy (the package docstring has the
algorithm; ppo_math.py the formulas)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from ...core.config import ConfigError, TaskType
from ...core.method import _no_prepare
from ...core.model import PeftModel, get_peft_model
from ...data.templates import install_chat_template, save_adapter_template
from ...io.atomic import atomic_folder, atomic_write_text
from ..checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..guards import check_weights_finite, diverged_error, non_finite_step
from ..metrics_log import MetricsLogger
from ..model_card import write_model_card
from ..model_loading import load_tokenizer_and_model
from ..trackers import RunTrackers
from ..optim import adamw_with_schedule, new_accelerator, param_groups_with_decay
from ..ppo_math import (entropy_from_logits, gae, kl_penalty_rewards, logprobs_from_logits, masked_mean, policy_loss,
                        response_mask, value_loss, whiten)
from .prompts import encode_prompt, load_prompts, pad_rows
from .reward import POLICY, RewardFn, adapter_scores, load_reward_adapter, resolve_reward_folder, reward_encoding

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOState:
    """Everything beyond the weights that a resumed run needs to continue identically."""

    step: int = 0
    """Completed PPO iterations."""
    optimizer_steps: int = 0
    generated_tokens: int = 0
    history: list = field(default_factory=list)


class _PolicyOnly:
    """What checkpoint.save_checkpoint saves: only the policy adapter (as <folder>/policy), not the reward one."""

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft_model = peft_model

    def save_pretrained(self, folder: str) -> None:
        self.peft_model.save_pretrained(folder, selected_adapters=[POLICY])


def load_value_head(adapter_dir: str) -> nn.Linear:
    """The value head a ppo run saved beside its policy adapter."""
    tensors = load_file(os.path.join(adapter_dir, VALUE_HEAD_FILE))
    head = nn.Linear(tensors["weight"].shape[1], 1)
    head.load_state_dict(tensors)
    return head


# ---- the trainer ------------------------------------------------------------------------------------------------

class PPOTrainer:
    """One `task: ppo` run: `fit()` runs it, `resume()` first continues from the last checkpoint."""

    def __init__(self, run, reward_fn: RewardFn | None = None, log=print) -> None:
        self.run, self.cfg, self.ppo, self.log = run, run.train, run.ppo, log
        self._check_config(reward_fn)
        self.reward_fn = reward_fn
        self.accelerator = new_accelerator(self.cfg.precision)
        if self.accelerator.num_processes > 1:
            raise ConfigError("task ppo runs in one process (its rollouts are not sharded); launch it without "
                              "`accelerate launch --num_processes`.")
        self.device = self.accelerator.device
        set_seed(self.cfg.seed)
        self.train_prompts, self.eval_prompts, self.data_report = load_prompts(run)
        # The base in the run's dtype (model.dtype; the policy, the reference and the reward all run on it).
        self.tokenizer, base = load_tokenizer_and_model(run.model, "AutoModelForCausalLM", dtype=run.base_dtype,
                                                        method_config=run.method)
        # data.chat_template renders the prompts (as for sft) and is saved with the policy adapter (data/templates.py)
        self.chat_template = run.data.chat_template if run.data is not None else None
        install_chat_template(self.tokenizer, self.chat_template)
        self._encode_prompts()
        self.peft_model = self._policy(base)
        self.reward_head = None
        if self.ppo.reward_adapter is not None:
            self.reward_head = load_reward_adapter(self.peft_model, self.ppo.reward_adapter,
                                                   self.ppo.check_reward_base)
            # Room for any rollout: the reward model must see the whole response it scores.
            longest = self.ppo.max_prompt_length + self.ppo.max_new_tokens + 64
            self.reward_data = reward_encoding(resolve_reward_folder(self.ppo.reward_adapter), longest)
        # Zero init: every value starts at 0, so the first advantages are the returns themselves (no random
        # baseline), and the head learns from the value loss alone.
        self.value_head = nn.Linear(base.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.peft_model.to(self.device).eval()
        self.value_head.to(self.device)
        if self.reward_head is not None:
            self.reward_head.to(self.device)
        # The reference is the base itself: a method that writes into frozen base weights (Delta-LoRA, through
        # `.data`, which no version counter sees) would move it. A fingerprint per tensor (fp64 sum and norm, ~0.1 s
        # for SmolLM2) is compared after every iteration.
        self._frozen = {n: p for n, p in self.peft_model.named_parameters() if not p.requires_grad}
        self._frozen_print = self._fingerprint()
        self._build_optimizer()
        self.state = PPOState()

    def _check_config(self, reward_fn: RewardFn | None) -> None:
        """Refuse what PPO cannot run, before anything is loaded."""
        if self.run.task != "ppo" or self.ppo is None:
            raise ConfigError(f"PPOTrainer needs a run with task: ppo and a ppo: section; got task {self.run.task!r}.")
        self._check_train_options()
        if (reward_fn is None) == (self.ppo.reward_adapter is None):
            raise ConfigError(
                "task ppo needs exactly one reward: set ppo.reward_adapter to the adapter folder of a `task: reward` "
                "run (e.g. out/reward_movie_reviews/adapter), or pass reward_fn=... in the Python API"
                + (" (both were given)." if reward_fn is not None else "."))

    def _encode_prompts(self) -> None:
        """The prompts' token ids (train_ids, eval_ids), formatted as sft formats a prompt row; the EOS that ends a
        response."""
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"The tokenizer of {self.run.model!r} has no eos_token, which ends a response. Set one.")
        self.eos_ids = [eos]
        template = self.run.data.prompt_template if self.run.data is not None else None
        encode = lambda text: encode_prompt(self.tokenizer, text, template, self.ppo.max_prompt_length)  # noqa: E731
        self.train_ids = [encode(p) for p in self.train_prompts]
        self.eval_ids = [encode(p) for p in self.eval_prompts]

    def _policy(self, base) -> PeftModel:
        """The run's method on `base` as adapter "policy" (a causal LM that leaves the shared base alone)."""
        run = self.run
        method_config = run.method
        if method_config.task_type is None:
            method_config = dataclasses.replace(method_config, task_type=TaskType.CAUSAL_LM)
        if method_config.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"method.task_type={method_config.task_type.value!r}: the ppo policy is a causal LM; "
                              "leave task_type unset (or CAUSAL_LM).")
        if getattr(method_config, "bias", "none") != "none":
            raise ConfigError(f"method.bias={method_config.bias!r} trains the base model's biases, which the reference "
                              "(the base with adapters disabled) shares, so the reference would drift. Use bias: none.")
        peft_model = get_peft_model(base, method_config, adapter_name=POLICY)
        if peft_model.method_of(POLICY).prepare is not _no_prepare:
            raise ConfigError(f"method {run.method_name} runs a preparation phase on training batches "
                              "(Method.prepare), which task ppo has no batches for; pick another method.")
        return peft_model

    def _build_optimizer(self) -> None:
        """AdamW over the adapter and the value head, the run's schedule stretched over every minibatch update."""
        cfg, ppo = self.cfg, self.ppo
        self.updates_per_iteration = ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.minibatch_size)
        self.total_iterations = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_ids)
                                                                  / ppo.rollout_batch_size))
        groups = param_groups_with_decay(self.peft_model, cfg.lr, cfg.weight_decay)
        groups += [{"params": [self.value_head.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                   {"params": [self.value_head.bias], "lr": cfg.lr, "weight_decay": 0.0}]
        optimizer, self.scheduler = adamw_with_schedule(groups, cfg, self.total_iterations * self.updates_per_iteration)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)

    def _check_train_options(self) -> None:
        cfg = self.cfg
        unsupported = {"grad_accum": (cfg.grad_accum, 1, "ppo.minibatch_size sets the rollouts per optimizer step"),
                       "gradient_checkpointing": (cfg.gradient_checkpointing, False, "not supported with generation"),
                       "early_stopping_patience": (cfg.early_stopping_patience, None, "ppo has no eval loss")}
        for name, (value, default, why) in unsupported.items():
            if value != default:
                raise ConfigError(f"train.{name}={value!r} does not apply to task ppo ({why}); remove it.")

    # ---- model passes -------------------------------------------------------------------------------------------

    def _forward(self, seqs, attn, prompt_len: int, with_values: bool):
        """Logits (B, R, V) at the positions that predict the R response tokens, and the values there (B, R)."""
        R = seqs.shape[1] - prompt_len
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        with self.accelerator.autocast():
            out = self.peft_model(input_ids=seqs, attention_mask=attn, position_ids=positions, use_cache=False,
                                  output_hidden_states=with_values, logits_to_keep=R + 1)
        logits = out.logits[:, :-1].float() / self.ppo.temperature
        if not with_values:
            return logits, None
        hidden = out.hidden_states[-1][:, prompt_len - 1: prompt_len - 1 + R]  # (B, R, H), the last layer's output
        return logits, self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def reference_logprobs(self, seqs, attn, prompt_len: int) -> torch.Tensor:
        """log pi_ref of the response tokens (B, R): the base model with every adapter disabled."""
        with self.peft_model.disable_adapter():
            logits, _ = self._forward(seqs, attn, prompt_len, with_values=False)
        return logprobs_from_logits(logits, seqs[:, prompt_len:])

    @torch.no_grad()
    def score(self, prompts: list[str], response_ids: list[list[int]]) -> torch.Tensor:
        """The reward of each rollout (B,): reward_fn, or the reward adapter's score of prompt + response encoded
        as the reward run encoded its pairs (an sft prompt/response row), read at the last attended token."""
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        if self.reward_fn is not None:
            values = self.reward_fn(list(prompts), texts, [list(r) for r in response_ids])
            scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
            if scores.shape != (len(prompts),):
                raise ValueError(f"reward_fn returned {scores.numel()} values for {len(prompts)} rollouts; return "
                                 "one float per rollout.")
            return scores
        return adapter_scores(self.peft_model, self.reward_head, self.tokenizer, self.reward_data, list(prompts),
                              texts, self.accelerator.autocast)

    @torch.no_grad()
    def rollout(self, prompts: list[str], prompt_ids: list[list[int]], greedy: bool = False) -> dict:
        """Generate one response per prompt with the policy and compute everything PPO needs about it."""
        ids, attn = pad_rows(prompt_ids, self.pad_id, left=True)
        ids, attn = ids.to(self.device), attn.to(self.device)
        sampling = ({"do_sample": False} if greedy else
                    {"do_sample": True, "temperature": self.ppo.temperature, "top_k": self.ppo.top_k,
                     "top_p": self.ppo.top_p})
        with self.accelerator.autocast():
            # remove_invalid_values: a policy whose last update overflowed gives NaN logits, and sampling would
            # fail inside generate; it samples on, and _iteration's guard then names the divergence.
            seqs = self.peft_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=self.ppo.max_new_tokens,
                                            pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                            remove_invalid_values=True, **sampling)
        P = ids.shape[1]
        mask = response_mask(seqs[:, P:], self.eos_ids)  # (B, R)
        full_attn = torch.cat([attn, mask.long()], dim=1)
        logits, values = self._forward(seqs, full_attn, P, with_values=True)
        logp = logprobs_from_logits(logits, seqs[:, P:])
        response_ids = []  # each row's tokens before its EOS
        for row, n in zip(seqs[:, P:].tolist(), mask.sum(1).long().tolist()):
            response_ids.append(row[:n - 1] if row[n - 1] in self.eos_ids else row[:n])
        return {"seqs": seqs, "attn": full_attn, "prompt_len": P, "mask": mask, "logp": logp,
                "values": values.float(), "ref_logp": self.reference_logprobs(seqs, full_attn, P),
                "scores": self.score(prompts, response_ids).float()}

    # ---- one iteration ----------------------------------------------------------------------------------------

    def _prompt_rows(self, iteration: int) -> list[int]:
        """Prompt indices of an iteration: positions i*B .. (i+1)*B - 1 of the per-epoch seeded shuffles."""
        n, B = len(self.train_ids), self.ppo.rollout_batch_size
        perms: dict[int, torch.Tensor] = {}
        rows = []
        for position in range(iteration * B, (iteration + 1) * B):
            epoch, pos = divmod(position, n)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            rows.append(int(perms[epoch][pos]))
        return rows

    def _iteration(self) -> dict[str, float]:
        ppo, it, began = self.ppo, self.state.step, time.perf_counter()
        rows = self._prompt_rows(it)
        roll = self.rollout([self.train_prompts[i] for i in rows], [self.train_ids[i] for i in rows])
        mask, P = roll["mask"], roll["prompt_len"]
        bad = [name for name in ("logp", "values", "scores") if not bool(torch.isfinite(roll[name]).all())]
        if bad:  # the previous update overflowed the policy (or the reward is NaN): stop before training on it
            raise diverged_error(f"the rollouts' {', '.join(bad)} hold NaN/inf values", it + 1, self.cfg,
                                 self._checkpoint_root())
        rewards, kl = kl_penalty_rewards(roll["scores"], roll["logp"], roll["ref_logp"], mask, ppo.kl_coef)
        advantages, returns = gae(rewards, roll["values"], mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "value_clip_frac": 0.0, "entropy": 0.0,
                "approx_kl": 0.0}
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + it)
        B, mb = ppo.rollout_batch_size, ppo.minibatch_size
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(B, generator=g)
            for start in range(0, B, mb):
                idx = order[start:start + mb].to(self.device)
                logits, values = self._forward(roll["seqs"][idx], roll["attn"][idx], P, with_values=True)
                m = mask[idx]
                logp = logprobs_from_logits(logits, roll["seqs"][idx, P:])
                pl, pstats = policy_loss(logp, roll["logp"][idx], advantages[idx], m, ppo.clip_range)
                vl, vstats = value_loss(values, roll["values"][idx], returns[idx], m, ppo.value_clip)
                loss = pl + ppo.vf_coef * vl
                extra = self.peft_model.extra_loss()
                if extra is not None:
                    loss = loss + extra
                self.accelerator.backward(loss)
                grad_norm = None
                if self.cfg.max_grad_norm is not None:
                    grad_norm = self.accelerator.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
                what = non_finite_step(loss, grad_norm, trainable, self.accelerator)
                if what is not None:  # before the update: the weights stay those of the last good one
                    raise diverged_error(f"{what} (update {self.state.optimizer_steps + 1})", it + 1, self.cfg,
                                         self._checkpoint_root())
                self.optimizer.step()
                self.scheduler.step()
                self.state.optimizer_steps += 1
                self.peft_model.on_step(self.state.optimizer_steps)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    sums["entropy"] += float(masked_mean(entropy_from_logits(logits), m))
                for name, value in (("policy_loss", pl), ("value_loss", vl), *pstats.items(), *vstats.items()):
                    sums[name] += float(value.detach())
        self._check_reference_fixed()
        self.state.step += 1
        lengths = mask.sum(1)
        self.state.generated_tokens += int(lengths.sum())
        kl_per_rollout = kl.sum(1)
        out = {k: v / self.updates_per_iteration for k, v in sums.items()}
        out.update(reward=float(roll["scores"].mean()), kl=float(kl_per_rollout.mean()),
                   objective=float((roll["scores"] - ppo.kl_coef * kl_per_rollout).mean()),
                   response_length=float(lengths.float().mean()), lr=self.scheduler.get_last_lr()[0],
                   seconds=time.perf_counter() - began)
        return out

    @torch.no_grad()
    def _fingerprint(self) -> dict[str, tuple[float, float]]:
        return {n: (float(p.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(p, dtype=torch.float64)))
                for n, p in self._frozen.items()}

    def _check_reference_fixed(self) -> None:
        now = self._fingerprint()
        moved = [n for n in now if now[n] != self._frozen_print[n]]
        if moved:
            raise ConfigError(f"method {self.run.method_name} changed frozen base weights during training "
                              f"({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}); the ppo reference is the "
                              "base with adapters disabled, so it would drift. Use a method that leaves the base as "
                              "it is (e.g. lora).")

    # ---- evaluation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward (the score, no KL term), mean KL to the reference per rollout and mean response length on
        the eval prompts; sampled with a fixed seed (or greedy) inside a forked RNG."""
        scores, kls, lengths = [], [], []
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []  # sampling on a GPU uses its RNG
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.cfg.seed + 12345)
            B = self.ppo.rollout_batch_size
            for start in range(0, len(self.eval_ids), B):
                roll = self.rollout(self.eval_prompts[start:start + B], self.eval_ids[start:start + B],
                                    greedy=self.ppo.eval_greedy)
                scores.append(roll["scores"])
                kls.append(((roll["logp"] - roll["ref_logp"]) * roll["mask"]).sum(1))
                lengths.append(roll["mask"].sum(1))
        return {"reward": float(torch.cat(scores).mean()), "kl": float(torch.cat(kls).mean()),
                "response_length": float(torch.cat(lengths).float().mean())}

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _checkpoint_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def _check_weights_finite(self) -> None:
        tensors = {**self.peft_model.trainable_tensors(POLICY),
                   **{f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}}
        check_weights_finite(tensors, self.state.step, self.cfg, self._checkpoint_root())

    def _save_checkpoint(self) -> None:
        self._check_weights_finite()
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "value_head": {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()},
                 "rng": rng_state(), "run_state": dataclasses.asdict(self.state)}
        save_checkpoint(self._checkpoint_root(), self.state.step, _PolicyOnly(self.peft_model), state,
                        self.cfg.keep_checkpoints, self.chat_template)

    def resume(self) -> None:
        found = list_checkpoints(self._checkpoint_root())
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {self._checkpoint_root()}; "
                              "train.save_every must be > 0 in the run being resumed.")
        state = load_checkpoint(found[-1], self.peft_model, adapter_name=POLICY)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.value_head.load_state_dict(state["value_head"])
        set_rng_state(state["rng"])
        self.state = PPOState(**state["run_state"])
        self.log(f"resumed from {found[-1]} at iteration {self.state.step}")

    # ---- the run -------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        # metrics.jsonl, and the same records to train.report_to's trackers (TensorBoard included: trackers.py)
        logger = RunTrackers(self.run, MetricsLogger(cfg.output_dir, False), self.log)
        before = self.evaluate() if self.state.step == 0 else None
        if before:
            logger.write({"step": 0, "split": "eval", **before})
        bar = tqdm(total=self.total_iterations, initial=self.state.step, disable=not cfg.progress, desc="ppo",
                   unit="it", dynamic_ncols=True)
        window: list[dict[str, float]] = []
        start, tokens_at_start = time.perf_counter(), self.state.generated_tokens
        while self.state.step < self.total_iterations:
            window.append(self._iteration())
            step = self.state.step
            if step % cfg.log_every == 0 or step == self.total_iterations:
                record = {"step": step, "split": "train",
                          **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
                self.state.history.append(record)
                logger.write(record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                                pl=f"{record['policy_loss']:.3f}", vl=f"{record['value_loss']:.3f}")
                window = []
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_iterations:
                logger.write({"step": step, "split": "eval", **self.evaluate()})
            if cfg.save_every and step % cfg.save_every == 0:
                self._save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        after = self.evaluate()
        logger.write({"step": self.state.step, "split": "eval", **after})
        logger.close()
        adapter_dir = os.path.join(cfg.output_dir, "adapter")
        self._check_weights_finite()
        result = {"before": before, "after": after, "steps": self.state.step, "train_seconds": seconds,
                  "tokens_per_s": (self.state.generated_tokens - tokens_at_start) / max(seconds, 1e-9),
                  "optimizer_steps": self.state.optimizer_steps, "adapter_dir": adapter_dir,
                  "data": self.data_report, "history": list(self.state.history)}
        self.save(adapter_dir, result)
        return result

    def save(self, adapter_dir: str, result: dict) -> None:
        """The policy adapter in PEFT layout at `adapter_dir`, its value head beside it, a model card, the config."""
        # One folder swap (io/atomic.py): a kill leaves the old policy + value head or the new pair, never a mix.
        with atomic_folder(adapter_dir) as staging:
            self.peft_model.save_pretrained(staging, selected_adapters=[POLICY])  # writes staging/policy/
            folder = os.path.join(staging, POLICY)
            for name in os.listdir(folder):  # the policy's files at the top, where PEFT looks for them
                os.rename(os.path.join(folder, name), os.path.join(staging, name))
            os.rmdir(folder)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      os.path.join(staging, VALUE_HEAD_FILE), metadata={"format": "pt"})
            save_adapter_template(staging, self.chat_template)
        write_ppo_model_card(adapter_dir, self.run, result)
        atomic_write_text(os.path.join(self.cfg.output_dir, "run_config.yaml"),
                          yaml.safe_dump(self.run.to_dict(), sort_keys=False))



def write_ppo_model_card(adapter_dir: str, run, result: dict) -> str:
    """The policy's README.md (train/model_card.py's writer): how it was trained, the eval table, the options."""
    config = run.to_dict()
    reward = run.ppo.reward_adapter or "a reward function given in Python (reward_fn)"
    hyper = yaml.safe_dump({"method": config["method"], "ppo": config.get("ppo"), "train": config["train"]},
                           sort_keys=False)
    steps = f"{result['steps']} PPO iterations, {result.get('optimizer_steps', 0)} optimizer steps"
    sampling = "greedy" if run.ppo.eval_greedy else "sampled with a fixed seed"
    intro = ("Trained with peftlab's PPO on adapters: the policy is this adapter, the reference is the base model with "
             f"adapters\ndisabled, the reward came from `{reward}`.\n`{VALUE_HEAD_FILE}` beside it is the value head "
             "(Linear(hidden, 1) on the last hidden states), needed only to\ncontinue PPO. Load the policy with "
             "peftlab or Hugging Face PEFT:")
    return write_model_card(
        adapter_dir, run, result, title=f"{run.method_name} policy adapter for {run.model} (PPO)", tags=("rlhf",),
        intro=intro, data=False, results=f"Evaluation ({steps}, {result['train_seconds']:.0f} s)",
        results_intro="Mean reward-model score, KL to the reference per response and response length on the eval "
                      f"prompts\n({sampling}):",
        settings=("Hyper-parameters", "yaml", hyper), notes=[])


def train_ppo(run, resume: bool = False, log=print, reward_fn: RewardFn | None = None) -> dict:
    """Run `task: ppo` (what `peftlab train` calls for it). reward_fn replaces ppo.reward_adapter in Python."""
    trainer = PPOTrainer(run, reward_fn=reward_fn, log=log)
    if resume:
        trainer.resume()
    return trainer.fit()


__all__ = ["PPOState", "PPOTrainer", "VALUE_HEAD_FILE", "load_value_head", "train_ppo", "write_ppo_model_card"]
