"""Online-RL losses (GRPO and its variants, PPO) as pure functions of tensors.

Conventions
-----------
- Per-token tensors are (B, T): one row per sampled completion, one column per completion token,
  aligned with a (B, T) `mask` (bool or float) that is 1 on the completion tokens the loss covers
  and 0 on padding. Prompts are not part of these tensors. Column t of `logp` is the log-probability
  the policy gave completion token t (see `orchard.losses.tokens.token_log_probs`).
- `logp` is the current policy's (with gradient), `old_logp` the sampling policy's and `ref_logp`
  the frozen reference model's (both without gradient). Advantages, rewards and values are data:
  nothing here differentiates through them.
- Per-token loss functions return (B, T) tensors with values at every position, padding included;
  `aggregate` applies the mask and reduces. Functions that return advantages, returns or rewards
  set positions outside the mask to 0.
- GRPO rewards are (N*G,): G consecutive samples per prompt, group by group, as they are generated
  (`prompt.repeat_interleave(G)`).

How a loss reaches the optimizer
--------------------------------
orchard's training engine asks a method for the *summed* loss of each micro-batch and for how many
items it sums over, adds the counts of all micro-batches and all processes, and divides the summed
loss by that total. That makes a step's loss independent of how the global batch is split. So
`aggregate` returns `(summed_loss, count)` rather than a mean: for every mode, summed_loss / count
is the loss of that mode on one micro-batch, and (sum of summed losses) / (sum of counts) the loss
of that mode on the whole global batch ("sequence": mean over all its sequences of each sequence's
token mean; "token": mean over all its tokens; "dr_grpo": token sum over B_global * L).

Matches TRL 1.16 (`GRPOTrainer`) and TRL's PPO trainer (`trl.experimental.ppo`, no longer shipped
in TRL 1.16); tests/test_rl_losses.py checks values and gradients against them and states the
convention differences.
"""

from __future__ import annotations

from typing import Callable

import torch

AGGREGATIONS = ("sequence", "token", "dr_grpo")


