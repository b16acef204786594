"""`task: ppo`: RLHF with PPO, where the policy, the reference and the reward model share one base model.

One causal LM is loaded once and carries:
    the policy     adapter "policy" (the run's `method:`), trained, plus a value head Linear(hidden, 1) on its last
                   hidden states (trained with it, saved beside the adapter as value_head.safetensors);
    the reference  the same model inside `disable_adapter()`: the base as it was, never a second copy;
    the reward     adapter "reward", loaded from a `task: reward` run onto the SAME causal-LM base (a
                   *ForSequenceClassification model keeps its backbone at the causal LM's module paths, so the
                   adapter's layer keys fit), plus its score head Linear(hidden, 1) read from the adapter file.
                   A rollout is scored as the reward model was trained: prompt text + decoded response re-encoded as
                   an sft prompt/response row (chat template or prompt_template, from the reward run's
                   run_config.yaml), right-padded, the head read at the last attended token. Scoring switches to
                   "reward" under no_grad and back to "policy". The Python API takes a reward_fn instead.

One PPO iteration (= one "step" of train.max_steps / save_every / eval_every / log_every):
    1. rollouts: rollout_batch_size prompts (left-padded), sampled from the policy with `generate`; each response
       ends at its first EOS (included) or after max_new_tokens;
    2. no_grad: policy log-probs and values, reference log-probs (adapters disabled), the reward score;
    3. per-token rewards -kl_coef * (logp - ref_logp), plus the score on the last token; GAE advantages and
       returns; advantages whitened (ppo_math.py has the formulas);
    4. ppo_epochs passes over the rollouts in shuffled minibatches: loss = clipped policy loss + vf_coef * clipped
       value loss (+ the method's extra loss); AdamW over the adapter and value head, the run's lr, clipping and
       schedule (stretched over every minibatch step of the run).
Log-probabilities use logits / temperature, the distribution the sampler draws from (top_k / top_p truncation, off
by default, is not modelled). Dropout stays off throughout (the model is kept in eval mode): PPO's ratio must be
exactly 1 on the first minibatch, and dropout would make it noise.

Prompts, order and resume: iteration i takes positions i*B .. (i+1)*B - 1 of a stream of seeded per-epoch shuffles
of the training prompts, and its minibatch order comes from a generator seeded by (seed, i). So the position in
the run is the iteration number alone; a checkpoint adds the adapter, value head, optimizer, schedule and RNG
states (sampling uses the global RNG), and `--resume` ends at the same adapter as an uninterrupted run.
Evaluation samples (or decodes greedily) with a fixed seed inside a forked RNG, so it never shifts training.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import ConfigError, TaskType
from ..core.method import _no_prepare
from ..core.model import PeftModel, get_peft_model, read_config
from ..data import DataConfig, DataError
from ..io import adapter_files
from ..io.atomic import atomic_folder, atomic_write_text
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .loop import check_weights_finite, diverged_error, non_finite_step
from .model_loading import load_tokenizer_and_model
from .ppo_config import PPOConfig
from .ppo_math import (entropy_from_logits, gae, kl_penalty_rewards, logprobs_from_logits, masked_mean, policy_loss,
                       response_mask, value_loss, whiten)
from .preference import last_attended_index, scoring_batch
from .sources import resolve_shipped

POLICY, REWARD = "policy", "reward"
VALUE_HEAD_FILE = "value_head.safetensors"
# Names of a sequence-classification head in transformers models (LlamaForSequenceClassification and most decoders:
# `score`; BERT-likes: `classifier`). In an adapter file the head sits at base_model.model.<name>.weight.
HEAD_NAMES = ("score", "classifier")

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]
"""reward_fn(prompts, responses, response_ids) -> one float per rollout. responses are decoded without special
tokens; response_ids are the generated ids before the EOS (the EOS itself left out)."""


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


# ---- prompts ---------------------------------------------------------------------------------------------------

def load_prompts(run) -> tuple[list[str], list[str], dict]:
    """(train prompts, eval prompts, report) from ppo.prompts / ppo.eval_prompts or the data section's files."""
    ppo, data = run.ppo, run.data
    if ppo.prompts is not None:
        train = list(ppo.prompts)
        evals = list(ppo.eval_prompts) if ppo.eval_prompts is not None else list(train)
        return train, evals, {"prompts": {"train": len(train), "eval": len(evals), "source": "ppo.prompts"}}
    if data is None:
        raise ConfigError("task ppo needs prompts: list them in ppo.prompts, or give data.train_file with a "
                          "'prompt' column.")
    from ..data.load import expand_paths

    data = resolve_shipped(data)
    train = [p for path in expand_paths(data.train_file, "train_file") for p in _prompt_column(path, data)]
    if ppo.eval_prompts is not None:
        evals, eval_from = list(ppo.eval_prompts), "ppo.eval_prompts"
    elif data.eval_file is not None:
        evals = [p for path in expand_paths(data.eval_file, "eval_file") for p in _prompt_column(path, data)]
        eval_from = "eval_file"
    elif data.eval_fraction > 0 and len(train) > 1:
        k = max(1, round(len(train) * data.eval_fraction))
        held = set(random.Random(f"peftlab:eval-carve:{data.seed}").sample(range(len(train)), min(k, len(train) - 1)))
        evals = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
        eval_from = f"{data.eval_fraction:g} of the training prompts, chosen by seed {data.seed}"
    else:
        evals, eval_from = list(train), "the training prompts"
    if data.max_train_rows is not None:
        train = _seeded_subset(train, data.max_train_rows, data.seed, "max-train-rows")
    if data.max_eval_rows is not None:
        evals = _seeded_subset(evals, data.max_eval_rows, data.seed, "max-eval-rows")
    return train, evals, {"prompts": {"train": len(train), "eval": len(evals), "eval_from": eval_from,
                                      "source": data.train_file}}


