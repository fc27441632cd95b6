"""Distillation losses against values computed by hand and against TRL 1.16's GKD loss."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.losses.distillation import (
    SparseTeacher,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    reverse_kl,
    teacher_and_student_log_probs,
    top_k_teacher,
)
from orchard.losses.tokens import IGNORE_INDEX, token_cross_entropy

DIVERGENCE_FUNCTIONS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
                        "jsd": lambda s, t, labels, temperature=1.0: generalized_jsd(s, t, labels, beta=0.3,
                                                                                     temperature=temperature)}


# --- pure-Python reference formulas -------------------------------------------------------------------


def softmax(z: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(x / temperature) for x in z]
    return [x / sum(e) for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd(p: list[float], q: list[float], beta: float) -> float:
    """TRL's generalised JSD: mixture β p + (1-β) q, β KL(p || m) + (1-β) KL(q || m)."""
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# --- 1. hand-computed values, V = 3 ----------------------------------------------------------------------

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 2.0]]


def small_example():
    """One sequence of two positions over a vocabulary of 3, both counted."""
    return torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([[1, 2]])


@pytest.mark.parametrize("temperature, pinned", [(1.0, (0.9783327249086828, 1.0892632634678918, 0.2314408684627657)),
                                                 (2.0, (1.2892197102849055, 1.3512967831155287, 0.321924589650059))])
def test_divergences_match_hand_computed_values(temperature, pinned):
    student, teacher, labels = small_example()
    T = temperature
    p = [softmax(t, T) for t in TEACHER]
    q = [softmax(s, T) for s in STUDENT]
    # Σ over positions of KL of the tempered distributions, times T² (4 at T = 2).
    expected_forward = T ** 2 * sum(kl(a, b) for a, b in zip(p, q))
    expected_reverse = T ** 2 * sum(kl(b, a) for a, b in zip(p, q))
    expected_jsd = T ** 2 * sum(jsd(a, b, 0.5) for a, b in zip(p, q))
    assert (expected_forward, expected_reverse, expected_jsd) == pytest.approx(pinned, abs=1e-12)
    close(forward_kl(student, teacher, labels, temperature=T), expected_forward)
    close(reverse_kl(student, teacher, labels, temperature=T), expected_reverse)
    close(generalized_jsd(student, teacher, labels, beta=0.5, temperature=T), expected_jsd)


def test_temperature_two_is_four_times_the_kl_of_the_tempered_distributions():
    student, teacher, labels = small_example()
    # softmax(z / 2) = softmax of the logits halved at temperature 1.
    for loss in (forward_kl, reverse_kl, generalized_jsd):
        close(loss(student, teacher, labels, temperature=2.0), 4 * loss(student / 2, teacher / 2, labels).item())


def test_jsd_ends_are_the_two_kls_as_trl_special_cases_them():
    student, teacher, labels = small_example()
    for T in (1.0, 2.0):
        close(generalized_jsd(student, teacher, labels, beta=0.0, temperature=T), forward_kl(student, teacher, labels, T))
        close(generalized_jsd(student, teacher, labels, beta=1.0, temperature=T), reverse_kl(student, teacher, labels, T))


def test_a_teacher_token_of_probability_zero_contributes_zero():
    # A teacher with a masked (-inf) logit, as a padded vocabulary has: F.kl_div would return NaN.
    student = torch.tensor([[[1.0, 2.0, 0.5]]])
    teacher = torch.tensor([[[2.0, float("-inf"), 1.0]]])
    labels = torch.tensor([[0]])
    p, q = softmax([2.0, 1.0]), softmax(STUDENT[0])
    close(forward_kl(student, teacher, labels), kl([p[0], 0.0, p[1]], q))
    assert torch.isfinite(generalized_jsd(student, teacher, labels, beta=0.5))


# --- 2. the T² factor ----------------------------------------------------------------------------------


