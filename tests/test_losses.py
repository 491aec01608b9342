"""The Hinton KD and decoupled KD losses against hand-computed values and their defining properties,
and the loss registry."""

import ast
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from distill import lm_losses, sparse
from distill.errors import UserError
from distill.losses import (LOSSES, Distillation, cross_entropy, dkd_loss, get_loss, kd_loss, logit_mse_loss,
                            register_loss)


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


# ---------------------------------------------------------------- decoupled KD


def test_dkd_matches_hand_computed_values_at_t1():
    # teacher [ln 6, ln 2, 0] -> p_t = (6, 2, 1) / 9; student indifferent -> p_s = (1, 1, 1) / 3; target 0
    student, teacher = torch.zeros(1, 3), torch.tensor([[math.log(6.0), math.log(2.0), 0.0]])
    out = dkd_loss(student, teacher, torch.tensor([0]), temperature=1.0, alpha=1.0, target_weight=2.0,
                   nontarget_weight=3.0)
    tckd = (6 / 9) * math.log((6 / 9) / (1 / 3)) + (3 / 9) * math.log((3 / 9) / (2 / 3))  # b = (2/3, 1/3) vs (1/3, 2/3)
    nckd = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)  # p^ = (2/3, 1/3) vs (1/2, 1/2)
    assert out["tckd"].item() == pytest.approx(tckd, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, abs=1e-6)
    assert out["kd"].item() == pytest.approx(2 * tckd + 3 * nckd, abs=1e-6)
    assert out["loss"].item() == pytest.approx(2 * tckd + 3 * nckd, abs=1e-6)


def test_dkd_at_t2_has_the_t_squared_factor_and_mixes_in_cross_entropy():
    student, teacher = torch.tensor([[0.5, 0.0, -0.5]]), torch.tensor([[2.0, 0.0, 0.0]])
    labels = torch.tensor([1])
    out = dkd_loss(student, teacher, labels, temperature=2.0, alpha=0.25)
    ce = F.cross_entropy(student, labels).item()
    assert out["loss"].item() == pytest.approx(0.25 * 4 * out["kd"].item() + 0.75 * ce, abs=1e-6)
    # non-target classes for target 1 are {0, 2}: teacher softmax([1, 0]) vs student softmax([0.25, -0.25])
    pt, ps = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-0.5))
    nckd = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    assert out["nckd"].item() == pytest.approx(nckd, abs=1e-6)


def test_hinton_kd_is_tckd_plus_damped_nckd():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(64, 10, generator=gen), 3 * torch.randn(64, 10, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    for row in range(4):
        s, t, y = student[row : row + 1], teacher[row : row + 1], labels[row : row + 1]
        parts = dkd_loss(s, t, y, temperature=1.0, alpha=1.0)
        p_target = torch.softmax(t, 1)[0, y[0]].item()
        expected = parts["tckd"].item() + (1 - p_target) * parts["nckd"].item()
        assert kd_loss(s, t, y, temperature=1.0, alpha=1.0)["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_dkd_uses_the_teachers_top_class_on_unlabelled_rows_and_has_finite_gradients():
    student = torch.randn(5, 4, requires_grad=True)
    teacher = torch.tensor([[50.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 3.0], [1.0, 2, 3, 4]])
    unlabelled = dkd_loss(student, teacher, torch.full((5,), -1), temperature=1.0, alpha=0.9)
    as_labels = dkd_loss(student, teacher, teacher.argmax(1), temperature=1.0, alpha=1.0)
    assert unlabelled["kd"].item() == pytest.approx(as_labels["kd"].item(), abs=1e-6)
    assert unlabelled["ce"].item() == 0.0
    unlabelled["loss"].backward()
    assert torch.isfinite(student.grad).all()


def test_dkd_is_zero_when_the_student_copies_the_teacher():
    teacher = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    out = dkd_loss(teacher.clone(), teacher, torch.arange(8) % 6, temperature=4.0, alpha=1.0)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_logit_mse_matches_hand_computed_value_and_ignores_the_temperature():
    student, teacher, labels = two_class_case()  # logits (0, 0) against (ln 3, 0)
    mse = math.log(3.0) ** 2 / 2  # the mean over the two classes of the squared differences
    for t in (1.0, 2.0, 4.0):
        out = logit_mse_loss(student, teacher, labels, temperature=t, alpha=0.25)
        assert out["kd"].item() == pytest.approx(mse / t**2, abs=1e-6)
        assert out["loss"].item() == pytest.approx(0.25 * mse + 0.75 * -math.log(0.5), abs=1e-6)


def test_logit_mse_tells_a_saturated_teacher_apart_where_the_kl_barely_does():
    student = torch.tensor([[3.0, 0.0]])
    near, far = torch.tensor([[6.0, 0.0]]), torch.tensor([[12.0, 0.0]])
    mse = [logit_mse_loss(student, z, torch.tensor([0]), 1.0, 1.0)["loss"].item() for z in (near, far)]
    kl = [kd_loss(student, z, torch.tensor([0]), 1.0, 1.0)["loss"].item() for z in (near, far)]
    assert mse == pytest.approx([4.5, 40.5])  # (3^2 + 0) / 2 and (9^2 + 0) / 2
    assert kl[1] / kl[0] < 1.5  # twice the margin: 9 times the squared error, not half again the KL


def test_kd_dkd_and_the_language_models_divergences_are_registered_by_name():
    assert get_loss("kd") is kd_loss and get_loss("dkd") is dkd_loss and get_loss("mse") is logit_mse_loss
    assert get_loss("forward_kl") is lm_losses.forward_kl_loss and get_loss("tvd") is lm_losses.tvd_loss


def test_an_unknown_loss_is_refused_in_one_sentence_naming_the_known_ones():
    with pytest.raises(UserError, match=r"^loss hinton is not known: use one of dkd, forward_kl, jsd, kd, mse, reverse_kl, skew_kl, tvd$"):
        get_loss("hinton")


@pytest.fixture
def ce_only_loss():
    """A loss registered for one test, and removed again after it."""

    @register_loss("ce_only")
    def ce_only(student_logits, teacher_logits, labels, temperature, alpha):
        ce = cross_entropy(student_logits, labels)
        return {"loss": ce, "kd": torch.zeros(()), "ce": ce}

    yield ce_only
    del LOSSES["ce_only"]


def test_a_registered_loss_is_found_by_name_and_used_by_the_distillation_settings(ce_only_loss):
    assert get_loss("ce_only") is ce_only_loss
    student, teacher, labels = two_class_case()
    parts = Distillation(temperature=2.0, alpha=0.9, loss="ce_only")(student, teacher, labels)
    assert parts["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_a_loss_name_is_registered_once():
    with pytest.raises(ValueError, match="loss kd is registered already"):
        register_loss("kd")(dkd_loss)


def test_the_classifier_losses_import_nothing_of_the_language_model():
    tree = ast.parse((REPO / "distill" / "losses.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {n for n in names if n and n.rsplit(".", 1)[-1] in ("sparse", "lm", "lm_losses")}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_forward_kl_mixes_the_mean_kl_to_the_stored_targets_with_the_next_token_cross_entropy(temperature):
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    kept = sparse.select(teacher, "top_k", 4)
    targets = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    parts = lm_losses.forward_kl_loss(student, targets, labels, temperature, alpha=0.25, tail="bucket")
    kl = lm_losses.kl_to_targets(student, targets, temperature, "bucket").mean()
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["loss"], 0.25 * temperature**2 * kl + 0.75 * ce)
