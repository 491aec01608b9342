"""Results that say when they are noise: intervals and the paired test against hand-computed values,
the naive rates, the words the headline uses, and the TF-IDF reference on text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import report, significance
from distill.evaluation import noise_metrics, reference_model
from tiny_text import NEGATIVE, POSITIVE

CLASSES = ["cat", "dog"]
Z95 = 1.959963984540054  # the normal quantile at 0.975


def test_the_wilson_interval_of_8_right_of_10_is_the_formulas():
    k, n = 8, 10
    p = k / n
    center = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    low, high = significance.wilson_interval(k, n)
    assert (low, high) == (pytest.approx(center - half, abs=1e-9), pytest.approx(center + half, abs=1e-9))
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # Wilson's, not the normal approximation's 0.55-1.05


def test_mcnemar_counts_the_discordant_rows_and_its_p_value_is_the_binomial_tails():
    # 20 rows: 8 both right, 3 both wrong, 7 only the first right, 2 only the second
    first = np.array([True] * 8 + [False] * 3 + [True] * 7 + [False] * 2)
    second = np.array([True] * 8 + [False] * 3 + [False] * 7 + [True] * 2)
    result = significance.mcnemar_exact(first, second)
    assert (result["wins"], result["losses"], result["rows"]) == (7, 2, 20)
    assert result["difference"] == pytest.approx((15 - 10) / 20)
    # two-sided exact: P(X <= 2) + P(X >= 7) for X ~ Binomial(9, 1/2)
    tails = sum(math.comb(9, k) for k in (0, 1, 2, 7, 8, 9)) / 2**9
    assert result["p_value"] == pytest.approx(tails) == pytest.approx(92 / 512)
    assert significance.mcnemar_exact(first, first)["p_value"] == 1.0  # no discordant row: nothing to tell


def test_the_majority_rate_is_the_share_of_the_most_frequent_class():
    assert significance.majority_rate(np.array([1, 0, 1, 2, 1]), 4) == (1, pytest.approx(0.6))
    assert significance.one_class_models({"teacher": np.array([1, 1, 1]), "student": np.array([1, 0, 1])}) == {
        "teacher": 1}


def metrics_for(labels: np.ndarray, predictions: dict[str, np.ndarray]) -> dict:
    """A metrics.json as evaluate writes it, from predictions (the figures the headline needs)."""
    metrics = {m: {"test_accuracy": float((p == labels).mean()), "params": 1000 if m == "teacher" else 100}
               | ({} if m == "reference" else {"latency_ms_b1": 1.0}) for m, p in predictions.items()}
    for key, values in noise_metrics(labels, predictions, CLASSES).items():
        metrics[key] = metrics.get(key, {}) | values
    acc = {m: metrics[m]["test_accuracy"] for m in ("teacher", "student", "baseline")}
    metrics["gap_closed"] = (acc["student"] - acc["baseline"]) / (acc["teacher"] - acc["baseline"])
    return metrics


def right_on(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Predictions right exactly on `rows` (boolean mask), wrong elsewhere."""
    return np.where(rows, labels, 1 - labels)


def test_a_model_that_predicts_one_class_for_every_row_is_named_in_words():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(int)  # 70 % cat
    metrics = metrics_for(labels, {"teacher": np.zeros(400, int), "student": right_on(labels, rng.random(400) < 0.9),
                                   "baseline": right_on(labels, rng.random(400) < 0.8)})
    assert metrics["test_split"]["one_class"] == {"teacher": "cat"}
    assert metrics["test_split"]["majority_class"] == "cat"
    assert metrics["test_split"]["majority_rate"] == pytest.approx(1 - labels.mean())
    said = report.headline(metrics)
    assert "The teacher predicts one class for every row (cat)." in said
    table = report.compare_table(metrics)
    assert f"majority class, cat, is {100 * (1 - labels.mean()):.1f}% of them" in table
    assert "The teacher predicts one class for every row (cat)." in table


def test_a_model_within_noise_of_the_majority_rate_is_no_better_than_always_answering_it():
    labels = np.array([0] * 140 + [1] * 60)  # 70 % cat
    baseline = right_on(labels, np.arange(200) < 142)  # every cat and 2 dogs: 71 %, against 70 % for always "cat"
    metrics = metrics_for(labels, {"teacher": labels.copy(), "student": labels.copy(), "baseline": baseline})
    said = report.headline(metrics)
    assert "The baseline (71.0%) is no better than always answering cat (70.0%)." in said
    assert "The teacher (" not in said and "The student (" not in said  # 100 %: far above it


