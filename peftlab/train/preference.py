"""Preference training on pairs (prompt x, chosen y_w, rejected y_l): a reward model, and DPO / IPO.

Reward model (task `reward`). r(x, y) is the output of a one-output scoring head (AutoModelForSequenceClassification
with num_labels=1; task_type SEQ_CLS puts the head in modules_to_save, so it is trained and saved with the adapter)
read at the last real token of prompt + response. Bradley-Terry pairwise loss, per pair:

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)

with m the row's `margin` (0 when the file has no margin column; a margin asks for a larger gap, as in Llama 2).

DPO (task `dpo`, Rafailov et al. 2023). The policy pi is base + adapter; the reference pi_ref is the same model with
its adapters disabled (no second copy). log pi(y|x) is the sum over the response's tokens (those with a label; the
prompt is -100) of the log-probability of each token given everything before it. With

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    sigmoid: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             (eps = label_smoothing: conservative DPO, Mitchell 2023, for pairs whose label is flipped with
             probability eps; eps = 0 is DPO)
    ipo:     loss = (h - 1 / (2 beta))^2
             (Azar et al. 2023, IPO with tau = beta; h from summed log-probs as in the paper. TRL divides each
             log-prob by the response's length first, so its numbers differ.)

The implicit rewards are beta (log pi(y|x) - log pi_ref(y|x)) for y_w and y_l.

Metrics of both tasks (means over pairs): loss; accuracy = fraction of pairs whose chosen reward is larger;
chosen_reward, rejected_reward; margin = chosen_reward - rejected_reward. For the reward task the rewards are the
scores r; for DPO the implicit rewards.

Scoring with a trained reward model (e.g. for PPO): `RewardModel.from_run(run_dir).score(prompts, responses)`.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ConfigError
from ..data import Collator, DataConfig, chosen_rejected, encode_rows
from .preference_config import PREFERENCE_TASKS, PreferenceConfig  # noqa: F401  (the config part, torch-free)

IGNORE = -100
# ---- the losses: pure functions of scores and log-probabilities ------------------------------------------------

def reward_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss per pair, (B,): -log sigmoid(chosen - rejected - margin), as softplus(-(...)), which does
    not overflow for large gaps."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return F.softplus(-diff)


def sigmoid_dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), per pair."""
    return (1.0 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(h - 1/(2 beta))^2, per pair (label_smoothing must be 0; PreferenceConfig checks it)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES = {"sigmoid": sigmoid_dpo_loss, "ipo": ipo_loss}  # one row per name in DPO_LOSS_TYPES (a test keeps them equal)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss from summed response log-probs, each (B,). Returns (loss per pair, chosen implicit reward,
    rejected implicit reward); the rewards are detached (they are reported, not trained)."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    losses = DPO_LOSSES[loss_type](chosen_ratio - rejected_ratio, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_sums(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair statistics summed over the batch (the loop divides by the number of pairs): accuracy (pairs ranked
    right), chosen_reward, rejected_reward, margin."""
    chosen_reward, rejected_reward = chosen_reward.detach().float(), rejected_reward.detach().float()
    return {"accuracy": (chosen_reward > rejected_reward).sum().float(), "chosen_reward": chosen_reward.sum(),
            "rejected_reward": rejected_reward.sum(), "margin": (chosen_reward - rejected_reward).sum()}


# ---- log-probabilities (DPO) -----------------------------------------------------------------------------------

def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, T, V) logits and (N, T) labels -> (N,) float32: sum over t of log p(labels[t] | tokens before t) where
    labels[t] != -100 (the logits at t - 1 predict token t). Through cross_entropy, which never materialises a
    second (N, T, V) log-softmax tensor in the forward."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"sequence_logprobs: logits {tuple(logits.shape)} do not line up with labels "
                         f"{tuple(labels.shape)}; the model must return one logit row per input token.")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (N, T): position t predicts targets[t] = labels[t + 1]
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE, reduction="none")  # 0 where ignored
    return -per_token.view(targets.shape).sum(-1)


def _lm_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def reference_logprobs(peft_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi_ref(y|x), (N,): the same model with every adapter disabled, in eval mode (so the base model's own
    dropout, if any, does not make the reference noisy), without gradients. Restores the train/eval mode."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            logits = peft_model(**_lm_inputs(batch)).logits
    finally:
        peft_model.train(was_training)
    return sequence_logprobs(logits, batch["labels"])


def dpo_forward(model: nn.Module, peft_model, batch: dict[str, torch.Tensor], options: PreferenceConfig):
    """The DPO loss of a pair batch (pairs.py layout): a reference forward (adapters disabled, no grad) and one
    policy forward through `model` (the DDP wrapper in training, else the PeftModel itself) over all 2B rows.
    Returns (loss per pair (B,), chosen implicit reward (B,), rejected implicit reward (B,))."""
    ref_chosen, ref_rejected = chosen_rejected(reference_logprobs(peft_model, batch))
    policy = sequence_logprobs(model(**_lm_inputs(batch)).logits, batch["labels"])
    policy_chosen, policy_rejected = chosen_rejected(policy)
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.loss_type,
                    options.label_smoothing)


# ---- scores (reward model) ---------------------------------------------------------------------------------------

SCORE_HEADS = ("score", "classifier")
"""Attribute names of a sequence-classification model's head (decoders: score, encoders: classifier)."""


