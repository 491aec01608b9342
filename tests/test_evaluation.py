"""Metrics against hand-computed values."""

import math

import pytest
import torch

from distill.evaluation import compare_table, expected_calibration_error, gap_closed, quality_metrics


def test_gap_closed_is_the_share_of_the_teacher_baseline_gap():
    assert gap_closed(teacher=0.97, student=0.95, baseline=0.87) == pytest.approx(0.8)
    assert gap_closed(teacher=0.9, student=0.8, baseline=0.9) is None
    # Hinton et al. 2015: 67 / 146 / 74 errors -> 91 %
    assert gap_closed(1 - 67e-4, 1 - 74e-4, 1 - 146e-4) == pytest.approx(72 / 79)


def test_ece_of_a_hand_made_case():
    # two rows at confidence 0.9 (one right), two at 0.6 (both right)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(expected)


def test_quality_metrics_of_a_perfect_copy_of_the_teacher():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    m = quality_metrics(logits, labels, logits, ece_bins=10)
    p = 1 / (1 + math.exp(-2))
    assert m["test_accuracy"] == pytest.approx(2 / 3)
    assert m["teacher_agreement"] == 1.0 and m["kl_from_teacher"] == pytest.approx(0, abs=1e-7)
    assert m["nll"] == pytest.approx((-2 * math.log(p) - math.log(1 - p)) / 3, rel=1e-5)
    assert m["entropy"] == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-5)


def test_the_comparison_table_has_a_row_per_model_and_the_headline():
    row = dict(test_accuracy=0.9, nll=0.3, ece=0.01, teacher_agreement=0.9, kl_from_teacher=0.1, entropy=0.2,
               params=1000, checkpoint_bytes=5000, latency_ms_b1=0.1, latency_ms_batch=1.0)
    table = compare_table({"teacher": row, "student": row, "baseline": row, "gap_closed": 0.5})
    assert "| teacher |" in table and "| student |" in table and "| baseline |" in table
    assert "50.0%" in table