def test_the_headline_says_within_noise_and_claims_no_gap_closed_when_mcnemar_cannot_tell():
    rng = np.random.default_rng(1)
    labels = (rng.random(2000) < 0.5).astype(int)
    right = rng.random(2000)
    metrics = metrics_for(labels, {"teacher": right_on(labels, right < 0.85), "student": right_on(labels, right < 0.77),
                                   "baseline": right_on(labels, (right < 0.76) | (right > 0.995))})
    pair = metrics["student_vs_baseline"]
    assert pair["p_value"] >= 0.05 and pair["difference"] > 0
    said = report.headline(metrics)
    assert said.startswith("Distillation made no difference this test split can tell: student 77.")
    assert f"within noise (McNemar exact p = {pair['p_value']:.2g}, 2,000 test rows)" in said
    assert "closed" not in said
    assert "(within noise: student vs baseline McNemar exact p = " in report.compare_table(metrics)
    # the same gap on more rows is more than noise, and then it is claimed
    labels, right = np.tile(labels, 10), np.tile(right, 10)
    metrics = metrics_for(labels, {"teacher": right_on(labels, right < 0.85), "student": right_on(labels, right < 0.77),
                                   "baseline": right_on(labels, (right < 0.76) | (right > 0.995))})
    assert report.headline(metrics).startswith("Distillation closed ")


def test_a_test_split_of_a_few_dozen_rows_claims_no_gap_closed_even_when_the_gap_looks_large():
    labels = np.array([0, 1] * 20)
    rows = np.arange(40)
    metrics = metrics_for(labels, {"teacher": right_on(labels, rows < 38), "student": right_on(labels, rows < 34),
                                   "baseline": right_on(labels, rows < 24)})
    said = report.headline(metrics)
    assert said.startswith("Too few test rows to measure what distillation buys: student 85.0% vs baseline 60.0%")
    assert "closed" not in said and "on 40 rows one accuracy's 95% interval is about ±" in said
    assert ": 71.4% (on 40 test rows: too few to tell)" in report.compare_table(metrics)


def write_split(path, texts: list[str] | None, labels: list[int]) -> None:
    columns = {"label": pa.array(labels, pa.int32())} | ({"text": pa.array(texts)} if texts is not None else {})
    pq.write_table(pa.table(columns), path)


def reviews(rng: np.random.Generator, rows: int) -> tuple[list[str], list[int]]:
    """Short texts whose class is which word list their sentiment word comes from."""
    labels = [int(rng.random() < 0.5) for _ in range(rows)]
    return [f"the film was {rng.choice(POSITIVE if y else NEGATIVE)} and the plot {rng.choice(['long', 'short'])}"
            for y in labels], labels


def test_the_reference_is_fitted_on_train_text_and_scores_well_above_chance_on_test(tmp_path):
    rng = np.random.default_rng(0)
    for split, rows in (("train", 120), ("test", 60)):
        write_split(tmp_path / f"{split}.parquet", *reviews(rng, rows))
    logp, size = reference_model(tmp_path, num_classes=3)  # class 2 is never seen in train
    labels = pq.read_table(tmp_path / "test.parquet").column("label").to_numpy()
    assert logp.shape == (60, 3) and (logp.argmax(1).numpy() == labels).mean() > 0.9
    assert (logp[:, 2] < -20).all()  # never answered
    assert size["features"] > 100 and size["params"] == size["features"] + 1  # binary: one coefficient row
    # on feature vectors there is no text, and no reference
    write_split(tmp_path / "train.parquet", None, [0, 1])
    assert reference_model(tmp_path, num_classes=2) is None


def test_the_reference_is_a_row_of_the_table_and_compared_with_the_student_and_logged_to_mlflow():
    from distill.classification import ClassificationTask
    from distill.tracking import StageRun

    rng = np.random.default_rng(2)
    labels = (rng.random(500) < 0.5).astype(int)
    right = rng.random(500)
    predictions = {"teacher": right_on(labels, right < 0.9), "student": right_on(labels, right < 0.8),
                   "baseline": right_on(labels, right < 0.6), "reference": right_on(labels, right < 0.7)}
    metrics = metrics_for(labels, predictions)
    assert metrics["student_vs_reference"]["wins"] == int(((right >= 0.7) & (right < 0.8)).sum())
    table = report.compare_table(metrics)
    reference = next(line for line in table.splitlines() if line.startswith("| reference |"))
    assert reference.endswith("| – | – | – |")  # no checkpoint, no latency
    assert "Student vs reference on the same rows: +" in table
    assert "Against the TF-IDF reference (" in report.headline(metrics)
    run = StageRun("run-1", "pipeline-1", stage="evaluate", tracked=True)
    run.failure = "offline: every call is only journalled"
    result = SimpleNamespace(run_ids={"student": "s1", "baseline": "b1"}, configs={"reference": {"C": 10.0}},
                             metrics={k: v for k, v in metrics.items() if k != "teacher"})
    ClassificationTask()._log_evaluation(run, result, [])
    children = {op["tags"]["distill.model_role"]: op for op in run.journal if op["op"] == "child"}
    assert children["reference"]["params"] == {"role": "reference", "C": "10.0"}
    assert {"test_accuracy_ci95_low", "test_accuracy_ci95_high"} <= set(children["student"]["metrics"])
    logged = {k: v for op in run.journal if op["op"] == "metrics" for k, v in op["values"].items()}
    assert logged["student_vs_baseline.p_value"] == metrics["student_vs_baseline"]["p_value"]
    assert logged["test_split.majority_rate"] == metrics["test_split"]["majority_rate"]
