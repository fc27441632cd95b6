"""Online-RL losses (GRPO, PPO): values computed by hand, gradients against the analytic formula,
and parity with TRL.

TRL parity: GRPO is checked against the installed TRL (`GRPOTrainer._compute_loss` called unbound
with a stand-in `self`, its `selective_log_softmax`, `entropy_from_logits` and `nanstd`). TRL 1.16
no longer ships a PPO trainer, so masked_whiten, GAE, the value loss and the per-token rewards are
transcribed from TRL's source (cited at each reference function) and compared against.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from orchard.losses.tokens import token_log_probs
from orchard.losses.rl import (aggregate, batch_scaled_advantages, clipped_surrogate, clipped_value_loss, gae,
                               grpo_token_loss, group_advantages, gspo_token_loss, k3_kl, normalised_advantages,
                               rloo_advantages, token_rewards_with_kl, whiten)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --- hand-computed values -------------------------------------------------------------------------------


def test_group_advantages_two_groups_of_three():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # Group 1: mean 2, deviations (-1, 0, 1), unbiased variance (1 + 0 + 1) / 2 = 1, std 1.
    # Group 2: mean 2, deviations (-2, -2, 4), unbiased variance (4 + 4 + 16) / 2 = 12, std √12.
    s2 = math.sqrt(12) + 1e-4
    close(group_advantages(rewards, 3), [-1 / 1.0001, 0.0, 1 / 1.0001, -2 / s2, -2 / s2, 4 / s2])
    # Dr. GRPO: no division by the std.
    close(group_advantages(rewards, 3, scale=False), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])


def test_group_advantages_leave_out_invalid_samples():
    rewards = torch.tensor([1.0, 2.0, 100.0, 0.0, 0.0, 6.0])
    valid = torch.tensor([True, True, False, True, True, True])
    # Group 1 over its valid {1, 2}: mean 1.5, deviations ±0.5, unbiased variance 0.5 / 1, std √0.5;
    # the invalid 100 neither moves the statistics nor gets an advantage.
    s1, s2 = math.sqrt(0.5) + 1e-4, math.sqrt(12) + 1e-4
    expected = [-0.5 / s1, 0.5 / s1, 0.0, -2 / s2, -2 / s2, 4 / s2]
    close(group_advantages(rewards, 3, valid=valid), expected)
    # A NaN reward (TRL's mark of a failed reward function) is invalid too.
    close(group_advantages(torch.tensor([1.0, 2.0, math.nan, 0.0, 0.0, 6.0]), 3), expected)
    close(group_advantages(rewards, 3, valid=valid, scale=False), [-0.5, 0.5, 0.0, -2.0, -2.0, 4.0])


def test_group_advantages_degenerate_groups_give_zero_not_nan():
    # Equal rewards: std 0. One valid sample: no unbiased std. No valid sample at all.
    rewards = torch.tensor([2.0, 2.0, 2.0, 5.0, 7.0, 9.0, 1.0, 3.0, 4.0])
    valid = torch.tensor([True, True, True, True, False, False, False, False, False])
    for scale in (True, False):
        advantages = group_advantages(rewards, 3, valid=valid, scale=scale)
        assert torch.equal(advantages, torch.zeros(9))
    with pytest.raises(ValueError):
        group_advantages(rewards, 4)


def test_rloo_and_batch_scaled_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # Leave-one-out: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2; 0 - 3, 0 - 3, 6 - 0.
    close(rloo_advantages(rewards, 3), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    valid = torch.tensor([True, True, False, True, False, False])
    # Group 1 over {1, 2}: 1 - 2, 2 - 1; group 2 has one valid sample: no baseline, 0.
    close(rloo_advantages(rewards, 3, valid), [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # REINFORCE++: deviations from the group mean (2 and 2) over the std of all six rewards.
    std = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]).std().item() + 1e-4
    close(batch_scaled_advantages(rewards, 3), [-1 / std, 0.0, 1 / std, -2 / std, -2 / std, 4 / std])
    a = torch.tensor([1.0, 3.0, 5.0, 100.0])
    close(normalised_advantages(a, torch.tensor([True, True, True, False])), [-2 / 2.0001, 0.0, 2 / 2.0001, 0.0])


def test_gspo_uses_one_ratio_per_sequence():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.2, -1.6, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    # Row 0: the mean log ratio over its 2 tokens, (0.2 - 0.4) / 2 = -0.1 (the padding's 9 ignored), one
    # ratio e^-0.1 = 0.905 for the whole row; row 1: ratio 1.
    loss = gspo_token_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.2)
    ratio = math.exp(-0.1)
    close(loss[0], [-ratio] * 3)  # 0.905 is inside [0.8, 1.2]: unclipped, at every token of the row
    close(loss[1], [1.0] * 3)  # ratio 1, advantage -1
    tight = gspo_token_loss(logp, old, advantages, mask, eps_low=0.05, eps_high=0.05)
    close(tight[0], [-ratio] * 3)  # -min(0.905, 0.95) for a positive advantage: the unclipped one
    negative = gspo_token_loss(logp, old, -advantages, mask, eps_low=0.05, eps_high=0.05)
    close(negative[0], [0.95] * 3)  # -min(-0.905, -0.95) = 0.95: clipped


def test_k3_is_the_formula_nonnegative_and_zero_when_equal():
    # d = ref - logp = log 0.25 - log 0.5 = -log 2: k3 = 0.5 + log 2 - 1.
    close(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))), 0.5 + math.log(2) - 1)
    g = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(50, generator=g), -3 * torch.rand(50, generator=g)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(50))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    loss = clipped_surrogate(logp, old, advantages, 0.2, 0.2)
    # ρ=1.5, A=+2: min(3, 1.2·2) = 2.4     ρ=1.5, A=-2: min(-3, -2.4) = -3
    # ρ=0.5, A=+2: min(1, 0.8·2) = 1       ρ=0.5, A=-2: min(-1, -1.6) = -1.6
    close(loss, [[-2.4, 3.0, -1.0, 1.6]])
    # Clipped terms are constant in logp; unclipped ones have gradient -ρA.
    loss.sum().backward()
    close(logp.grad, [[0.0, 3.0, -1.0, 0.0]])
    # Clip-higher (DAPO): only the upper bound moves.
    close(clipped_surrogate(logp, old, advantages, 0.2, 0.28), [[-2.56, 3.0, -1.0, 1.6]])
    # (B,) advantages apply to every token of their row.
    close(clipped_surrogate(logp, old, torch.tensor([2.0]), 0.2, 0.2), [[-2.4, -2.4, -1.0, -1.0]])


def test_grpo_token_loss_adds_beta_k3():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    loss = grpo_token_loss(logp, None, torch.tensor([1.0]), ref_logp=ref, beta=0.1)
    # On-policy the surrogate is -A = -1; k3 is 0.5 + log 2 - 1 on the first token, 0 on the second.
    close(loss, [[-1 + 0.1 * (0.5 + math.log(2) - 1), -1.0]])
    with pytest.raises(ValueError):
        grpo_token_loss(logp, None, torch.tensor([1.0]), beta=0.1)


def test_aggregation_modes_on_a_ragged_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # sequence: row means (1+2+3)/3 = 2 and 10, the empty row 0; over 3 rows: 12 / 3 = 4.
    total, count = aggregate(per_token, mask, "sequence")
    assert (total.item(), count) == (12.0, 3.0)
    # token: (1+2+3+10) / 4 tokens = 4 (here equal to sequence by coincidence; see below).
    total, count = aggregate(per_token, mask, "token")
    assert (total.item(), count) == (16.0, 4.0)
    # dr_grpo: 16 / (3 rows · 6 max tokens) = 16 / 18.
    total, count = aggregate(per_token, mask, "dr_grpo", max_completion_length=6)
    assert (total.item(), count) == (16.0, 18.0)
    # Without the empty row the three modes all differ: 12/2 = 6, 16/4 = 4, 16/(2·4) = 2.
    losses = [t.item() / c for t, c in (aggregate(per_token[:2], mask[:2], m, max_completion_length=4)
                                          for m in ("sequence", "token", "dr_grpo"))]
    assert losses == [6.0, 4.0, 2.0]
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "mean")


def test_aggregate_sums_over_micro_batches_like_the_whole_batch():
    # The engine adds summed losses and counts over micro-batches: that must equal the mode's loss
    # on the whole batch.
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(6, 5, generator=g)
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 4, 2, 5]).unsqueeze(1)).float()
    for mode in ("sequence", "token", "dr_grpo"):
        whole, whole_count = aggregate(per_token, mask, mode, max_completion_length=5)
        parts = [aggregate(per_token[i:i + 2], mask[i:i + 2], mode, max_completion_length=5) for i in (0, 2, 4)]
        close(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole / whole_count)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # γ = λ = 1: A_t = (sum of rewards from t on) - V_t; returns are the reward-to-go.
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.3], [1.0, 1.5, 0.0]])
    close(returns, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    # γ = 0.9, λ = 0.95 (γλ = 0.855). Row 1: δ2 = 1 - 0.7 = 0.3, A2 = 0.3;
    # δ1 = 0.9·0.7 - 0.6 = 0.03, A1 = 0.03 + 0.855·0.3 = 0.2865;
    # δ0 = 0.9·0.6 - 0.5 = 0.04, A0 = 0.04 + 0.855·0.2865 = 0.2849575.
    # Row 2 (two tokens, the value after the last is 0): δ1 = 2 - 0.5 = 1.5, A1 = 1.5;
    # δ0 = 0.9·0.5 - 1.0 = -0.55, A0 = -0.55 + 0.855·1.5 = 0.7325.
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    close(advantages, [[0.2849575, 0.2865, 0.3], [0.7325, 1.5, 0.0]])
    close(returns, [[0.7849575, 0.8865, 1.0], [1.7325, 2.0, 0.0]])
    with pytest.raises(ValueError):
        gae(rewards, values, torch.tensor([[0, 1, 1], [1, 1, 0]]), 1.0, 1.0)


def test_whiten_mean_and_variance():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Masked values 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    sd = math.sqrt(5 / 3 + 1e-8)
    out = whiten(values, mask)
    close(out, [[-1.5 / sd, -0.5 / sd, 0.5 / sd], [1.5 / sd, 0.0, 0.0]])
    kept = out[mask.bool()]
    close(kept.mean(), 0.0)
    close(kept.var(unbiased=True), 1.0, atol=1e-6)
    # shift_mean=False scales the deviations but keeps the mean: (x - 2.5) / sd + 2.5.
    close(whiten(values, mask, shift_mean=False),
          [[2.5 - 1.5 / sd, 2.5 - 0.5 / sd, 2.5 + 0.5 / sd], [2.5 + 1.5 / sd, 0.0, 0.0]])
    with pytest.raises(ValueError):
        whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 1.0, 0.6])
    old = torch.tensor([0.5, 0.5, 0.5])
    returns = torch.tensor([2.0, 0.0, 1.0])
    # 1: clipped v = 0.7; max((1-2)², (0.7-2)²) = 1.69 -> 0.845.  2: max(1², 0.7²) = 1 -> 0.5.
    # 3: inside the clip range, both terms (0.6-1)² = 0.16 -> 0.08.
    close(clipped_value_loss(values, old, returns, clip=0.2), [0.845, 0.5, 0.08])


def test_token_rewards_with_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 7.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, 7.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    score = torch.tensor([2.0, -1.0, 5.0])
    # k1 = logp - ref: row 1 (0.5, 0, -1), row 2 (0.5, 0); -0.1·k1 everywhere, the score on the last token.
    rewards = token_rewards_with_kl(score, logp, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 0.0, 0.1 + 2.0], [-0.05, 0.0 - 1.0, 0.0], [0.0, 0.0, 0.0]])
    k3 = lambda lp, r: math.exp(r - lp) - (r - lp) - 1  # noqa: E731
    rewards = token_rewards_with_kl(score[:1], logp[:1], ref[:1], mask[:1], kl_coef=0.1, kl_estimator="k3")
    close(rewards, [[-0.1 * k3(-1, -1.5), 0.0, -0.1 * k3(-3, -2) + 2.0]])


def test_token_log_probs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 1/4, 3/4
    close(token_log_probs(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    # Temperature 2 halves the logits: probabilities ∝ (1, √3).
    p = 1 / (1 + math.sqrt(3))
    close(token_log_probs(logits, torch.tensor([[0]]), temperature=2.0), [[math.log(p)]])
    assert token_log_probs(logits.bfloat16(), torch.tensor([[0]])).dtype == torch.float32
    assert token_log_probs(logits, torch.tensor([[-100]])).item() == 0.0


# --- gradients --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sequence", "token", "dr_grpo"])
def test_grpo_gradient_is_the_analytic_one(mode):
    g = torch.Generator().manual_seed(2)
    B, T, L = 5, 6, 8
    dt = torch.float64
    logp = (-3 * torch.rand(B, T, generator=g, dtype=dt)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=dt)
    ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=dt)
    advantages = torch.randn(B, generator=g, dtype=dt)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).to(dt)
    beta, eps_low, eps_high = 0.04, 0.2, 0.28

    total, count = aggregate(grpo_token_loss(logp, old, advantages, ref, beta, eps_low, eps_high), mask, mode,
                             max_completion_length=L)
    (total / count).backward()

    # d/dlogp of -min(ρA, clip(ρ)A) is -ρA where the unclipped term is the smaller one, else 0;
    # d/dlogp of k3 = exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp).
    ratio = torch.exp(logp.detach() - old)
    A = advantages.unsqueeze(1).expand(B, T)
    unclipped = torch.where(A > 0, ratio <= 1 + eps_high, ratio >= 1 - eps_low)
    assert unclipped.any() and not unclipped.all()  # the inputs exercise both branches
    per_token_grad = torch.where(unclipped, -ratio * A, 0.0) + beta * (1 - torch.exp(ref - logp.detach()))
    weight = {"sequence": mask / (lengths.unsqueeze(1).to(dt) * B),
              "token": mask / mask.sum(),
              "dr_grpo": mask / (B * L)}[mode]
    close(logp.grad, per_token_grad * weight, atol=1e-6)


# --- TRL parity -------------------------------------------------------------------------------------------

@pytest.fixture
def trl():
    """TRL, or a skip of the test that asks for it (the hand-computed tests above run without it)."""
    return pytest.importorskip("trl")


def parity(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5, absolute (and relative, for the few large gradients)."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=1e-5, rtol=1e-5)


def test_token_log_probs_match_trl(trl):
    from trl.trainer.utils import selective_log_softmax

    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(4, 7, 50, generator=g)).requires_grad_()
    targets = torch.randint(0, 50, (4, 7), generator=g)
    for temperature in (1.0, 0.7):
        ours = token_log_probs(logits, targets, temperature)
        theirs = selective_log_softmax(logits, targets, temperature=temperature)
        parity(ours, theirs)
        (g_ours,) = torch.autograd.grad(ours.sum(), logits)
        (g_theirs,) = torch.autograd.grad(theirs.sum(), logits)
        parity(g_ours, g_theirs)


def trl_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, the
    multi_objective_aggregation == "sum_then_normalize" branch for one reward function (whose
    failures are NaN there), verbatim but for the names of its inputs."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages


def test_group_advantages_match_trl(trl):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(6 * 4, generator=g)
    rewards[[1, 9, 10]] = math.nan  # failed reward functions
    rewards[12:16] = 0.5  # a group with equal rewards
    rewards[[17, 18, 19]] = math.nan  # a group with one valid sample
    for scale in (True, False):
        ours = group_advantages(rewards, 4, scale=scale)
        parity(ours, trl_group_advantages(rewards, 4, "group" if scale else "none"))
        valid = ~torch.isnan(rewards)
        parity(group_advantages(torch.nan_to_num(rewards, nan=123.0), 4, valid=valid, scale=scale), ours)


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize_advantages: bool) -> torch.Tensor:
    """TRL 1.16 trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions, from
    `grouped_rewards` to `nan_to_num` (beta = 0: no KL in the reward), verbatim but for the names of
    its inputs."""
    from trl.trainer.utils import nanstd

    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages


def test_rloo_and_reinforce_plus_plus_advantages_match_trl(trl):
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(6 * 4, generator=g)
    rewards[[1, 9, 10]] = math.nan  # failed reward functions
    rewards[12:16] = 0.5  # a group with equal rewards
    valid = ~torch.isnan(rewards)
    clean = torch.nan_to_num(rewards, nan=123.0)
    parity(rloo_advantages(clean, 4, valid), trl_rloo_advantages(rewards, 4, False))
    parity(normalised_advantages(rloo_advantages(clean, 4, valid), valid), trl_rloo_advantages(rewards, 4, True))
    parity(batch_scaled_advantages(clean, 4, valid), trl_group_advantages(rewards, 4, "batch"))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_matches_trl(trl, beta):
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(8)
    B, T = 6, 7
    logp = (-4 * torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.02 * torch.randn(B, T, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)
    mask = (torch.arange(T) < torch.tensor([7, 1, 3, 5, 2, 6]).unsqueeze(1)).long()
    eps_low, eps_high = 3e-3, 4e-3
    total, count = aggregate(gspo_token_loss(logp, old, advantages, mask, ref, beta, eps_low, eps_high), mask,
                             "sequence")
    ours = total / count
    (g_ours,) = torch.autograd.grad(ours, logp)
    stand_in = grpo_stand_in("grpo", beta, eps_low, eps_high, T, logp, importance_sampling_level="sequence")
    theirs = GRPOTrainer._compute_loss(stand_in, None, trl_grpo_inputs(mask, advantages, old, ref))
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    parity(ours, theirs)
    parity(g_ours, g_theirs)


def trl_grpo_inputs(mask: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor, ref: torch.Tensor) -> dict:
    """The batch GRPOTrainer._compute_loss reads, for completions of the mask's shape (the prompt
    tokens do not matter: the stand-in's forward pass returns the log-probabilities directly)."""
    B, T = mask.shape
    return {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
            "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}


def grpo_stand_in(loss_type: str, beta: float, eps_low: float, eps_high: float, max_completion_length: int,
                  logp: torch.Tensor, importance_sampling_level: str = "token") -> types.SimpleNamespace:
    """The attributes GRPOTrainer._compute_loss reads, for a plain token-level GRPO step on one process
    (no vLLM, no entropy masking or bonus, no off-policy mask, no gradient accumulation). The policy
    forward pass is replaced by `logp`."""
    identity = lambda x, *args, **kwargs: x  # noqa: E731
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance_sampling_level,
        loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
        max_completion_length=max_completion_length, use_vllm=False, vllm_importance_sampling_correction=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=types.SimpleNamespace(num_processes=1, gather=identity, reduce=identity),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))


