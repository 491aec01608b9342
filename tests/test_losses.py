"""The Hinton KD loss against hand-computed values and its defining properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import cross_entropy, kd_loss


def two_class_case():
    # student is indifferent; the teacher prefers class 0 three to one at T = 1
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    return student, teacher, torch.tensor([0])


def test_kd_loss_matches_hand_computed_value_at_t1():
    student, teacher, labels = two_class_case()
    out = kd_loss(student, teacher, labels, temperature=1.0, alpha=0.5)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # teacher (3/4, 1/4) vs (1/2, 1/2)
    ce = -math.log(0.5)
    assert out["kd"].item() == pytest.approx(kl, abs=1e-6)
    assert out["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * kl + 0.5 * ce, abs=1e-6)


def test_kd_loss_matches_hand_computed_value_at_t2_with_the_t_squared_factor():
    student, teacher, labels = two_class_case()
    out = kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0)
    p = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln 3 / 2, 0])[0]
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert out["kd"].item() == pytest.approx(kl, abs=1e-6)
    assert out["loss"].item() == pytest.approx(4 * kl, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10.0])
def test_alpha_zero_is_plain_cross_entropy(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 5, generator=gen), torch.randn(16, 5, generator=gen)
    labels = torch.randint(0, 5, (16,), generator=gen)
    out = kd_loss(student, teacher, labels, temperature, alpha=0.0)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(student, labels).item(), abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_alpha_one_is_t_squared_times_the_kl_term(temperature):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    out = kd_loss(student, teacher, torch.zeros(8, dtype=torch.long), temperature, alpha=1.0)
    assert out["loss"].item() == pytest.approx(temperature**2 * out["kd"].item(), rel=1e-6)


def test_kd_term_is_zero_when_student_logits_equal_teacher_logits():
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(2))
    out = kd_loss(logits, logits.clone(), torch.zeros(10, dtype=torch.long), temperature=3.0, alpha=0.7)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7)


def test_kd_term_is_invariant_to_a_constant_shift_of_teacher_logits():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    labels = torch.zeros(4, dtype=torch.long)
    a = kd_loss(student, teacher, labels, 2.0, 1.0)["kd"]
    b = kd_loss(student, teacher + 5.0, labels, 2.0, 1.0)["kd"]
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_unlabelled_rows_contribute_the_kd_term_only():
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.tensor([1, 2, 3, -1, -1, -1])
    out = kd_loss(student, teacher, labels, 2.0, 0.5)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(student[:3], labels[:3]).item(), abs=1e-6)
    kl_all = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
    assert out["kd"].item() == pytest.approx(kl_all.item(), abs=1e-6)


def test_a_batch_of_only_unlabelled_rows_has_zero_cross_entropy_not_nan():
    assert cross_entropy(torch.randn(3, 4), torch.tensor([-1, -1, -1])).item() == 0.0


def test_kd_gradient_pulls_the_student_towards_the_teacher():
    student, teacher, labels = two_class_case()
    student.requires_grad_(True)
    kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0)["loss"].backward()
    assert student.grad[0, 0] < 0 < student.grad[0, 1]  # raise class 0, lower class 1
