"""Knowledge-distillation losses as pure functions of tensors.

Conventions (those of `orchard.losses.tokens`)
-----------------------------------------------
- Student logits (B, T, V) are aligned with `labels` (B, T): logits[:, t] predict labels[:, t].
  Positions whose label is IGNORE_INDEX (prompt tokens, padding) contribute nothing: they are
  dropped before anything is computed, so their logits (even inf or NaN) affect neither the value
  nor the gradient.
- Every loss returns the SUM over counted positions; the training engine divides by the count of
  all micro-batches (see `orchard.losses.rl`). Computed in fp32 whatever the input dtype.
- The teacher is given densely, as logits (B, T, V) from a model run alongside the student (online
  distillation), or sparsely, as a `SparseTeacher`: its top-k token ids and their log-probabilities,
  which is what an offline cache stores (V floats per token do not fit on disk; k of them do).
  The teacher is a target: it is detached, so no gradient reaches it.
- Divergences at a temperature T compare the distributions softmax(z / T) and are multiplied by T²
  (Hinton et al. 2015): the gradient of KL(p_T || q_T) with respect to the student's logits is
  (q_T - p_T) / T, so without the factor a higher temperature would also shrink the step; with it
  the gradient is T (q_T - p_T), which tends to (z_s - z_t) / V (zero-mean logits) as T grows, the
  logit-matching limit, instead of vanishing.

tests/test_distill_losses.py checks values against hand-computed ones and `generalized_jsd`
against TRL 1.16's `GKDTrainer.generalized_jsd_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchard.losses.tokens import IGNORE_INDEX, token_cross_entropy

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher's top-k next-token distribution at each position, as an offline cache stores it.

    `ids` (B, T, k) int64: the k most probable token ids; `log_probs` (B, T, k) float: their
    log-probabilities under the teacher's full softmax at temperature 1 (so they sum to at most 1 in
    probability: the tail is not stored).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor

    def __post_init__(self):
        if self.ids.shape != self.log_probs.shape:
            raise ValueError(f"SparseTeacher ids {tuple(self.ids.shape)} and log_probs "
                             f"{tuple(self.log_probs.shape)} must have the same shape")


def top_k_teacher(teacher_logits: torch.Tensor, k: int) -> SparseTeacher:
    """The `k` most probable tokens of each position of `teacher_logits` (..., V) and their
    log-probabilities under the full softmax (temperature 1), most probable first, in fp32."""
    vocab = teacher_logits.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    log_probs, ids = torch.topk(F.log_softmax(teacher_logits.detach().float(), dim=-1), k, dim=-1)
    return SparseTeacher(ids=ids, log_probs=log_probs)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_teacher(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher) -> None:
    if isinstance(teacher, SparseTeacher):
        if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"SparseTeacher positions {tuple(teacher.ids.shape[:-1])} do not match the student's "
                             f"{tuple(student_logits.shape[:-1])}")
    elif teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} must have the student's shape "
                         f"{tuple(student_logits.shape)}")


def teacher_and_student_log_probs(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher,
                                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher_logp, student_logp), both (B, T, S) fp32, log-probabilities at `temperature` of
    the two models on a common support of S tokens at each position. (Any leading shape works:
    the losses call it on the (N, V) rows of the counted positions.)

    Dense teacher (logits (B, T, V)): S = V, log_softmax(logits / T) for both.

    Sparse teacher: S = k, the teacher's ids. The teacher's top-k is renormalised at temperature T,
    log_softmax(teacher.log_probs / T) over k: since log p = z - logsumexp(z), this is the softmax
    of the teacher's logits / T restricted to the k ids, whatever the tail was. The student's
    log_softmax(student_logits / T) is gathered at the same ids and renormalised over them (equal
    to log_softmax of its gathered logits / T, which is how it is computed). With k = V this is the
    dense computation exactly.

    Why renormalise, rather than use the student's full-vocabulary log-probabilities at the k ids:
    reverse KL and JSD take expectations under the student and a mixture, which need both models as
    distributions on one support; the teacher's tail is unknown, so that support is the k ids. The
    student's mass outside them is then unconstrained by the divergence, but the hard-label
    cross-entropy term of `distillation_loss` keeps pushing probability onto the right token.
    """
    _check_temperature(temperature)
    _check_teacher(student_logits, teacher)
    student = student_logits.float()
    if isinstance(teacher, SparseTeacher):
        student = student.gather(-1, teacher.ids.long())
        teacher_logits = teacher.log_probs.detach().float()
    else:
        teacher_logits = teacher.detach().float()
    if temperature != 1.0:
        student, teacher_logits = student / temperature, teacher_logits / temperature
    return F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student, dim=-1)