def score_head(peft_model) -> nn.Module:
    """The scoring head module of a (wrapped) sequence-classification model."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name in SCORE_HEADS:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigError(f"{type(base).__name__} has no scoring head ({' or '.join(SCORE_HEADS)}); the reward task loads "
                      "the base with AutoModelForSequenceClassification, which needs an architecture that has one.")


def last_token_scores(head_output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output -> one float32 score per row, (N,).

    Decoders apply the head at every position, (N, T', 1): the score is read at the last position whose attention
    mask is 1, found from the mask rather than from pad ids (transformers looks for the last token that is not the
    pad id, which is the wrong token when the pad token is also EOS, as in SmolLM2, and EOS ends the row). Positions
    an adapter prepends (T' > T, e.g. virtual tokens) shift every index by T' - T. Encoders pool first, (N, 1)."""
    if head_output.shape[-1] != 1:
        raise ConfigError(f"A reward head has one output; this one has {head_output.shape[-1]}. Load the base with "
                          "num_labels=1 (the reward task does).")
    if head_output.dim() == 2:
        return head_output[:, 0].float()
    n, t = attention_mask.shape
    last = last_attended_index(attention_mask) + (head_output.shape[1] - t)  # (N,)
    return head_output[torch.arange(n, device=head_output.device), last.to(head_output.device), 0].float()


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of the last position whose attention mask is 1: where a reward model reads its score (training,
    RewardModel and PPO's reward adapter all read it here). From the mask, not from pad ids: when the pad token is
    also EOS (SmolLM2), an EOS ending a row is a real token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(dim=1)


def scoring_batch(prompts: list[str], responses: list[str], tokenizer, data: DataConfig) -> list[dict]:
    """Token ids of prompt + response per pair of texts, encoded as the reward task encodes each side of a pair (an
    sft prompt/response row: chat template or data.prompt_template, data.max_length; a prompt that does not fit
    loses its start). One encoder for RewardModel and PPO's reward adapter, so their scores cannot drift apart."""
    if isinstance(prompts, str) or isinstance(responses, str) or len(prompts) != len(responses):
        raise ValueError("Reward scoring: give two lists of texts of the same length (prompts, responses); got "
                         f"{type(prompts).__name__} and {type(responses).__name__}"
                         + (f" of lengths {len(prompts)} and {len(responses)}." if not isinstance(prompts, str)
                            and not isinstance(responses, str) else "."))
    # The rows are built here, never read from files, so skipping or packing them would only misalign scores.
    data = dataclasses.replace(data, skip_bad_rows=False, packing=False)
    return encode_rows([{"prompt": p, "response": r} for p, r in zip(prompts, responses)], "sft", tokenizer, data)


def sequence_scores(model: nn.Module, peft_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """r for every row of `batch`, (N,), with gradients when grad is on. The forward goes through `model` (so a
    DDP wrapper syncs gradients); the head's per-position output is caught by a forward hook on `peft_model`'s head
    and read by `last_token_scores`."""
    caught: list[torch.Tensor] = []
    handle = score_head(peft_model).register_forward_hook(lambda _m, _args, out: caught.append(out))
    try:
        model(**_lm_inputs(batch))
    finally:
        handle.remove()
    if len(caught) != 1 or not torch.is_tensor(caught[0]):
        raise RuntimeError(f"The scoring head ran {len(caught)} times in one forward (expected once, with a tensor "
                           "out).")
    return last_token_scores(caught[0], batch["attention_mask"])


def reward_forward(model: nn.Module, peft_model, batch: dict[str, torch.Tensor]):
    """The Bradley-Terry loss of a pair batch: one forward over its 2B rows. Returns (loss per pair (B,), chosen
    scores (B,), rejected scores (B,))."""
    chosen, rejected = chosen_rejected(sequence_scores(model, peft_model, batch))
    return reward_pair_loss(chosen, rejected, batch.get("margin")), chosen.detach(), rejected.detach()


# ---- a trained reward model, for scoring ----------------------------------------------------------------------

class RewardModel:
    """A trained reward adapter on its base model, scoring (prompt, response) texts exactly as training encoded them.

        rm = RewardModel.from_run("out/reward_movie_reviews")                  # a `peftlab train` reward run folder
        rm.score(["Write a positive movie review:"] * 2, ["A joy to watch.", "Dull and far too long."])
        # tensor([ 2.1, -1.7]): higher = preferred; only differences between scores mean anything

    Encoding: the run's data config (chat template or prompt_template, max_length; a prompt that does not fit loses
    its start), as `encode_rows(..., "sft", ...)` encodes a prompt/response row; the score is read at the last real
    token. `score_batch` scores token ids already in that form (right-padded `input_ids` + `attention_mask`, e.g.
    responses generated by a policy that shares the tokenizer, re-encoded by `encode`) and keeps gradients if asked.
    """

    def __init__(self, model, tokenizer, data: DataConfig, device: str | torch.device | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.data = data
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.autocast_dtype = autocast_dtype
        self.collator = Collator(tokenizer.pad_token_id, "sft")

    @classmethod
    def from_run(cls, run_dir: str, adapter_dir: str | None = None, **kwargs) -> "RewardModel":
        """Load the base model and reward adapter of a `peftlab train` run with task reward: `run_dir` holds
        run_config.yaml and adapter/ (or give `adapter_dir`, e.g. a checkpoint's adapter). kwargs: device,
        autocast_dtype."""
        from .config import load_finished_run
        from .model_loading import autocast_for

        run = load_finished_run(run_dir, "reward", "RewardModel.from_run")
        # The base as the run trained it: its dtype (run.base_dtype, e.g. auto -> bf16) under autocast in that dtype,
        # and a quantised base (qlora) quantised as it is read rather than after a full-precision load.
        kwargs.setdefault("autocast_dtype", autocast_for(run.base_dtype))
        return cls.from_pretrained(run.model, adapter_dir or os.path.join(run_dir, "adapter"), data=run.data,
                                   dtype=run.base_dtype, method_config=run.method, **kwargs)

    @classmethod
    def from_pretrained(cls, model: str, adapter_dir: str, data: DataConfig | None = None, dtype: str = "fp32",
                        method_config=None, **kwargs) -> "RewardModel":
        """Base `model` ("smollm2", a folder or a hub id) + the reward adapter in `adapter_dir`. `data` gives the
        encoding (max_length, prompt_template); None: the defaults (max_length 512, chat template if any). `dtype`:
        the frozen base's (auto | bf16 | fp16 | fp32; pass autocast_dtype to compute in 16 bits); `method_config`: the
        adapter's config, so that a method that quantises the base at load (qlora) does it as the weights are read."""
        from .model_loading import load_trained_adapter

        tokenizer, peft_model = load_trained_adapter(model, "AutoModelForSequenceClassification", ["reward"],
                                                     adapter_dir, dtype=dtype, method_config=method_config)
        return cls(peft_model, tokenizer, data or DataConfig(train_file="(scoring only)"), **kwargs)

    def encode(self, prompts: list[str], responses: list[str]) -> list[dict]:
        """Token ids of prompt + response per pair of texts, as training encoded each side of a pair."""
        return scoring_batch(prompts, responses, self.tokenizer, self.data)

    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores (N,) of a right-padded batch {"input_ids", "attention_mask"} (gradients follow torch's grad mode)."""
        mask = batch["attention_mask"]
        if mask.dim() != 2 or bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("RewardModel.score_batch: the batch must be right-padded (attention_mask 1...1 0...0 per "
                             "row), as training was; left padding shifts the positions and changes the scores.")
        batch = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}
        if self.autocast_dtype is None:
            return sequence_scores(self.model, self.model, batch)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return sequence_scores(self.model, self.model, batch)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """One float32 score per (prompt, response), (N,) on the CPU, in the order given. Rows are batched by length
        (less padding); the order of the result is the order of the inputs."""
        examples = self.encode(prompts, responses)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        out = torch.empty(len(examples), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.score_batch(self.collator([examples[i] for i in idx])).cpu()
        return out


__all__ = ["DPO_LOSSES", "PREFERENCE_TASKS", "PreferenceConfig", "RewardModel", "dpo_forward", "dpo_loss", "ipo_loss",
           "last_attended_index", "last_token_scores", "pair_sums", "reference_logprobs", "reward_forward",
           "reward_pair_loss", "score_head", "scoring_batch", "sequence_logprobs", "sequence_scores",
           "sigmoid_dpo_loss"]
