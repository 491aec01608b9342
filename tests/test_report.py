"""The run report: its parts exist, its numbers are the metrics', its figures are real PNGs."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pytest
import torch
from PIL import Image

from distill import report
from distill.evaluation import Evaluation, gap_closed, noise_metrics, reliability_bins

CLASSES = ["cat", "dog", "fox"]


def model_metrics(accuracy: float, params: int, latency: float) -> dict:
    return {"test_accuracy": accuracy, "nll": 1 - accuracy, "ece": 0.05, "teacher_agreement": accuracy,
            "kl_from_teacher": 0.1, "entropy": 0.3, "params": params, "checkpoint_bytes": 4 * params,
            "latency_ms_b1": latency, "latency_ms_batch": 10 * latency}


def inputs(teacher=0.9, student=0.85, baseline=0.7) -> Evaluation:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    predictions, bins, histories = {}, {}, {}
    for name, acc in (("teacher", teacher), ("student", student), ("baseline", baseline)):
        wrong = rng.random(300) > acc
        predictions[name] = np.where(wrong, (labels + 1) % 3, labels)
        logits = torch.randn(300, 3) + 3 * torch.nn.functional.one_hot(torch.as_tensor(predictions[name]), 3)
        bins[name] = reliability_bins(logits.softmax(1), torch.as_tensor(labels), 10)
        histories[name] = [{"epoch": e, "val_accuracy": acc * e / 5, "val_loss": 1 / e} for e in range(1, 6)]
    metrics = {"teacher": model_metrics(teacher, 50_000, 2.0), "student": model_metrics(student, 5_000, 0.5),
               "baseline": model_metrics(baseline, 5_000, 0.5)}
    for key, values in noise_metrics(labels, predictions, CLASSES).items():
        metrics[key] = metrics.get(key, {}) | values
    metrics["gap_closed"] = gap_closed(teacher, student, baseline)
    return Evaluation(metrics, histories, labels, predictions, bins, CLASSES, described="3 classes")


def test_report_has_headline_table_and_every_figure(tmp_path):
    out = report.write_report(inputs(), tmp_path / "report.html", tmp_path / "figures")
    page = (tmp_path / "report.html").read_text()
    # the headline: (0.85 - 0.7) / (0.9 - 0.7) = 75 % of the gap, 10x fewer parameters, both latencies
    assert out["headline"].startswith("Distillation closed 75% of the teacher-baseline gap")
    assert "10.0x fewer parameters" in out["headline"] and "0.50 ms (teacher: 2.00 ms)" in out["headline"]
    assert 'id="headline"' in page and html.escape(out["headline"]) in page
    # the comparison table: a row per model, with the metrics' own numbers
    for name, acc in (("teacher", "90.00%"), ("student", "85.00%"), ("baseline", "70.00%")):
        row = re.search(rf"<tr><th><span[^>]*></span>{name}</th>(.*?)</tr>", page)
        assert row and acc in row.group(1)
    assert 'class="better"' in page  # the student beats the baseline on accuracy
    # four figures, embedded as PNGs, and the same PNGs on disk for dvc plots
    embedded = dict(re.findall(r'<figure id="(\w+)"><img alt="\w+" src="data:image/png;base64,([^"]+)"', page))
    assert set(embedded) == set(report.FIGURES) == set(out["figures"])
    for name, data in embedded.items():
        png = tmp_path / "figures" / f"{name}.png"
        assert base64.b64decode(data) == png.read_bytes()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300


@pytest.mark.parametrize("teacher, baseline, verb", [(0.8, 0.8, "ties with"), (0.938, 0.965, "does worse than")])
def test_a_teacher_that_does_not_beat_the_baseline_gets_no_gap_closed_and_the_headline_says_why(
        tmp_path, teacher, baseline, verb):
    losing = inputs(teacher=teacher, student=teacher, baseline=baseline)
    assert losing.metrics["gap_closed"] is None
    said = report.headline(losing.metrics)
    assert said.startswith(f"No gap to close: the teacher ({100 * teacher:.1f}%) {verb} the baseline "
                           f"({100 * baseline:.1f}%), so there is nothing to distil")
    assert "closed" not in said and "100%" not in said
    assert f"n/a (the teacher ({100 * teacher:.1f}%) {verb}" in report.compare_table(losing.metrics)
    bigger = losing.metrics | {"student": losing.metrics["student"] | {"params": 100_000}}  # teacher: 50,000
    assert "The student has 2.0x the teacher's parameters" in report.headline(bigger)
    report.write_report(losing, tmp_path / "report.html", tmp_path / "figures")
    assert said in (tmp_path / "report.html").read_text().replace("&#x27;", "'")


def test_only_differences_that_matter_are_marked_better_or_worse():
    metrics = inputs().metrics
    baseline = metrics["baseline"] | {"test_accuracy": 0.85, "checkpoint_bytes": 100_000, "latency_ms_b1": 0.5,
                                      "nll": 0.15, "ece": 0.05}
    student = baseline | {"test_accuracy": 0.8505, "checkpoint_bytes": 102_000, "latency_ms_b1": 0.6,  # noise
                          "nll": 0.10, "ece": 0.08}  # 33 % better NLL, 60 % worse ECE: both matter
    page = report.table_html(metrics | {"student": student, "baseline": baseline})
    row = re.search(r"<tr><th><span[^>]*></span>student</th>(.*?)</tr>", page).group(1)
    cells = dict(zip([key for key, _, _, _ in report.COLUMNS], re.findall(r"<td([^>]*)>", row)))
    assert cells["test_accuracy"] == cells["checkpoint_bytes"] == cells["latency_ms_b1"] == ""
    assert cells["nll"] == ' class="better"' and cells["ece"] == ' class="worse"'


def test_confusion_counts_rows_by_true_class():
    counts = report.confusion(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize("figure", report.FIGURES)
def test_each_figure_draws_every_model(figure):
    fig = report.figures(inputs())[figure]
    labels = {text.get_text() for ax in fig.axes for text in ax.texts}
    legends = {t.get_text().split(" ")[0] for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    titles = {ax.get_title().split(" ")[0] for ax in fig.axes}
    assert {"teacher", "student", "baseline"} <= labels | legends | titles