def _prompt_column(path: str, data) -> list[str]:
    from ..data.load import read_rows

    rows, columns = read_rows(path)
    column = data.columns.get("prompt", "prompt")
    if column not in columns:
        raise DataError(f"{path}: task ppo reads prompts from column {column!r}, which the file does not have "
                        f"(columns: {', '.join(map(repr, columns)) or 'none'}). Map yours with "
                        f"`data: {{columns: {{prompt: <your column>}}}}`, or list prompts in ppo.prompts.")
    out = []
    for number, row in enumerate(rows, 1):
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            out.append(value)
        elif not data.skip_bad_rows:
            raise DataError(f"{path}, row {number}, column {column!r}: a prompt must be a non-empty string; seen "
                            f"{value!r}. Fix the row, or set `skip_bad_rows: true` to skip such rows.")
    if not out:
        raise DataError(f"{path}: no usable prompt in column {column!r} ({len(rows)} rows read).")
    return out


def _seeded_subset(items: list, keep: int, seed: int, purpose: str) -> list:
    if len(items) <= keep:
        return items
    chosen = sorted(random.Random(f"peftlab:{purpose}:{seed}").sample(range(len(items)), keep))
    return [items[i] for i in chosen]


def encode_prompt(tokenizer, text: str, template: str | None, max_length: int) -> list[int]:
    """Token ids of one prompt, formatted as the sft task formats a prompt row (see the `prompts` field)."""
    if template is None and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    else:
        from ..data.encode import PLAIN_PROMPT, _special_edges

        try:
            formatted = (template or PLAIN_PROMPT).format(prompt=text)
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"prompt_template {template!r} cannot be filled for a prompt ({type(err).__name__}: "
                            f"{err}); use {{prompt}} and write literal braces as {{{{ and }}}}.") from None
        ids = _special_edges(tokenizer)[0] + list(tokenizer(formatted, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"The prompt {text!r} encodes to no tokens; give a non-empty prompt.")
    return ids[-max_length:]


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, width): left padding (rows right-aligned) as generation needs, or right
    padding as the reward model was trained on."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def reward_encoding(folder: str, fallback_max_length: int) -> DataConfig:
    """How the reward run encoded prompt + response: the prompt_template and max_length of its run_config.yaml
    (beside its adapter folder, or in it); without one, the chat template / plain prompt and a length that never
    cuts a rollout."""
    values = {}
    for path in (os.path.join(os.path.dirname(os.path.abspath(folder)), "run_config.yaml"),
                 os.path.join(folder, "run_config.yaml")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                data = (yaml.safe_load(fh) or {}).get("data") or {}
            values = {k: data[k] for k in ("prompt_template", "max_length") if data.get(k) is not None}
            break
    values.setdefault("max_length", fallback_max_length)
    return DataConfig(train_file="<ppo rollouts>", **values)


# ---- reward adapter ------------------------------------------------------------------------------------------

def resolve_reward_folder(path: str) -> str:
    """The folder holding the reward adapter's files: `path`, or `path`/adapter (a run's output_dir)."""
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):
        raise ConfigError(f"ppo.reward_adapter={path!r}: no such folder (absolute: {os.path.abspath(expanded)}). "
                          f"Train the reward model first (`peftlab train configs/reward_movie_reviews.yaml` writes "
                          f"its adapter to that run's output_dir/adapter) and point reward_adapter at it.")
    if not os.path.isfile(os.path.join(expanded, "adapter_config.json")) and \
            os.path.isfile(os.path.join(expanded, "adapter", "adapter_config.json")):
        return os.path.join(expanded, "adapter")
    return expanded


