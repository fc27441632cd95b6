"""Preference-optimisation losses as pure functions of sequence log-probabilities.

Each takes per-example log-probabilities of the chosen and rejected responses (summed over their
tokens for DPO and IPO as the papers define them; averaged per token for SimPO and ORPO, which are
length-normalised) and returns per-example losses. The batch construction that produces the
log-probabilities belongs to the method that uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), sigmoid form, with conservative label smoothing ε (cDPO):
    -(1-ε) log σ(β h) - ε log σ(-β h), where h = (chosen - ref_chosen) - (rejected - ref_rejected)."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2β))², with h the same log-ratio difference as DPO (unscaled);
    β plays the role of the paper's τ."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log σ(β (chosen - rejected) - γ) on per-token
    average log-probabilities, with the same label smoothing as DPO."""
    margin = beta * (chosen_mean - rejected_mean) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor,
              weight: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024): the chosen response's NLL minus λ log σ(log odds ratio), where the
    odds of a response are p/(1-p) with p its per-token average probability.

    -log σ(log odds) is computed as log1p(e^r (e^-c - 1) / (1 - e^r)) (c, r the chosen and rejected
    means), which equals it exactly but stays finite, with a finite gradient, when the chosen reply
    is certain (c = 0), where log(1 - e^c) is -inf. The rejected mean is kept below -1e-6 for the
    same reason.
    """
    rejected_mean = rejected_mean.clamp(max=-1e-6)
    ratio = torch.exp(rejected_mean) * torch.expm1(-chosen_mean) / -torch.expm1(rejected_mean)
    return chosen_nll + weight * torch.log1p(ratio)


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): an estimate of KL(policy || reference), the
    mean log-ratio of completions paired with prompts they do not answer, clamped at 0 and without
    gradient (TRL's `kl`)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO on unpaired examples (Eqn. 7 of Ethayarajh et al. 2024): with r = β (logps - ref_logps),
    a desirable completion costs w_d (1 - σ(r - β z0)), an undesirable one w_u (1 - σ(β z0 - r)):
    each is pushed away from the reference point `reference_point` (z0, `kto_reference_point`)
    on its own side. `desirable` (B,) bool; returns (B,) losses (TRL's, in the batch's order)."""
    logratio = logps - ref_logps
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratio - reference_point)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratio)))
    return torch.where(desirable.bool(), chosen, rejected)
