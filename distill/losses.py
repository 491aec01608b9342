"""Distillation losses: pure functions of logits and labels.

The models know nothing of these; the training loop passes teacher logits read
from the soft-label Parquet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELED = -1


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows; rows labelled -1 are ignored.

    Returns 0 (not NaN) for a batch with no labelled rows.
    """
    labelled = labels != UNLABELED
    total = F.cross_entropy(logits, labels, ignore_index=UNLABELED, reduction="sum")
    return total / labelled.sum().clamp(min=1)


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
    return {"loss": alpha * t * t * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}
