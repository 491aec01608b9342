"""Distillation losses: pure functions of logits and labels (Hinton KD, decoupled KD, logit matching).

The models know nothing of these; the training loop passes teacher logits read
from the soft-label Parquet. `Distillation` holds a student's loss settings;
`rank_share` splits a batch's loss terms between torchrun processes so that they
add up to the whole batch's.

Losses are a registry: `register_loss(name)` adds one, `get_loss(name)` finds it. A loss is
called as `loss(student_logits, teacher, labels, temperature, alpha, **options)` and returns
its parts, "loss" the total. This module registers `kd`, `dkd` and `mse`; distill.lm_losses registers
the language model's `forward_kl`, `reverse_kl`, `jsd`, `skew_kl` and `tvd` (this module never
imports it, so a classifier's code does not include the language model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distill.classification_params import StudentConfig
from distill.registry import Registry

UNLABELED = -1

Loss = Callable[..., dict[str, torch.Tensor]]
LOSSES = Registry("loss")
register_loss = LOSSES.register


def get_loss(name: str) -> Loss:
    """The loss registered as `name`."""
    return LOSSES.find(name)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows; rows labelled -1 are ignored.

    Returns 0 (not NaN) for a batch with no labelled rows.
    """
    labelled = labels != UNLABELED
    total = F.cross_entropy(logits, labels, ignore_index=UNLABELED, reduction="sum")
    return total / labelled.sum().clamp(min=1)