def _same_model(a: str | None, b: str | None) -> bool:
    def norm(name):
        path = os.path.expanduser(name)
        return os.path.realpath(path) if os.path.exists(path) else name.rstrip("/")
    return a is None or b is None or norm(a) == norm(b)


def load_reward_adapter(peft_model: PeftModel, path: str, check_base: bool = True) -> nn.Linear:
    """Load a `task: reward` adapter onto `peft_model` (a causal LM) as adapter "reward" and return its score head
    as a frozen Linear(hidden, 1). Everything is checked before the model changes; the policy stays active."""
    folder = resolve_reward_folder(path)
    where = f"ppo.reward_adapter ({folder})"
    try:
        config = read_config(folder)
        weights = adapter_files.read_weights(folder)
    except (adapter_files.AdapterFileError, ConfigError) as err:
        raise ConfigError(f"{where}: {err}") from None
    heads = [h for h in HEAD_NAMES if f"{adapter_files.KEY_PREFIX}{h}.weight" in weights]
    if not heads:
        names = ", ".join(f"{h}.weight" for h in HEAD_NAMES)
        raise ConfigError(f"{where} holds no sequence-classification head ({names}"
                          f"), so it is not a reward model's adapter (task_type {config.task_type}). Train one with "
                          f"`task: reward`, whose score head is saved with the adapter.")
    key = f"{adapter_files.KEY_PREFIX}{heads[0]}"
    head_w, head_b = weights.pop(f"{key}.weight"), weights.pop(f"{key}.bias", None)
    base = peft_model.get_base_model()
    hidden = base.config.get_text_config().hidden_size
    if head_w.shape != (1, hidden):
        raise ConfigError(f"{where}: its head {heads[0]}.weight has shape {tuple(head_w.shape)}; a reward model's head "
                          f"is (1, {hidden}) for this base (num_labels=1, hidden size {hidden}). A head with more "
                          f"rows is a classifier, and another hidden size means another base model.")
    ours = getattr(base.config, "_name_or_path", None)
    if check_base and not _same_model(config.base_model_name_or_path, ours):
        raise ConfigError(f"{where} was trained on base model {config.base_model_name_or_path!r}, but this run's base "
                          f"is {ours!r}; a reward adapter only means something on the weights it was trained on. "
                          f"Train the reward model with the same `model:`, or set ppo.check_reward_base: false if "
                          f"both names hold the same weights.")
    if getattr(config, "bias", "none") != "none":
        raise ConfigError(f"{where} trains the base model's biases (bias={config.bias!r}); loading it would change "
                          "the base that the policy and the reference share. Use a reward adapter with bias: none.")
    keep = [m for m in (config.modules_to_save or []) if m not in HEAD_NAMES] or None
    config = dataclasses.replace(config, modules_to_save=keep, task_type=TaskType.CAUSAL_LM, inference_mode=True)
    try:
        peft_model.add_adapter(REWARD, config)
    except ConfigError as err:
        raise ConfigError(f"{where} cannot sit beside the policy adapter on one model: {err} Use the same method "
                          f"for the policy as the reward adapter ({peft_model.method_of(POLICY).name} vs "
                          f"{type(config).__name__}), or target other modules.") from None
    try:
        own = peft_model.adapter_tensors(REWARD)
        extra = sorted(set(weights) - set(own))
        if extra:
            raise ConfigError(f"{where} carries tensors beyond its adapter ({', '.join(extra[:4])}"
                              f"{', ...' if len(extra) > 4 else ''}), e.g. embedding or base weights; loading them "
                              "would overwrite the base that the policy and the reference share.")
        try:
            peft_model._load_tensors(REWARD, weights, folder)
        except adapter_files.AdapterFileError as err:
            raise ConfigError(f"ppo.reward_adapter: {err}") from None
    except BaseException:
        peft_model.delete_adapter(REWARD)
        raise
    peft_model.set_adapter(POLICY)
    head = nn.Linear(hidden, 1, bias=head_b is not None)
    with torch.no_grad():
        head.weight.copy_(head_w.float())
        if head_b is not None:
            head.bias.copy_(head_b.float())
    return head.requires_grad_(False)


