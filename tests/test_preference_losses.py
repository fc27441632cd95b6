"""Preference losses against values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.losses.preference import dpo_loss, ipo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_matches_the_formula_with_and_without_label_smoothing():
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) = 1 - (-1) = 2, so β h = 0.2.
    args = [torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -13.0)]
    assert dpo_loss(*args, beta=0.1).item() == pytest.approx(-log_sigmoid(0.2), abs=1e-6)
    smoothed = -(0.9 * log_sigmoid(0.2) + 0.1 * log_sigmoid(-0.2))
    assert dpo_loss(*args, beta=0.1, label_smoothing=0.1).item() == pytest.approx(smoothed, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-14.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-11.0]), torch.tensor([-13.0]), beta=0.5).sum().backward()
    # d/d chosen of -log σ(β h) = -β (1 - σ(β h)) with β h = 1.
    expected = -0.5 * (1 - 1 / (1 + math.exp(-1.0)))
    assert chosen.grad.item() == pytest.approx(expected, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(-expected, abs=1e-6)


def test_kto_by_hand():
    logps, ref = torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-4.0, -4.0, -4.0])
    desirable = torch.tensor([True, False, True])
    z0 = kto_reference_point(torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -3.0]))
    assert z0.item() == 0.0  # mean log-ratio (1 - 3) / 2 = -1, clamped at 0
    z0 = kto_reference_point(torch.tensor([-2.0, -2.5]), torch.tensor([-3.0, -3.0]))
    assert z0.item() == pytest.approx(0.75)
    losses = kto_loss(logps, ref, desirable, z0, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sigmoid(0.5 * (1.0 - 0.75)), 2 * (1 - sigmoid(0.5 * (0.75 + 1.0))), 1 - sigmoid(0.5 * (0 - 0.75))]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-6, rtol=0)


def test_ipo_matches_the_formula():
    args = [torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -13.0)]
    assert ipo_loss(*args, beta=0.25).item() == pytest.approx((2.0 - 2.0) ** 2, abs=1e-6)
    assert ipo_loss(*args, beta=0.1).item() == pytest.approx((2.0 - 5.0) ** 2, abs=1e-5)


def test_simpo_matches_the_formula():
    loss = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * 0.5 - 0.5), abs=1e-6)


def test_orpo_matches_the_formula():
    chosen_mean, rejected_mean, nll = -0.5, -1.2, 0.5
    odds = lambda lp: math.log(math.exp(lp) / (1 - math.exp(lp)))  # noqa: E731
    expected = nll - 0.1 * log_sigmoid(odds(chosen_mean) - odds(rejected_mean))
    loss = orpo_loss(torch.tensor([chosen_mean]), torch.tensor([rejected_mean]), torch.tensor([nll]), weight=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# --- parity with TRL 1.16 ------------------------------------------------------------------------------
#
# Orchard's losses are compared, per example and in their gradients with respect to every input, with
# TRL's own code: DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) and the experimental
# CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss, each called unbound with a stand-in `self`
# holding the attributes it reads. Convention differences, and how the tests line them up:
#
# - DPO label smoothing. Orchard's ε is conservative DPO (cDPO): -(1-ε) log σ(βh) - ε log σ(-βh).
#   TRL 1.16's DPOTrainer no longer applies label_smoothing to loss_type="sigmoid" (it uses it only
#   for "robust", which is rDPO, (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1-2ε), a different loss, and
#   for "exo_pair"/"aot"). The cDPO formula is still TRL's CPOTrainer.cpo_loss "sigmoid" form, which
#   is computed on whatever difference it is given: fed the log-ratios h it is cDPO.
# - IPO. TRL 1.16 divides each response's log-ratio by its number of completion tokens before
#   taking h (confirmed with the IPO authors, per its comment); orchard's ipo_loss takes h from what
#   it is given, the summed log-probabilities as the paper writes it. Fed per-token averages it is
#   TRL's loss exactly, which is what is compared.
# - SimPO is CPOTrainer with loss_type="simpo" (and cpo_alpha=0, which adds no NLL): TRL writes the
#   margin as β((c - r) - γ/β), orchard as β(c - r) - γ; the same number.
# - ORPO. TRL's odds_ratio_loss returns β log σ(log odds), which the trainer subtracts from an NLL
#   that it computes over prompt and response tokens of the whole batch (one token mean); orchard's
#   orpo_loss takes the NLL per example from its caller and weighs the odds term by λ (TRL's β).
#   Compared: orpo_loss(c, r, nll=0, weight=β) against -odds_ratio_loss(c, r)[0].


@pytest.fixture
def trl():
    """TRL, or a skip of the test that asks for it (the hand-computed tests above run without it)."""
    return pytest.importorskip("trl")


def parity(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5, absolute (and relative, for the large ORPO gradients near log-probability 0)."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=1e-5, rtol=1e-5)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


B = 8


def random_sequences(seed: int):
    """A batch of 8 chosen/rejected pairs as per-token log-probabilities (realistic: -0.01 to -5 per token)
    over ragged completions, with their reference model's summed log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    lengths = torch.randint(2, T, (2 * B,), generator=g)
    # Row layout of TRL's DPO batch: [chosen..., rejected...], each a prompt token then the completion.
    completion_mask = torch.zeros(2 * B, T + 1, dtype=torch.long)
    completion_mask[:, 1:] = (torch.arange(T) < lengths.unsqueeze(1)).long()
    per_token = -torch.exp(torch.empty(2 * B, T).uniform_(math.log(0.01), math.log(5.0), generator=g))
    per_token = per_token * completion_mask[:, 1:]
    ref = per_token.sum(1) + 2.0 * torch.randn(2 * B, generator=g)
    return per_token, ref, completion_mask