def total(kd: torch.Tensor, ce: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Both losses' total: alpha * T^2 * kd + (1 - alpha) * ce."""
    return alpha * temperature * temperature * kd + (1 - alpha) * ce


@register_loss("kd")
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Knowledge-distillation loss of Hinton, Vinyals and Dean (2015).

        loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
               + (1 - alpha) * CE(z_s, y)

    The KL term is averaged over every row (transfer rows included); the
    cross-entropy over labelled rows only (label -1 marks an unlabelled row). The
    T^2 factor keeps the soft-target gradients on the same scale as T changes.

    Args:
        student_logits: (N, C) student outputs z_s.
        teacher_logits: (N, C) stored teacher outputs z_t (raw logits).
        labels: (N,) class ids, -1 for unlabelled rows.
        temperature: T > 0.
        alpha: weight of the distillation term, in [0, 1].

    Returns:
        {"loss": the total, "kd": the KL divergence at temperature T (before the
        T^2 and alpha factors), "ce": the cross-entropy}.
    """
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    ce = cross_entropy(student_logits, labels)
    return {"loss": total(kd, ce, temperature, alpha), "kd": kd, "ce": ce}


@register_loss("dkd")
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    target_weight: float = 1.0,
    nontarget_weight: float = 8.0,
) -> dict[str, torch.Tensor]:
    """Decoupled knowledge distillation (DKD) of Zhao, Cui, Song, Qiu and Liang (CVPR 2022).

    With p = softmax(z / T) for teacher (t) and student (s) and g the target class:

        b    = [p_g, 1 - p_g]                          target vs the rest, binary
        p^   = softmax(z_j / T) over the classes j != g  the non-target classes alone
        TCKD = KL(b_t || b_s)                          target-class KD
        NCKD = KL(p^_t || p^_s)                        non-target-class KD
        loss = alpha * T^2 * (a * TCKD + b * NCKD) + (1 - alpha) * CE(z_s, y)

    Hinton's KL(p_t || p_s) equals TCKD + (1 - p_g,t) * NCKD: the non-target term is
    damped exactly when the teacher is confident. DKD weighs the two terms
    independently (a = `target_weight`, b = `nontarget_weight`; the paper uses a = 1,
    b = 8 on CIFAR-100). The target g is the label on labelled rows and the teacher's
    top class on unlabelled transfer rows, which have no label.

    Returns:
        {"loss": the total, "kd": a * TCKD + b * NCKD (before T^2 and alpha), "tckd",
        "nckd", "ce": the cross-entropy over labelled rows}.
    """
    t = temperature
    teacher_logits = teacher_logits.float()
    target = torch.where(labels != UNLABELED, labels, teacher_logits.argmax(dim=1))
    is_target = F.one_hot(target, student_logits.shape[1]).bool()
    tckd = _binary_kl(teacher_logits / t, student_logits / t, is_target)
    # Non-target distributions: the target logit pushed far below the rest (finite, so no NaN).
    nt_t = F.log_softmax((teacher_logits / t).masked_fill(is_target, -1e9), dim=1)
    nt_s = F.log_softmax((student_logits / t).masked_fill(is_target, -1e9), dim=1)
    nckd = (nt_t.exp() * (nt_t - nt_s)).sum(dim=1).mean()
    kd = target_weight * tckd + nontarget_weight * nckd
    ce = cross_entropy(student_logits, labels)
    return {"loss": total(kd, ce, temperature, alpha), "kd": kd, "tckd": tckd, "nckd": nckd, "ce": ce}


@register_loss("mse")
def logit_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Logit matching: the squared difference of the student's and the teacher's logits, as Ba
    and Caruana (2014) and Tang et al. (2019, BERT into a BiLSTM on augmented text) train.

        loss = alpha * mean_j (z_s,j - z_t,j)^2 + (1 - alpha) * CE(z_s, y)

    Unlike the KL at a temperature, it keeps how far apart the teacher puts the classes when its
    softmax saturates (two classes: a margin of 6 and one of 12 give probabilities 0.998 and
    0.999994, and near-equal KL targets). The mean runs over rows and classes (Tang et al. sum
    over the classes: C times this, the same up to alpha's scale). "kd" is the mean of the
    squares at temperature T, so that total's T^2 * kd is the plain mean whatever T: the
    temperature does not change this loss (the logged kd does, as 1 / T^2).

    Returns:
        {"loss": the total, "kd": the mean squared difference of z / T, "ce": the cross-entropy}.
    """
    t = temperature
    kd = F.mse_loss(student_logits / t, teacher_logits.float() / t)
    ce = cross_entropy(student_logits, labels)
    return {"loss": total(kd, ce, temperature, alpha), "kd": kd, "ce": ce}


def _binary_kl(teacher_scaled: torch.Tensor, student_scaled: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Mean KL([p_g, 1 - p_g]_t || [p_g, 1 - p_g]_s), from logits already divided by T."""

    def log_binary(z: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(z, dim=1)
        target = logp.masked_fill(~is_target, float("-inf")).logsumexp(dim=1)
        rest = logp.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
        return torch.stack([target, rest], dim=1)

    log_t, log_s = log_binary(teacher_scaled), log_binary(student_scaled)
    p_t = log_t.exp()
    # 0 * log 0 = 0 where the teacher puts all its mass on one side
    return torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(dim=1).mean()


@dataclass(frozen=True)
class Distillation:
    """The KD loss settings, and where the teacher's logits come from.

    Offline (the pipeline): the training rows carry the stored soft labels.
    Online (`teacher` given, rows without logits): the teacher runs forward on every
    batch, as in a one-script distillation; kept to measure what offline saves.
    """

    temperature: float
    alpha: float
    teacher: nn.Module | None = None
    loss: str = "kd"  # a registered loss's name (get_loss)
    loss_options: dict = field(default_factory=dict)  # dkd: target_weight, nontarget_weight

    @staticmethod
    def of(cfg: StudentConfig, teacher: nn.Module | None = None) -> Distillation:
        options = {"target_weight": cfg.dkd_target_weight, "nontarget_weight": cfg.dkd_nontarget_weight}
        return Distillation(cfg.temperature, cfg.alpha, teacher, cfg.loss, options if cfg.loss == "dkd" else {})

    def __call__(self, student_logits, teacher_logits, labels) -> dict[str, torch.Tensor]:
        return get_loss(self.loss)(student_logits, teacher_logits, labels, self.temperature, self.alpha,
                                   **self.loss_options)


def rank_share(parts: dict[str, torch.Tensor], row_share: float, labelled_share: float,
               distillation: Distillation | None) -> dict[str, torch.Tensor]:
    """One process's shares of a global batch's loss terms, which sum over the processes to
    what one process computes on the whole batch.

    A mean over rows (the KD terms) is weighted by the process's share of the batch's rows;
    the cross-entropy, a mean over labelled rows, by its share of the labelled rows. The
    total is rebuilt from the weighted parts (it is linear in them).
    """
    if distillation is None:
        return {"loss": parts["loss"] * labelled_share}
    shares = {k: v * (labelled_share if k == "ce" else row_share) for k, v in parts.items() if k != "loss"}
    shares["loss"] = total(shares["kd"], shares["ce"], distillation.temperature, distillation.alpha)
    return shares
