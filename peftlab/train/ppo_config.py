"""The `ppo:` section of a `task: ppo` run (its own module so that reading a run config does not import the PPO loop).
The loop itself is peftlab/train/ppo/ (trainer.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_number, field_docs


@dataclass
class PPOConfig:
    """The `ppo:` section of a `task: ppo` run: where rewards and prompts come from, sampling, and PPO's
    hyper-parameters. The optimiser's settings (lr, weight_decay, max_grad_norm, schedule, warmup), the seed,
    output_dir, checkpoints and logging come from `train:`; one train step is one PPO iteration."""

    reward_adapter: str | None = None
    """Folder of a reward adapter trained with `task: reward` on this run's base model (that run's
    output_dir/adapter, or its output_dir). Loaded onto the same base as adapter "reward"; its score head scores
    prompt + response encoded as that run encoded its pairs (the prompt_template and max_length of the
    run_config.yaml beside the adapter folder, when present). Required unless the Python API passes reward_fn."""

    check_reward_base: bool = True
    """Refuse a reward adapter whose adapter_config.json names another base model than `model:`. Turn off only
    when both names are the same weights (e.g. a hub id and a local copy of it)."""

    prompts: list[str] | None = None
    """Prompts given inline, e.g. ["Write a positive movie review:"]. None: the `prompt` column of
    data.train_file (data.columns maps another column to it). A prompt is formatted as the sft task formats one:
    data.prompt_template if set, else the tokenizer's chat template (one user turn + the generation prompt), else
    "{prompt}\\n"."""

    eval_prompts: list[str] | None = None
    """Prompts for evaluation, inline. None: data's eval rows (data.eval_file or data.eval_fraction) when prompts
    come from data, else the training prompts (sampled with the fixed evaluation seed)."""

    max_prompt_length: int = 128
    """Longest prompt in tokens; a longer one keeps its last max_prompt_length tokens (the end, next to the
    response)."""

    max_new_tokens: int = 32
    """Most tokens generated per response (a response also ends at its first EOS)."""

    temperature: float = 1.0
    """Sampling temperature; log-probabilities in the PPO loss use the same logits / temperature."""

    top_k: int = 0
    """Sample from the k most likely tokens only (0: off). The PPO loss does not model the truncation."""

    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off). The PPO loss does not model the truncation."""

    rollout_batch_size: int = 16
    """Prompts (one response each) per PPO iteration; also the batch size of evaluation."""

    minibatch_size: int = 8
    """Rollouts per optimizer step; must divide rollout_batch_size."""

    ppo_epochs: int = 4
    """Passes over each iteration's rollouts (each in a fresh shuffled minibatch order)."""

    clip_range: float = 0.2
    """PPO's epsilon: the probability ratio pi/pi_old is clipped to [1 - eps, 1 + eps] in the objective."""

    value_clip: float | None = 0.2
    """A value may move at most this far from its rollout-time estimate where that lowers the loss (null: no
    value clipping)."""

    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""

    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference: reward_t = -kl_coef * (logp_t - ref_logp_t), plus the
    reward model's score on the last token."""

    gamma: float = 1.0
    """Discount over response tokens in GAE."""

    lam: float = 0.95
    """GAE's lambda: 1 gives Monte-Carlo returns minus the value, 0 one-step TD errors."""

    whiten_advantages: bool = True
    """Normalise each iteration's advantages to mean 0, variance 1 over the response tokens."""

    eval_greedy: bool = False
    """Evaluate with greedy decoding instead of sampling with the fixed evaluation seed."""

    def __post_init__(self) -> None:
        n = "ppo"
        for name in ("max_prompt_length", "max_new_tokens", "rollout_batch_size", "minibatch_size", "ppo_epochs"):
            check_number(n, name, getattr(self, name), low=1, integer=True)
        check_number(n, "top_k", self.top_k, low=0, integer=True)
        check_number(n, "temperature", self.temperature, low=0, low_inclusive=False)
        check_number(n, "top_p", self.top_p, low=0, high=1, low_inclusive=False)
        check_number(n, "clip_range", self.clip_range, low=0, low_inclusive=False)
        if self.value_clip is not None:
            check_number(n, "value_clip", self.value_clip, low=0, low_inclusive=False)
        for name in ("vf_coef", "kl_coef"):
            check_number(n, name, getattr(self, name), low=0)
        for name in ("gamma", "lam"):
            check_number(n, name, getattr(self, name), low=0, high=1)
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.minibatch_size={self.minibatch_size} does not divide ppo.rollout_batch_size="
                              f"{self.rollout_batch_size}; pick a divisor (e.g. {_divisor_near(self)}) so every "
                              f"optimizer step sees as many rollouts.")
        if self.reward_adapter is not None and (not isinstance(self.reward_adapter, str) or not self.reward_adapter):
            raise ConfigError(f"ppo.reward_adapter={self.reward_adapter!r} is not valid; give the folder of a "
                              "`task: reward` run's adapter, e.g. out/reward_movie_reviews/adapter.")
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
                raise ConfigError(f"ppo.{name}={value!r} is not valid; give a non-empty list of non-empty strings, "
                                  f"e.g. [\"Write a positive movie review:\"].")
            setattr(self, name, list(value))

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return field_docs(cls)


def _divisor_near(cfg: PPOConfig) -> int:
    return max(d for d in range(1, cfg.minibatch_size + 1) if cfg.rollout_batch_size % d == 0)