# TRL loss_type -> orchard aggregation. TRL's "bnpo" is the token mean of one micro-batch and "dapo"
# the token mean over num_items_in_batch; with one micro-batch on one process both are "token".
TRL_LOSS_TYPES = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "dr_grpo"}


@pytest.mark.parametrize("loss_type", sorted(TRL_LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_grpo_loss_matches_trl(trl, loss_type, beta, per_token_advantages):
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(5)
    B, T, L = 6, 7, 9
    eps_low, eps_high = 0.2, 0.28
    logp = (-4 * torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g) if per_token_advantages else torch.randn(B, generator=g)
    mask = (torch.arange(T) < torch.tensor([7, 1, 3, 5, 2, 6]).unsqueeze(1)).long()

    total, count = aggregate(grpo_token_loss(logp, old, advantages, ref, beta, eps_low, eps_high), mask,
                             TRL_LOSS_TYPES[loss_type], max_completion_length=L)
    ours = total / count
    (g_ours,) = torch.autograd.grad(ours, logp)

    stand_in = grpo_stand_in(loss_type, beta, eps_low, eps_high, L, logp)
    theirs = GRPOTrainer._compute_loss(stand_in, None, trl_grpo_inputs(mask, advantages, old, ref))
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    parity(ours, theirs)
    parity(g_ours, g_theirs)


def test_grpo_on_policy_matches_trl_without_old_logps(trl):
    # One update per generation: TRL uses logp.detach() as the old log-probs, as old_logp=None does here.
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(6)
    logp = (-4 * torch.rand(3, 4, generator=g)).requires_grad_()
    advantages, mask = torch.randn(3, generator=g), torch.ones(3, 4, dtype=torch.long)
    total, count = aggregate(grpo_token_loss(logp, None, advantages), mask, "sequence")
    inputs = {"prompt_ids": torch.zeros(3, 1, dtype=torch.long), "prompt_mask": torch.ones(3, 1, dtype=torch.long),
              "completion_ids": torch.zeros(3, 4, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages}
    theirs = GRPOTrainer._compute_loss(grpo_stand_in("grpo", 0.0, 0.2, 0.2, 4, logp), None, inputs)
    parity(total / count, theirs)
    parity(*(torch.autograd.grad(x, logp)[0] for x in (total / count, theirs)))


# TRL's PPO (trl/experimental/ppo/ppo_trainer.py, and trl/trainer/ppo_trainer.py before it moved to
# experimental) is not in TRL 1.16: the reference functions below are its lines, verbatim.


def trl_masked_mean(values, mask, axis=None):
    """huggingface/trl trl/experimental/ppo/ppo_trainer.py, masked_mean."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    """huggingface/trl trl/experimental/ppo/ppo_trainer.py, masked_var."""
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    """huggingface/trl trl/experimental/ppo/ppo_trainer.py, masked_whiten."""
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_gae(values, rewards, mask, gamma, lam):
    """huggingface/trl trl/trainer/ppo_trainer.py, PPOTrainer.loss (the classic PPOTrainer; the same loop
    is step 6 of trl/experimental/ppo/ppo_trainer.py PPOTrainer.train), up to `returns`."""
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]

    values = values * mask
    rewards = rewards * mask

    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)

    returns = advantages + values
    return advantages, returns


def trl_ppo_losses(vpreds, values, returns, logprobs, old_logprobs, advantages, mask, cliprange, cliprange_value):
    """huggingface/trl trl/trainer/ppo_trainer.py, PPOTrainer.loss, the value and policy losses
    (clip_by_value written as torch.clamp, which TRL's experimental PPO uses)."""
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)

    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)

    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    return pg_loss, vf_loss


def trl_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef):
    """huggingface/trl trl/trainer/ppo_trainer.py, PPOTrainer.compute_rewards (self.kl_ctl.value as kl_coef)."""
    rewards, non_score_rewards = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        # compute KL penalty (from difference in logprobs)
        kl = logprob - ref_logprob
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]

        # reward is preference model score + KL penalty
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards)