def random_logits(seed: int, shape=(2, 3, 7), scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_gradient_is_t_times_q_minus_p(temperature):
    # d/dz_s [T² KL(p_T || q_T)] = T² · (q_T - p_T) / T = T (q_T - p_T).
    student, teacher = random_logits(0)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, 3, 4]])
    student.requires_grad_()
    (grad,) = torch.autograd.grad(forward_kl(student, teacher, labels, temperature=temperature), student)
    expected = temperature * (torch.softmax(student.detach() / temperature, -1) - torch.softmax(teacher / temperature, -1))
    expected[labels == IGNORE_INDEX] = 0.0
    close(grad, expected, tol=1e-6)


def test_forward_kl_gradient_tends_to_logit_matching_at_high_temperature():
    # Hinton et al.: with zero-mean logits, T (q_T - p_T) → (z_s - z_t) / V as T grows: the gradient
    # keeps the size of logit matching instead of shrinking like 1/T. The error is O(|z|² / (T V)).
    student, teacher = random_logits(1, scale=1.0)
    student, teacher = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    limit = (student - teacher) / student.size(-1)
    student.requires_grad_()
    (grad,) = torch.autograd.grad(forward_kl(student, teacher, labels, temperature=1000.0), student)
    torch.testing.assert_close(grad, limit, atol=1e-3, rtol=0)  # measured: 2e-4 at T = 1000, 2e-3 at T = 100
    assert limit.abs().max() > 0.1


# --- 3. sparse (top-k) teachers ------------------------------------------------------------------------


