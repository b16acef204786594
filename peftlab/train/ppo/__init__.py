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

The package: prompts.py (where prompts come from, how they are encoded and padded), reward.py (the reward adapter on
the shared base, or a reward function), trainer.py (PPOTrainer: rollouts, updates, evaluation, checkpoints, the saved
policy); the formulas are in ../ppo_math.py, the config in ../ppo_config.py.
"""

from ..ppo_config import PPOConfig
from .prompts import encode_prompt, load_prompts, pad_rows
from .reward import (HEAD_NAMES, POLICY, REWARD, RewardFn, adapter_scores, load_reward_adapter, resolve_reward_folder,
                     reward_encoding)
from .trainer import PPOState, PPOTrainer, VALUE_HEAD_FILE, load_value_head, train_ppo, write_ppo_model_card

__all__ = ["HEAD_NAMES", "POLICY", "PPOConfig", "PPOState", "PPOTrainer", "REWARD", "RewardFn", "VALUE_HEAD_FILE",
           "adapter_scores", "encode_prompt", "load_prompts", "load_reward_adapter", "load_value_head", "pad_rows",
           "resolve_reward_folder", "reward_encoding", "train_ppo", "write_ppo_model_card"]