def load_value_head(adapter_dir: str) -> nn.Linear:
    """The value head a ppo run saved beside its policy adapter."""
    tensors = load_file(os.path.join(adapter_dir, VALUE_HEAD_FILE))
    head = nn.Linear(tensors["weight"].shape[1], 1)
    head.load_state_dict(tensors)
    return head


# ---- the trainer ------------------------------------------------------------------------------------------------

class PPOTrainer:
    def __init__(self, run, reward_fn: RewardFn | None = None, log=print) -> None:
        from .loop import lr_lambda, new_accelerator, param_groups_with_decay

        self.run, self.cfg, self.ppo, self.log = run, run.train, run.ppo, log
        if run.task != "ppo" or run.ppo is None:
            raise ConfigError(f"PPOTrainer needs a run with task: ppo and a ppo: section; got task {run.task!r}.")
        self._check_train_options()
        if (reward_fn is None) == (self.ppo.reward_adapter is None):
            raise ConfigError(
                "task ppo needs exactly one reward: set ppo.reward_adapter to the adapter folder of a `task: reward` "
                "run (e.g. out/reward_movie_reviews/adapter), or pass reward_fn=... in the Python API"
                + (" (both were given)." if reward_fn is not None else "."))
        self.reward_fn = reward_fn
        self.accelerator = new_accelerator(self.cfg.precision)
        if self.accelerator.num_processes > 1:
            raise ConfigError("task ppo runs in one process (its rollouts are not sharded); launch it without "
                              "`accelerate launch --num_processes`.")
        self.device = self.accelerator.device
        set_seed(self.cfg.seed)
        self.train_prompts, self.eval_prompts, self.data_report = load_prompts(run)
        self.tokenizer, base = load_tokenizer_and_model(run.model, "AutoModelForCausalLM", dtype=run.base_dtype,
                                                              method_config=run.method)
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"The tokenizer of {run.model!r} has no eos_token, which ends a response. Set one.")
        self.eos_ids = [eos]
        template = run.data.prompt_template if run.data is not None else None
        encode = lambda text: encode_prompt(self.tokenizer, text, template, self.ppo.max_prompt_length)  # noqa: E731
        self.train_ids = [encode(p) for p in self.train_prompts]
        self.eval_ids = [encode(p) for p in self.eval_prompts]

        method_config = run.method
        if method_config.task_type is None:
            method_config = dataclasses.replace(method_config, task_type=TaskType.CAUSAL_LM)
        if method_config.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"method.task_type={method_config.task_type.value!r}: the ppo policy is a causal LM; "
                              "leave task_type unset (or CAUSAL_LM).")
        if getattr(method_config, "bias", "none") != "none":
            raise ConfigError(f"method.bias={method_config.bias!r} trains the base model's biases, which the reference "
                              "(the base with adapters disabled) shares, so the reference would drift. Use bias: none.")
        self.peft_model = get_peft_model(base, method_config, adapter_name=POLICY)
        if self.peft_model.method_of(POLICY).prepare is not _no_prepare:
            raise ConfigError(f"method {run.method_name} runs a preparation phase on training batches "
                              "(Method.prepare), which task ppo has no batches for; pick another method.")
        self.reward_head = None
        if self.ppo.reward_adapter is not None:
            self.reward_head = load_reward_adapter(self.peft_model, self.ppo.reward_adapter,
                                                   self.ppo.check_reward_base)
            # Room for any rollout: the reward model must see the whole response it scores.
            longest = self.ppo.max_prompt_length + self.ppo.max_new_tokens + 64
            self.reward_data = reward_encoding(resolve_reward_folder(self.ppo.reward_adapter), longest)
        hidden = base.config.get_text_config().hidden_size
        # Zero init: every value starts at 0, so the first advantages are the returns themselves (no random
        # baseline), and the head learns from the value loss alone.
        self.value_head = nn.Linear(hidden, 1)
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

        self.updates_per_iteration = self.ppo.ppo_epochs * (self.ppo.rollout_batch_size // self.ppo.minibatch_size)
        B = self.ppo.rollout_batch_size
        self.total_iterations = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * len(self.train_ids) / B))
        total_updates = self.total_iterations * self.updates_per_iteration
        groups = param_groups_with_decay(self.peft_model, self.cfg.lr, self.cfg.weight_decay)
        groups += [{"params": [self.value_head.weight], "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay},
                   {"params": [self.value_head.bias], "lr": self.cfg.lr, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups)
        warmup = self.cfg.warmup_steps or int(self.cfg.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg.scheduler, warmup,
                                                                                total_updates))
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.state = PPOState()

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
        encoded = scoring_batch(list(prompts), texts, self.tokenizer, self.reward_data)
        ids, attn = pad_rows([e["input_ids"] for e in encoded], self.pad_id, left=False)
        ids, attn = ids.to(self.device), attn.to(self.device)
        self.peft_model.set_adapter(REWARD)
        try:
            with self.accelerator.autocast():
                out = self.peft_model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True,
                                      logits_to_keep=1)
        finally:
            self.peft_model.set_adapter(POLICY)
        rows_index = torch.arange(ids.shape[0], device=ids.device)
        hidden = out.hidden_states[-1][rows_index, last_attended_index(attn)]  # (B, H)
        return self.reward_head(hidden.float()).squeeze(-1)

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
                        self.cfg.keep_checkpoints)

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

        from .loop import _MetricsLogger

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        logger = _MetricsLogger(cfg.output_dir, cfg.tensorboard)
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
        write_ppo_model_card(adapter_dir, self.run, result)
        atomic_write_text(os.path.join(self.cfg.output_dir, "run_config.yaml"),
                          yaml.safe_dump(self.run.to_dict(), sort_keys=False))