def test_top_k_teacher_keeps_the_k_most_probable_tokens():
    logits = torch.tensor([[[0.1, 3.0, -1.0, 2.0, 0.5]]])
    sparse = top_k_teacher(logits, 2)
    assert sparse.ids.tolist() == [[[1, 3]]] and sparse.ids.dtype == torch.int64
    probs = softmax([0.1, 3.0, -1.0, 2.0, 0.5])
    close(sparse.log_probs, [[[math.log(probs[1]), math.log(probs[3])]]])
    teacher, _ = random_logits(2, shape=(2, 3, 11))
    ids = top_k_teacher(teacher, 4).ids
    assert torch.equal(ids, teacher.argsort(-1, descending=True)[..., :4])
    with pytest.raises(ValueError, match="k must"):
        top_k_teacher(teacher, 12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", list(DIVERGENCE_FUNCTIONS))
def test_top_k_with_k_equal_to_the_vocabulary_is_the_dense_loss(name, temperature):
    loss = DIVERGENCE_FUNCTIONS[name]
    student, teacher = random_logits(3)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [0, 3, 4]])
    dense_student, sparse_student = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense = loss(dense_student, teacher, labels, temperature=temperature)
    sparse = loss(sparse_student, top_k_teacher(teacher, teacher.size(-1)), labels, temperature=temperature)
    close(sparse, dense.item(), tol=1e-5)
    (dense_grad,) = torch.autograd.grad(dense, dense_student)
    (sparse_grad,) = torch.autograd.grad(sparse, sparse_student)
    close(sparse_grad, dense_grad, tol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_distributions_are_renormalised_on_the_teachers_ids(temperature):
    student, teacher = random_logits(4, shape=(2, 3, 11))
    sparse = top_k_teacher(teacher, 4)
    assert (sparse.log_probs.exp().sum(-1) < 1).all()  # the tail is not stored
    teacher_logp, student_logp = teacher_and_student_log_probs(student, sparse, temperature)
    assert teacher_logp.shape == student_logp.shape == (2, 3, 4)
    close(teacher_logp.exp().sum(-1), torch.ones(2, 3))
    close(student_logp.exp().sum(-1), torch.ones(2, 3))
    # Independently: the full tempered softmax of each model, restricted to the ids, renormalised.
    for full, logp in ((torch.softmax(teacher / temperature, -1), teacher_logp),
                       (torch.softmax(student / temperature, -1), student_logp)):
        restricted = full.gather(-1, sparse.ids)
        close(logp.exp(), restricted / restricted.sum(-1, keepdim=True))


def test_sparse_forward_kl_is_the_kl_of_the_restricted_distributions():
    student, teacher = random_logits(5, shape=(1, 1, 6))
    sparse = top_k_teacher(teacher, 3)
    ids = sparse.ids[0, 0].tolist()
    z_s, z_t = student[0, 0].tolist(), teacher[0, 0].tolist()
    p = softmax([z_t[i] for i in ids], 2.0)
    q = softmax([z_s[i] for i in ids], 2.0)
    close(forward_kl(student, sparse, torch.tensor([[0]]), temperature=2.0), 4 * kl(p, q))


# --- 4. parity with TRL's GKDTrainer.generalized_jsd_loss --------------------------------------------------
#
# TRL's loss (trl/experimental/gkd/gkd_trainer.py, a static method) takes student and teacher logits,
# labels with -100, β and a temperature; with labels and reduction "batchmean" it sums the per-token
# divergence over tokens whose label is not -100 and divides by their number. It does not multiply by
# T². Orchard's losses return the sum times T², so ours / T² / count is compared.


@pytest.fixture
def trl():
    """TRL, or a skip of the test that asks for it (the hand-computed tests above run without it)."""
    return pytest.importorskip("trl", reason="TRL is not installed: the parity tests call its GKDTrainer")


def trl_jsd(student, teacher, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)


def parity_batch(seed: int):
    """B=2, T=5, V=11 with four positions at -100."""
    student, teacher = random_logits(seed, shape=(2, 5, 11))
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 3:] = IGNORE_INDEX
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(trl, beta, temperature):
    student, teacher, labels = parity_batch(6)
    count = (labels != IGNORE_INDEX).sum().item()
    ours_student, theirs_student = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = generalized_jsd(ours_student, teacher, labels, beta=beta, temperature=temperature) / temperature ** 2 / count
    theirs = trl_jsd(theirs_student, teacher, labels, beta, temperature)
    close(ours, theirs.item(), tol=1e-5)
    (ours_grad,) = torch.autograd.grad(ours, ours_student)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_student)
    close(ours_grad, theirs_grad, tol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_are_trls_beta_zero_and_one(trl, temperature):
    student, teacher, labels = parity_batch(7)
    count = (labels != IGNORE_INDEX).sum().item()
    for loss, beta in ((forward_kl, 0.0), (reverse_kl, 1.0)):
        close(loss(student, teacher, labels, temperature) / temperature ** 2 / count,
              trl_jsd(student, teacher, labels, beta, temperature).item(), tol=1e-5)


# --- 5. masking, mixing, hidden states, validation -----------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(DIVERGENCE_FUNCTIONS))
def test_ignored_positions_contribute_nothing(name, sparse):
    loss = DIVERGENCE_FUNCTIONS[name]
    student, teacher = random_logits(8)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, 3, 4]])
    ignored = labels == IGNORE_INDEX
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[ignored] = torch.randn(2, 7) * 10
    changed_teacher[ignored] = float("nan")  # not even read
    as_teacher = (lambda t: top_k_teacher(t, 4)) if sparse else (lambda t: t)
    reference = loss(student, as_teacher(teacher), labels, temperature=2.0)
    changed_student.requires_grad_()
    changed = loss(changed_student, as_teacher(changed_teacher), labels, temperature=2.0)
    close(changed, reference.item())
    (grad,) = torch.autograd.grad(changed, changed_student)
    assert torch.equal(grad[ignored], torch.zeros(2, 7))