# --- GRPO ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None,
                     scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO: each reward minus its group's mean, over its group's std + eps.

    `rewards` (N*G,) holds G = `group_size` consecutive samples per prompt. `scale=False` leaves out
    the division (Dr. GRPO). The std is the unbiased (Bessel-corrected, n-1) sample std of the
    group, as TRL's GRPOTrainer computes it (its `nanstd`), and eps = 1e-4 is TRL's too.

    `valid` (N*G,) bool marks samples whose reward was computed; a sample whose reward function
    failed is left out of its group's mean and std and gets advantage 0. Non-finite rewards (NaN,
    TRL's mark of an unscorable sample) count as invalid too. A group with fewer than 2 valid
    samples, or whose valid rewards are all equal, gets 0 advantages: no signal, and no NaN.
    Returns (N*G,) fp32, without gradient.
    """
    r, ok = _valid_groups(rewards, group_size, valid)
    n = ok.sum(1, keepdim=True)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(ok, r - mean, 0.0)
    advantages = centred
    if scale:
        std = ((centred ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        advantages = centred / (std + eps)
    return torch.where(ok & (n >= 2), advantages, 0.0).view(-1)


def _valid_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards with invalid ones zeroed, valid mask), both (N, G); invalid = failed or non-finite."""
    if rewards.dim() != 1 or group_size <= 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N*G,) with G={group_size} dividing its length, got {tuple(rewards.shape)}")
    rewards = rewards.detach().float()
    ok = torch.isfinite(rewards)
    if valid is not None:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid must have the shape of rewards {tuple(rewards.shape)}, got {tuple(valid.shape)}")
        ok = ok & valid.bool()
    return torch.where(ok, rewards, 0.0).view(-1, group_size), ok.view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO; Ahmadian et al. 2024): each reward minus the mean of the other
    valid rewards of its group, an unbiased baseline that needs no value model. Invalid samples get
    0 and are left out of their siblings' baselines; a group with fewer than 2 valid samples gives 0
    (TRL's RLOOTrainer, before its optional normalisation: `normalised_advantages`). (N*G,) fp32."""
    r, ok = _valid_groups(rewards, group_size, valid)
    n = ok.sum(1, keepdim=True)
    baseline = (r.sum(1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return torch.where(ok & (n >= 2), r - baseline, 0.0).view(-1)


def batch_scaled_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None,
                            eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE++ with a group baseline (Hu 2025): each reward minus its group's mean, over the std
    of all the batch's valid rewards + eps, so one noisy group does not blow up its advantages as a
    group std can (TRL's GRPO `scale_rewards="batch"`). A group with fewer than 2 valid samples
    gives 0. (N*G,) fp32."""
    r, ok = _valid_groups(rewards, group_size, valid)
    n = ok.sum(1, keepdim=True)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)
    values = r[ok]
    std = values.std() if values.numel() > 1 else torch.tensor(0.0)
    return torch.where(ok & (n >= 2), (r - mean) / (std + eps), 0.0).view(-1)


def normalised_advantages(advantages: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0 and std 1 over the valid samples of the batch (RLOO's
    `normalize_advantages`); invalid ones stay 0."""
    ok = torch.ones_like(advantages, dtype=torch.bool) if valid is None else valid.bool()
    values = advantages[ok]
    if values.numel() < 2:
        return torch.zeros_like(advantages)
    return torch.where(ok, (advantages - values.mean()) / (values.std() + eps), 0.0)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) (Schulman, "Approximating KL divergence"):
    exp(ref - logp) - (ref - logp) - 1. Non-negative, 0 where the two agree; unbiased when the
    tokens are sampled from the policy. GRPO's KL penalty."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _per_row(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) advantages as a (B, 1) column; (B, T) ones as they are."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.dim() != 2 or advantages.size(0) != like.size(0):
        raise ValueError(f"advantages must be (B,) or (B, T) for B={like.size(0)}, got {tuple(advantages.shape)}")
    return advantages


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2) -> torch.Tensor:
    """Per-token PPO clipped surrogate loss: -min(ρ A, clip(ρ, 1 - eps_low, 1 + eps_high) A), ρ = exp(logp - old_logp).

    `advantages` (B,) apply to every token of their row, (B, T) per token. eps_high > eps_low is
    DAPO's clip-higher. On-policy (logp equal to old_logp, detached) this is -A with gradient -A ∇logp.
    """
    advantages = _per_row(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                    eps_low: float = 0.2, eps_high: float = 0.2) -> torch.Tensor:
    """Per-token GRPO loss: the clipped surrogate plus beta times the k3 KL to the reference.

    `old_logp=None` means one policy update per generation: the sampling policy is the current one,
    so logp.detach() stands for it (as TRL does). `ref_logp` is needed only when beta != 0.
    Reduce it with `aggregate`.
    """
    if old_logp is None:
        old_logp = logp.detach()
    loss = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_token_loss: beta != 0 needs ref_logp")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


def gspo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                    eps_low: float = 3e-4, eps_high: float = 4e-4) -> torch.Tensor:
    """Per-token GSPO loss (Zheng et al. 2025, TRL's `importance_sampling_level="sequence"`): one
    importance ratio per sequence, exp of the mean over its tokens of logp - old_logp, clipped as
    PPO's (GSPO's ranges are ~1e-4, not 0.2), its surrogate at every token of the row, plus beta
    times the per-token k3 KL. `advantages` (B,). Reduce with `aggregate(..., "sequence")`: each
    sequence then weighs once, as the ratio does."""
    if advantages.dim() != 1:
        raise ValueError(f"GSPO's advantages are one per sequence, (B,), got {tuple(advantages.shape)}")
    if old_logp is None:
        old_logp = logp.detach()
    mask = mask.to(logp.dtype)
    log_ratio = ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    loss = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), advantages, eps_low, eps_high)
    loss = loss.expand_as(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("gspo_token_loss: beta != 0 needs ref_logp")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
              max_completion_length: int | None = None) -> tuple[torch.Tensor, float]:
    """Reduce a (B, T) per-token loss over the mask to (summed_loss, count); summed_loss / count is the loss.

    - "sequence": each sequence's mean over its tokens, averaged over sequences (the GRPO paper; TRL
      loss_type="grpo"). count = B. A row without tokens adds 0 and still counts, as in TRL.
    - "token": sum over all tokens / number of tokens (DAPO; TRL "dapo", and "bnpo" within a
      micro-batch). count = mask.sum(). Long completions weigh more than in "sequence".
    - "dr_grpo": sum over all tokens / (B * max_completion_length) (Dr. GRPO; TRL "dr_grpo"): a
      constant normaliser, no length bias. count = B * max_completion_length.

    The split matters because the engine sums counts over micro-batches and processes before
    dividing (module docstring): with "token", a micro-batch's share of the step is its share of
    the tokens, as DAPO intends, not 1 / (number of micro-batches). A count of 0 ("token" with an
    empty mask) is left to the caller; the engine stops when a whole step has nothing to train on.
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token and mask must both be (B, T), got {tuple(per_token.shape)} and {tuple(mask.shape)}")
    masked = torch.where(mask.bool(), per_token, 0.0)
    mask = mask.to(per_token.dtype)
    if mode == "sequence":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum(), float(per_token.size(0))
    if mode == "token":
        return masked.sum(), float(mask.sum().item())
    if mode == "dr_grpo":
        if max_completion_length is None or max_completion_length < per_token.size(1):
            raise ValueError("aggregate: mode 'dr_grpo' needs max_completion_length >= the number of columns, "
                             f"got {max_completion_length} for {per_token.size(1)} columns")
        return masked.sum(), float(per_token.size(0) * max_completion_length)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


# --- PPO ----------------------------------------------------------------------------------------------


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries of the whole batch; 0 outside the mask.

    As TRL's `masked_whiten`: one mean and one variance over all masked entries (not per row), the
    variance unbiased (Bessel, n-1). `shift_mean=False` adds the mean back (scale only; TRL's
    reward whitening). TRL leaves entries outside the mask shifted and scaled and masks them later;
    here they are 0. Needs at least 2 masked entries. `total` adds up a tensor of sums over the
    parts of a batch split over processes (an all-reduce), so each part is whitened as the whole.
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)
    n, value_sum = total(torch.stack([mask.sum().to(values.dtype), values.sum()]))
    if n.item() < 2:
        raise ValueError(f"whiten needs at least 2 masked values, got {int(n.item())}")
    mean = value_sum / n
    var = total(torch.where(mask, (values - mean) ** 2, 0.0).sum()) / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def _check_right_padded(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    if mask.dim() != 2 or not torch.equal(mask, mask.int().cumprod(1).bool()):
        raise ValueError("mask must be (B, T) with each row's completion tokens a run starting at column 0 "
                         "(right padding)")
    return mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion tokens.

    rewards, values (B, T) per completion token; mask right-padded (each row's tokens are columns
    0 .. L-1). The episode ends after a row's last token, so the value after it is 0:
    δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γ λ A_{t+1},  returns R_t = A_t + V_t.
    Returns (advantages, returns), 0 outside the mask, without gradient (whiten the advantages
    with `whiten` if wanted; the returns are the value head's regression targets).
    """
    mask = _check_right_padded(mask)
    rewards = torch.where(mask, rewards.detach(), 0.0)
    values = torch.where(mask, values.detach(), 0.0)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per-token PPO value loss: 0.5 max((v - R)², (clip(v, v_old - clip, v_old + clip) - R)²).

    The clipped term keeps the value head from moving more than `clip` from its rollout-time
    prediction in one update (PPO2, TRL's vf loss). Reduce it with `aggregate`.
    """
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def token_rewards_with_kl(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                          kl_coef: float, kl_estimator: str = "k1") -> torch.Tensor:
    """PPO-RLHF per-token rewards: -kl_coef * KL_t at every completion token, plus each row's
    sequence `score` (B,) at its last completion token (InstructGPT; TRL's PPOTrainer.compute_rewards).

    KL_t is logp - ref_logp ("k1", TRL's default) or k3 ("k3"). Rows without completion tokens
    get no score. Returns (B, T), 0 outside the mask, without gradient.
    """
    mask = mask.bool()
    logp, ref_logp = logp.detach(), ref_logp.detach()
    if kl_estimator == "k1":
        kl = logp - ref_logp
    elif kl_estimator == "k3":
        kl = k3_kl(logp, ref_logp)
    else:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected 'k1' or 'k3'")
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    columns = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask, columns, -1).max(1).values  # each row's last masked column, -1 if none
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += score.detach().to(rewards.dtype)[rows]
    return rewards