def ppo_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    lengths = torch.tensor([6, 2, 4, 1, 5])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()
    return g, B, T, lengths, mask


def test_whiten_matches_trl_masked_whiten():
    g, B, T, _, mask = ppo_batch(7)
    values = 3 * torch.randn(B, T, generator=g) + 1
    for shift_mean in (True, False):
        ours = whiten(values, mask, shift_mean=shift_mean)
        theirs = trl_masked_whiten(values, mask, shift_mean=shift_mean)
        parity(ours, theirs * mask)  # TRL masks the positions outside afterwards; here they are 0 already


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.95)])
def test_gae_matches_trl(gamma, lam):
    g, B, T, _, mask = ppo_batch(8)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    trl_advantages, trl_returns = trl_gae(values, rewards, mask, gamma, lam)
    parity(advantages, trl_advantages * mask)
    parity(returns, trl_returns * mask)
    # And the whitened advantages PPO trains on.
    parity(whiten(advantages, mask), trl_masked_whiten(trl_advantages, mask) * mask)


def test_ppo_policy_and_value_losses_match_trl():
    g, B, T, _, mask = ppo_batch(9)
    logp = (-3 * torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    vpreds = torch.randn(B, T, generator=g).requires_grad_()
    old_values = vpreds.detach() + 0.3 * torch.randn(B, T, generator=g)
    advantages, returns = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    pg_total, count = aggregate(clipped_surrogate(logp, old, advantages, 0.2, 0.2), mask, "token")
    vf_total, _ = aggregate(clipped_value_loss(vpreds, old_values, returns, 0.2), mask, "token")
    pg_ours, vf_ours = pg_total / count, vf_total / count
    pg_theirs, vf_theirs = trl_ppo_losses(vpreds, old_values, returns, logp, old, advantages, mask, 0.2, 0.2)
    parity(pg_ours, pg_theirs)
    parity(vf_ours, vf_theirs)
    parity(*(torch.autograd.grad(x, logp)[0] for x in (pg_ours, pg_theirs)))
    parity(*(torch.autograd.grad(x, vpreds)[0] for x in (vf_ours, vf_theirs)))


def test_token_rewards_match_trl_compute_rewards():
    g, B, T, _, mask = ppo_batch(10)
    logp, ref = -3 * torch.rand(B, T, generator=g), -3 * torch.rand(B, T, generator=g)
    score = torch.randn(B, generator=g)
    rewards, _ = trl_compute_rewards(score, logp, ref, mask, kl_coef=0.05)
    parity(token_rewards_with_kl(score, logp, ref, mask, kl_coef=0.05), rewards * mask)


def test_experimental_trl_ppo_puts_the_score_one_token_later():
    """Convention difference. TRL's later PPO (trl/experimental/ppo/ppo_trainer.py PPOTrainer.train,
    steps 4-6, transcribed below) adds the score at `sequence_length + 1`, the first padding position
    (when the row has one), and keeps the value there. Here, as in InstructGPT and TRL's classic
    PPOTrainer.compute_rewards, it is on the last completion token and the value after it is 0.
    The advantages and returns on the completion tokens agree when λ = 1 and γ = 1 (A_t and R_t
    both telescope to the reward-to-go); otherwise the later TRL discounts the score by one extra
    step and bootstraps from the padding position's value."""
    g, B, T, lengths, mask = ppo_batch(11)
    logp, ref = -3 * torch.rand(B, T, generator=g), -3 * torch.rand(B, T, generator=g)
    values, score = torch.randn(B, T, generator=g), torch.randn(B, generator=g)

    def experimental_trl(gamma, lam, kl_coef=0.05):
        sequence_lengths = lengths - 1
        response_idxs = torch.arange(T).repeat(B, 1)
        padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
        logprobs = torch.masked_fill(logp, padding_mask, 1.0)  # INVALID_LOGPROB
        ref_logprobs = torch.masked_fill(ref, padding_mask, 1.0)
        sequence_lengths_p1 = sequence_lengths + 1
        padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
        values_ = torch.masked_fill(values, padding_mask_p1, 0)
        logr = ref_logprobs - logprobs
        kl = -logr
        non_score_reward = -kl_coef * kl
        rewards = non_score_reward.clone()
        actual_start = torch.arange(rewards.size(0), device=rewards.device)
        actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
        rewards[actual_start, actual_end] += score
        lastgaelam = 0
        advantages_reversed = []
        gen_length = T
        for t in reversed(range(gen_length)):
            nextvalues = values_[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values_[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values_
        return advantages * mask, returns * mask

    def ours(gamma, lam):
        return gae(token_rewards_with_kl(score, logp, ref, mask, kl_coef=0.05), values, mask, gamma, lam)

    for a, b in zip(ours(1.0, 1.0), experimental_trl(1.0, 1.0)):
        parity(a, b)
    full = lengths == T  # a row without padding has its score on its last token in both
    for a, b in zip(ours(0.9, 0.95), experimental_trl(0.9, 0.95)):
        parity(a[full], b[full])
        assert not torch.allclose(a[~full], b[~full], atol=1e-3)