def _counted(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor):
    """The student's and the teacher's rows at the positions whose label is not IGNORE_INDEX."""
    _check_teacher(student_logits, teacher)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be the logits' positions {tuple(student_logits.shape[:-1])}")
    mask = labels != IGNORE_INDEX
    if isinstance(teacher, SparseTeacher):
        return student_logits[mask], SparseTeacher(ids=teacher.ids[mask], log_probs=teacher.log_probs[mask])
    return student_logits[mask], teacher[mask]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Summed KL(p || q) = Σ p (log p - log q) over the last dimension and all rows.

    Terms with p = 0 are 0, as the definition has it: a teacher may give a token log-probability
    -inf (a vocabulary padded with masked logits, a cache padded past its last token), where
    F.kl_div, which TRL uses, returns NaN (0 · -inf)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum()


def forward_kl(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Σ over counted positions of T² KL(p_teacher,T || q_student,T): the classic KD loss (Hinton et
    al. 2015). Mass-covering: the student is penalised wherever the teacher has mass it lacks."""
    _check_temperature(temperature)
    student, teacher = _counted(student_logits, teacher, labels)
    teacher_logp, student_logp = teacher_and_student_log_probs(student, teacher, temperature)
    return temperature ** 2 * _kl(teacher_logp, student_logp)


def reverse_kl(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Σ over counted positions of T² KL(q_student,T || p_teacher,T) (MiniLLM, Gu et al. 2023).
    Mode-seeking: a small student puts its mass on the teacher's main modes instead of spreading it
    over everything the teacher finds plausible."""
    _check_temperature(temperature)
    student, teacher = _counted(student_logits, teacher, labels)
    teacher_logp, student_logp = teacher_and_student_log_probs(student, teacher, temperature)
    return temperature ** 2 * _kl(student_logp, teacher_logp)


def generalized_jsd(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Σ over counted positions of T² JSD_β (GKD, Agarwal et al. 2024), in TRL's convention
    (`GKDTrainer.generalized_jsd_loss`): with the mixture m = β p_teacher + (1-β) q_student (in
    probability), JSD_β = β KL(p || m) + (1-β) KL(q || m). The two ends, where that expression is 0,
    are special-cased as TRL does: β = 0 is forward KL(p || q), β = 1 reverse KL(q || p).

    TRL does not multiply by T² and divides by the number of counted tokens ("batchmean" with
    labels); this returns the sum times T², like the other divergences here, so TRL's value is
    this / T² / count.
    """
    _check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    student, teacher = _counted(student_logits, teacher, labels)
    teacher_logp, student_logp = teacher_and_student_log_probs(student, teacher, temperature)
    if beta == 0:
        jsd = _kl(teacher_logp, student_logp)
    elif beta == 1:
        jsd = _kl(student_logp, teacher_logp)
    else:
        # log m = logsumexp(log q + log(1-β), log p + log β): the mixture in log space, stably.
        mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
        jsd = beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)
    return temperature ** 2 * jsd


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor,
                      divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
                      beta: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts): α · divergence + (1-α) · hard-label cross-entropy, both summed over counted
    positions (the cross-entropy at temperature 1, `losses.token_cross_entropy`).

    `divergence` is "forward_kl", "reverse_kl" or "jsd" (`generalized_jsd` with `beta`), at
    `temperature` and times T². α = 1 is pure distillation, α = 0 plain training on the labels.
    `parts` = {"kd": divergence, "ce": cross-entropy}, detached summed tensors for logging (no
    host sync here).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _check_temperature(temperature)
    if divergence == "forward_kl":
        kd = forward_kl(student_logits, teacher, labels, temperature)
    elif divergence == "reverse_kl":
        kd = reverse_kl(student_logits, teacher, labels, temperature)
    else:
        kd = generalized_jsd(student_logits, teacher, labels, beta=beta, temperature=temperature)
    ce = token_cross_entropy(student_logits, labels)
    total = alpha * kd + (1 - alpha) * ce
    return total, {"kd": kd.detach(), "ce": ce.detach()}


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                      projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Hidden-state matching (TinyBERT, Jiao et al. 2020): Σ over positions where `mask` (B, T) is
    True of the mean over the teacher's width of (W h_student - h_teacher)², in fp32.

    `student_hidden` (B, T, ds) goes through `projection` (an nn.Linear ds -> dt, trained with the
    student) when the widths differ; with None the widths must match (ValueError otherwise). The
    per-token mean over dimensions, rather than a sum, keeps the loss's scale independent of the
    width, so one weight suits any pair of models. The teacher's states are detached.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"and mask {tuple(mask.shape)} must share their (B, T)")
    if projection is None and student_hidden.size(-1) != teacher_hidden.size(-1):
        raise ValueError(f"student width {student_hidden.size(-1)} differs from the teacher's "
                         f"{teacher_hidden.size(-1)}: pass a projection")
    mask = mask.bool()
    student = student_hidden[mask]
    if projection is not None:
        student = projection(student)
        if student.size(-1) != teacher_hidden.size(-1):
            raise ValueError(f"projection maps to width {student.size(-1)}, the teacher's is {teacher_hidden.size(-1)}")
    diff = student.float() - teacher_hidden[mask].detach().float()
    return (diff ** 2).mean(-1).sum()