def write_ppo_model_card(adapter_dir: str, run, result: dict) -> str:
    config = run.to_dict()
    before, after = result.get("before") or {}, result["after"]
    rows = "\n".join(f"| {k} | {before[k]:.4f} | {v:.4f} |" if k in before else f"| {k} | - | {v:.4f} |"
                     for k, v in after.items())
    reward = run.ppo.reward_adapter or "a reward function given in Python (reward_fn)"
    hyper = yaml.safe_dump({"method": config["method"], "ppo": config.get("ppo"), "train": config["train"]},
                           sort_keys=False).strip()
    steps = f"{result['steps']} PPO iterations, {result.get('optimizer_steps', 0)} optimizer steps"
    text = f"""---
library_name: peftlab
base_model: {run.model}
tags: [peftlab, {run.method_name}, ppo, rlhf]
---

# {run.method_name} policy adapter for {run.model} (PPO)

Trained with peftlab's PPO on adapters: the policy is this adapter, the reference is the base model with adapters
disabled, the reward came from `{reward}`.
`{VALUE_HEAD_FILE}` beside it is the value head (Linear(hidden, 1) on the last hidden states), needed only to
continue PPO. Load the policy with peftlab or Hugging Face PEFT:

```python
from peftlab import PeftModel   # or: from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{adapter_dir}")
```

## Evaluation ({steps}, {result['train_seconds']:.0f} s)

Mean reward-model score, KL to the reference per response and response length on the eval prompts
({'greedy' if run.ppo.eval_greedy else 'sampled with a fixed seed'}):

| metric | before | after |
|---|---|---|
{rows}

## Hyper-parameters

```yaml
{hyper}
```
"""
    path = os.path.join(adapter_dir, "README.md")
    atomic_write_text(path, text)
    return path


def train_ppo(run, resume: bool = False, log=print, reward_fn: RewardFn | None = None) -> dict:
    """Run `task: ppo` (what `peftlab train` calls for it). reward_fn replaces ppo.reward_adapter in Python."""
    trainer = PPOTrainer(run, reward_fn=reward_fn, log=log)
    if resume:
        trainer.resume()
    return trainer.fit()


__all__ = ["PPOConfig", "PPOTrainer", "load_reward_adapter", "load_value_head", "train_ppo"]
