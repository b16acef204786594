"""The arithmetic of PPO for language models, as pure functions on tensors (no model, no state).

Shapes: B rollouts, T response tokens (the longest response in the batch). A response mask (B, T) is 1 on a
rollout's tokens, which start at t = 0 and end with its first EOS (included) or at max_new_tokens; it is 0 on the
padding after. Every per-token tensor is aligned with the response tokens: at index t

    logp[b, t]   = log pi(a_t | s_t), the policy's log-probability of response token t given everything before it
    values[b, t] = V(s_t), the value of the state just before token t is chosen

Used by peftlab/train/ppo/ (trainer.py); tests/test_ppo.py checks each function against a hand computation.

References: Schulman et al. 2017 (PPO, clipped surrogate), Schulman et al. 2016 (GAE), Ziegler et al. 2019 and
Ouyang et al. 2022 (RLHF: a per-token KL penalty to the initial model, the reward model's score at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (a scalar). 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` (B, T) over its masked entries: (x - mean) / sqrt(var + eps), with mean and the population
    variance (divided by the count, not count - 1) taken over the masked entries only. shift_mean=False adds the
    mean back (scale only). Masked-out entries come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def response_mask(response_ids: torch.Tensor, eos_ids: list[int] | int) -> torch.Tensor:
    """(B, T) float mask of the response tokens up to and including the first EOS of each row.

    What `generate` writes after a row's EOS (padding, or more EOS when pad == eos) is masked out; a row without
    an EOS keeps all T tokens (it hit max_new_tokens)."""
    eos = torch.as_tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=response_ids.device)
    is_eos = torch.isin(response_ids, eos).long()
    seen_before = is_eos.cumsum(dim=1) - is_eos  # EOS strictly before t
    return (seen_before == 0).float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: (B, T, V) logits and (B, T) token ids -> (B, T), in fp32.
    Via cross-entropy, which does not keep a second (B, T, V) tensor of log-probabilities."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    return -flat.view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T). H = logsumexp(z) - sum_v p_v z_v."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_penalty_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                       kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of the RLHF objective, and the per-token KL estimate.

        kl[b, t]      = (logp[b, t] - ref_logp[b, t]) * mask[b, t]          (the k1 estimate of KL(pi || ref))
        rewards[b, t] = -kl_coef * kl[b, t] + scores[b] * [t == last token of row b]

    scores (B,): the reward model's score of each whole rollout; logp, ref_logp, mask (B, T). The penalty keeps the
    policy near the reference (the base model with adapters disabled); summed over a rollout it is kl_coef times
    the sampled estimate of KL(pi || ref) for that rollout. Returns (rewards, kl), both (B, T) and 0 where masked."""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    if bool((lengths == 0).any()):
        raise ValueError("kl_penalty_rewards: a rollout has no response token (its mask row is all 0), so there is "
                         "no token to give its score to.")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, lengths - 1), scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens, backwards from each rollout's last token.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}           (A_T = 0, m_T = 0)
        R_t     = A_t + V_t                                            (the value targets, "returns")

    rewards, values, mask (B, T); the mask is a prefix per row (a rollout ends at its last masked token, where
    m_{t+1} = 0 makes the state after it terminal: no bootstrap). With gamma = lam = 1, A_t = sum_{k >= t} r_k - V_t
    (reward-to-go minus value). Returns (advantages, returns), both (B, T), 0 where masked, without gradient."""
    mask = mask.to(values.dtype)
    rewards, values = (rewards * mask).detach(), (values * mask).detach()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value, next_mask = values[:, t + 1], mask[:, t + 1]
        else:
            next_value, next_mask = torch.zeros_like(running), torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss to minimise (masked mean over tokens).

        ratio_t = exp(logp_t - old_logp_t)
        loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    (the max of the negatives is the min of the objectives: the pessimistic bound). A positive advantage stops
    pushing once ratio > 1 + eps, a negative one once ratio < 1 - eps. All (B, T); old_logp and advantages carry no
    gradient. Stats: clip_frac (share of tokens where the clipped term is the larger, i.e. the gradient is cut),
    approx_kl (0.5 * mean (logp - old_logp)^2, how far this minibatch has moved from the rollout policy)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approx_kl": (0.5 * masked_mean(log_ratio.detach() ** 2, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value head's loss (masked mean over tokens), with PPO's value clipping.

        clip None: loss = 0.5 * mean_t (V_t - R_t)^2
        else:      V'_t = old_V_t + clip(V_t - old_V_t, -c, c)
                   loss = 0.5 * mean_t max((V_t - R_t)^2, (V'_t - R_t)^2)

    The clipped branch keeps the value from moving more than c from its rollout-time estimate when that would
    lower the loss. All (B, T); old_values and returns carry no gradient. Stat: value_clip_frac (share of tokens
    where the clipped term is the larger)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), {"value_clip_frac": torch.zeros(())}
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_frac": masked_mean((clipped > unclipped).float(), mask).detach()}