def dpo_stand_in(loss_type: str, beta: float, per_token: torch.Tensor):
    """The attributes DPOTrainer._compute_loss reads, with precomputed reference log-probabilities and
    the model replaced by one whose `log_probs` are `per_token` (zero outside the completions, as the
    fused LM head returns them for labels -100)."""
    from collections import defaultdict
    from types import SimpleNamespace

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool), aux_loss=None)

    identity = lambda x: x  # noqa: E731
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1), model


def trl_dpo(loss_type: str, beta: float, per_token: torch.Tensor, ref: torch.Tensor, completion_mask: torch.Tensor):
    """TRL's DPOTrainer._compute_loss on the batch: the mean over its pairs."""
    from trl import DPOTrainer

    stand_in, model = dpo_stand_in(loss_type, beta, per_token)
    n = per_token.size(0) // 2
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def trl_dpo_per_pair(loss_type, beta, per_token, ref, completion_mask) -> torch.Tensor:
    """TRL's loss of each pair alone (a batch of one)."""
    n = per_token.size(0) // 2
    return torch.stack([trl_dpo(loss_type, beta, per_token[[i, n + i]], ref[[i, n + i]], completion_mask[[i, n + i]])
                        for i in range(n)])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(trl, beta):
    per_token, ref, completion_mask = random_sequences(0)
    per_token, ref = leaves(per_token, ref)
    logps = per_token.sum(1)
    ours = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta)
    parity(ours, trl_dpo_per_pair("sigmoid", beta, per_token, ref, completion_mask))
    theirs = trl_dpo("sigmoid", beta, per_token, ref, completion_mask)
    parity(ours.mean(), theirs)
    for a, b in zip(grads(ours.mean(), [per_token, ref]), grads(theirs, [per_token, ref])):
        parity(a, b)


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)])
def test_kto_matches_trl(trl, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss, called unbound with a stand-in `self` and a model that returns
    given per-token log-probabilities; reference log-probabilities precomputed, as TRL can."""
    import types
    from collections import defaultdict

    from trl import KTOTrainer

    g = torch.Generator().manual_seed(9)
    n, T = 6, 8
    mask = (torch.arange(T) >= torch.tensor([2, 3, 1, 4, 2, 5]).unsqueeze(1)).long()  # the completion's tokens
    per_token = (-3 * torch.rand(n, T - 1, generator=g) * mask[:, 1:]).requires_grad_()
    ref = per_token.detach().sum(-1) + 0.7 * torch.randn(n, generator=g)
    kl_logps, ref_kl = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
    labels = torch.tensor([True, False, True, True, False, False])
    identity = lambda x, *args, **kwargs: x  # noqa: E731
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), _compute_kl_logps=lambda model, batch: kl_logps,
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=identity),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros(n, T - 1)
    model = lambda **kwargs: types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)  # noqa: E731
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": mask, "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    theirs = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    # TRL orders desirable examples first; the mean does not care.
    ours = kto_loss(per_token.sum(-1), ref, labels, kto_reference_point(kl_logps, ref_kl), beta, desirable_weight,
                    undesirable_weight).mean()
    parity(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, per_token)
    (g_theirs,) = torch.autograd.grad(theirs, per_token)
    parity(g_ours, g_theirs)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_on_per_token_averages_matches_trl(trl, beta):
    per_token, ref, completion_mask = random_sequences(1)
    per_token, ref = leaves(per_token, ref)
    lengths = completion_mask.sum(1).float()
    averages, ref_averages = per_token.sum(1) / lengths, ref / lengths
    ours = ipo_loss(averages[:B], averages[B:], ref_averages[:B], ref_averages[B:], beta=beta)
    parity(ours, trl_dpo_per_pair("ipo", beta, per_token, ref, completion_mask))
    theirs = trl_dpo("ipo", beta, per_token, ref, completion_mask)
    parity(ours.mean(), theirs)
    for a, b in zip(grads(ours.mean(), [per_token, ref]), grads(theirs, [per_token, ref])):
        parity(a, b)


def cpo_stand_in(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.5):
    """The attributes CPOTrainer.cpo_loss reads (AlphaPO off)."""
    from types import SimpleNamespace

    return SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"), loss_type=loss_type, beta=beta,
                           label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)


def random_pairs(seed: int, low: float = -5.0, high: float = -0.01) -> list[torch.Tensor]:
    """Four (B,) tensors of realistic summed log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    return leaves(*(torch.empty(B).uniform_(20 * low, 20 * high, generator=g) for _ in range(4)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_is_trl_cdpo(trl, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    inputs = random_pairs(2)
    chosen, rejected, ref_chosen, ref_rejected = inputs
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=label_smoothing)
    # cpo_loss's "sigmoid" form, given the log-ratios instead of policy log-probabilities.
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_stand_in("sigmoid", 0.1, label_smoothing),
                                       chosen - ref_chosen, rejected - ref_rejected)
    parity(ours, theirs)
    for a, b in zip(grads(ours.sum(), inputs), grads(theirs.sum(), inputs)):
        parity(a, b)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(trl, beta, gamma, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    inputs = leaves(*(torch.empty(B).uniform_(-3.0, -0.05, generator=g) for _ in range(2)))  # per-token averages
    ours = simpo_loss(*inputs, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_stand_in("simpo", beta, label_smoothing, simpo_gamma=gamma), *inputs)
    parity(ours, theirs)
    for a, b in zip(grads(ours.sum(), inputs), grads(theirs.sum(), inputs)):
        parity(a, b)


def orpo_inputs(seed: int) -> list[torch.Tensor]:
    """Per-token average log-probabilities of 8 pairs. ORPO's NLL term drives the chosen average
    towards 0, so the chosen ones include confident responses (-1e-3 to -1e-6 nats per token)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.cat([torch.empty(4).uniform_(-2.5, -0.05, generator=g),
                        torch.tensor([-1e-2, -1e-3, -1e-5, -1e-6])])
    rejected = torch.empty(B).uniform_(-3.0, -0.2, generator=g)
    return leaves(chosen, rejected)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_odds_ratio_term_matches_trl(trl, beta):
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    inputs = orpo_inputs(4)
    ours = orpo_loss(*inputs, chosen_nll=torch.zeros(B), weight=beta)
    theirs, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu")),
                                             *inputs)
    parity(ours, -theirs)
    for a, b in zip(grads(ours.sum(), inputs), grads(-theirs.sum(), inputs)):
        parity(a, b)


def test_orpo_gradient_is_finite_for_a_chosen_reply_of_probability_one():
    chosen, rejected = leaves(torch.tensor([-1e-8, 0.0]), torch.tensor([-1.0, -1.0]))
    loss = orpo_loss(chosen, rejected, chosen_nll=torch.zeros(2), weight=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), chosen)
    # As the chosen average → 0, λ σ(-log odds) d(log odds)/d chosen → λ e^r / (1 - e^r).
    limit = -0.1 * math.exp(-1.0) / (1 - math.exp(-1.0))
    torch.testing.assert_close(grad, torch.full((2,), limit), atol=1e-5, rtol=1e-5)
