"""Metrics against hand-computed values."""

import math

import pytest
import torch

from distill.classification_params import RegistryConfig
from distill.evaluation import _text_read, expected_calibration_error, gap_closed, passes_gate, quality_metrics
from distill.report import COLUMNS, compare_table


def test_gap_closed_is_the_share_of_the_teacher_baseline_gap():
    assert gap_closed(teacher=0.97, student=0.95, baseline=0.87) == pytest.approx(0.8)
    assert gap_closed(teacher=0.9, student=0.8, baseline=0.9) is None
    assert gap_closed(teacher=0.938, student=0.938, baseline=0.965) is None  # a losing teacher: not 100 %
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


def row(accuracy: float, params: int, latency: float) -> dict:
    return dict(test_accuracy=accuracy, nll=1 - accuracy, ece=0.01, teacher_agreement=accuracy, kl_from_teacher=0.1,
                entropy=0.2, params=params, checkpoint_bytes=4 * params, latency_ms_b1=latency,
                latency_ms_batch=10 * latency, above_majority_p_value=0.0)


def test_the_comparison_table_puts_each_models_numbers_in_its_row_under_the_right_heading():
    metrics = {"teacher": row(0.9, 147_000, 0.75), "student": row(0.85, 8_000, 0.25),
               "baseline": row(0.7, 8_000, 0.5), "gap_closed": 0.75,
               "test_split": {"rows": 1000, "majority_class": "cat", "majority_rate": 0.5, "one_class": {}},
               "student_vs_baseline": {"difference": 0.15, "p_value": 1e-9, "wins": 200, "losses": 50, "rows": 1000}}
    metrics["student"] |= {"test_accuracy_ci95_low": 0.827, "test_accuracy_ci95_high": 0.871}
    lines = compare_table(metrics).splitlines()
    headings = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert headings == ["model", *(heading for _, heading, _, _ in COLUMNS)]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]}
    assert list(cells) == ["teacher", "student", "baseline"]
    column = {heading: i + 1 for i, (_, heading, _, _) in enumerate(COLUMNS)}
    assert cells["teacher"][column["test accuracy"]] == "90.00%"
    assert cells["student"][column["test accuracy"]] == "85.00%"
    assert cells["baseline"][column["parameters"]] == "8,000"
    assert cells["student"][column["ms at batch 1"]] == "0.250"
    assert cells["student"][column["95% interval"]] == "82.7%–87.1%"
    assert cells["teacher"][column["95% interval"]] == "–"  # none given
    assert lines[6].endswith(": 75.0%")


@pytest.mark.parametrize("accuracy, latency, passed", [(0.95, 10.0, True), (0.9499, 1.0, False), (0.99, 10.01, False)])
def test_the_registry_gate_needs_both_accuracy_and_speed(accuracy, latency, passed):
    gate = RegistryConfig(min_test_accuracy=0.95, max_latency_ms_b1=10.0)
    assert passes_gate({"test_accuracy": accuracy, "latency_ms_b1": latency}, gate).passed is passed


def test_the_report_says_how_much_of_the_median_document_the_models_read():
    said = _text_read({"max_length": 64, "median_tokens": 678, "cut_fraction": 0.99})
    assert "the first 64 tokens of each text, 9% of the median document's 678" in said
    assert "99% of documents are cut (data.text.max_length)" in said
    assert "100% of the median document's 20" in _text_read({"max_length": 64, "median_tokens": 20,
                                                            "cut_fraction": 0.0})
    assert _text_read(None) == "" and _text_read({"max_length": 64}) == ""  # vectors; text prepared before it