def test_distillation_loss_mixes_with_alpha_exactly():
    student, teacher = random_logits(9)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [0, 3, 4]])
    ce = token_cross_entropy(student, labels)
    for divergence, function in (("forward_kl", forward_kl), ("reverse_kl", reverse_kl)):
        kd = function(student, teacher, labels, temperature=2.0)
        total, parts = distillation_loss(student, teacher, labels, divergence, temperature=2.0, alpha=0.0)
        assert torch.equal(total, ce)
        total, parts = distillation_loss(student, teacher, labels, divergence, temperature=2.0, alpha=1.0)
        assert torch.equal(total, kd)
        total, parts = distillation_loss(student.requires_grad_(), teacher, labels, divergence,
                                         temperature=2.0, alpha=0.3)
        close(total, (0.3 * kd + 0.7 * ce).item())
        assert total.requires_grad and not parts["kd"].requires_grad and not parts["ce"].requires_grad
        close(parts["kd"], kd.item())
        close(parts["ce"], ce.item())
        student = student.detach()
    total, parts = distillation_loss(student, teacher, labels, "jsd", alpha=0.6, beta=0.9)
    close(parts["kd"], generalized_jsd(student, teacher, labels, beta=0.9).item())
    close(total, (0.6 * parts["kd"] + 0.4 * parts["ce"]).item())


def test_losses_are_fp32_for_bf16_inputs():
    student, teacher = (t.bfloat16() for t in random_logits(10))
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [0, 3, 4]])
    for loss in DIVERGENCE_FUNCTIONS.values():
        value = loss(student, teacher, labels, temperature=2.0)
        assert value.dtype == torch.float32
        close(value, loss(student.float(), teacher.float(), labels, temperature=2.0).item())
    total, _ = distillation_loss(student, top_k_teacher(teacher, 3), labels)
    assert total.dtype == torch.float32


def test_hidden_state_loss_is_the_per_token_mean_squared_error_summed_over_the_mask():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 6.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # ((1-0)² + 0²) / 2 + (0² + (4-6)²) / 2 = 0.5 + 2.
    close(hidden_state_loss(student, teacher, mask), 2.5)


def test_hidden_state_loss_projects_the_student_to_the_teachers_width():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True]])
    projection = torch.nn.Linear(2, 3)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        projection.bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
    # Projected: [1, 1, 3] and [3, 3, 7]; squared errors [0, 1, 1] / 3 and [9, 9, 49] / 3.
    loss = hidden_state_loss(student, teacher, mask, projection)
    close(loss, 2 / 3 + 67 / 3, tol=1e-5)
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(student, teacher, mask)
    with pytest.raises(ValueError, match="projection maps"):
        hidden_state_loss(student, teacher, mask, torch.nn.Linear(2, 4))


@pytest.mark.parametrize("call, argument", [
    (lambda s, t, y: forward_kl(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: reverse_kl(s, t, y, temperature=-1.0), "temperature"),
    (lambda s, t, y: generalized_jsd(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: teacher_and_student_log_probs(s, t, temperature=0.0), "temperature"),
    (lambda s, t, y: distillation_loss(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: generalized_jsd(s, t, y, beta=-0.1), "beta"),
    (lambda s, t, y: generalized_jsd(s, t, y, beta=1.5), "beta"),
    (lambda s, t, y: distillation_loss(s, t, y, beta=1.5), "beta"),
    (lambda s, t, y: distillation_loss(s, t, y, alpha=-0.1), "alpha"),
    (lambda s, t, y: distillation_loss(s, t, y, alpha=1.1), "alpha"),
    (lambda s, t, y: distillation_loss(s, t, y, divergence="kl"), "divergence"),
    (lambda s, t, y: forward_kl(s, t[:, :2], y), "teacher logits"),
    (lambda s, t, y: forward_kl(s, top_k_teacher(t[:, :2], 3), y), "SparseTeacher"),
    (lambda s, t, y: SparseTeacher(ids=torch.zeros(1, 2, 3, dtype=torch.long), log_probs=torch.zeros(1, 2, 4)),
     "SparseTeacher"),
])
def test_invalid_arguments_are_value_errors_naming_them(call, argument):
    student, teacher = random_logits(11)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=argument):
        call(student, teacher, labels)
