"""Test-set metrics for teacher, student and baseline, under the same keys.

Quality: accuracy with its 95 % interval, NLL, expected calibration error, agreement with the
teacher, KL(teacher || model), mean predictive entropy. Cost: parameters, checkpoint bytes,
CPU latency at batch 1 and at a large batch (on one thread, the fast end of many passes, so a
busy machine does not move it: `latency_ms`). The derived headline is
gap_closed = (student - baseline) / (teacher - baseline) in test accuracy. On text, a fourth
model beside the three: the reference a practitioner would try first (`reference_model`, TF-IDF
and logistic regression), scored on the same rows; it has no checkpoint, so no latency, gate or
registry. What says which differences are noise (`noise_metrics`, distill.significance): the
test split's size and majority-class rate, the models that predict one class for every row, and
McNemar's paired test of the student against the baseline and the reference. The registry's
quality gate (`passes_gate`, a distill.gate verdict) is decided here too; distill.report shows
the results, distill.tracking records them.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from distill import checkpoint, data, significance
from distill import device as devices
from distill.checkpoint import count_parameters
from distill.classification_params import EvaluateConfig, RegistryConfig
from distill.errors import UserError
from distill.gate import Check, Verdict, verdict
from distill.io import atomic_path, file_sha256, write_csv, write_json
from distill.models import predict_logits
from distill.task import ROLES
import distill.pretrained  # noqa: F401  (registers the transformer and torchscript archs a teacher may be)


@dataclass
class Evaluation:
    """What `evaluate` computes: the metrics, and what the report draws from them."""

    metrics: dict  # per model, plus gap_closed, test_split and the paired comparisons: reports/metrics.json
    histories: dict[str, list[dict]]  # per model: the checkpoint's per-epoch rows
    labels: np.ndarray  # test labels (class indices)
    predictions: dict[str, np.ndarray]  # per model (and the reference, on text): predicted class indices
    reliability: dict[str, list[dict]]  # per model: reliability_bins rows
    class_names: list[str]
    run_ids: dict[str, str | None] = field(default_factory=dict)  # per model: its training run in MLflow
    configs: dict[str, dict] = field(default_factory=dict)  # per model: its config (arch, widths, temperature...)
    described: str = ""  # one line: the test data and the runs


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| * share of rows."""
    return float(sum(r["weight"] * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels, bins)))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> list[dict[str, float]]:
    """Per non-empty confidence bin: mean confidence, accuracy, count and share of rows."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    # bucketize: bin i holds confidences in (edges[i], edges[i+1]]
    which = torch.bucketize(conf, edges[1:-1], right=False)
    rows = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        if n:
            rows.append({
                "bin": b, "bin_upper": float(edges[b + 1]), "confidence": float(conf[mask].mean()),
                "accuracy": float(correct[mask].mean()), "count": n, "weight": n / len(labels),
            })
    return rows


def quality_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                    ece_bins: int) -> dict[str, float]:
    """Accuracy, NLL, ECE, teacher agreement, KL(teacher || model), entropy for (N, C) logits."""
    logp = F.log_softmax(logits.float(), dim=1)
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=1)
    probs = logp.exp()
    return {
        "test_accuracy": float((logits.argmax(1) == labels).float().mean()),
        "nll": float(F.nll_loss(logp, labels)),
        "ece": expected_calibration_error(probs, labels, ece_bins),
        "teacher_agreement": float((logits.argmax(1) == teacher_logits.argmax(1)).float().mean()),
        "kl_from_teacher": float(F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")),
        "entropy": float(-(probs * logp).sum(1).mean()),
    }


# Latency is timed on a fixed number of intra-op threads, so a busy machine cannot decide it: with
# torch's default (one per core) the median batch-1 pass of the 8k-parameter MNIST-1D CNN read
# 66-96 ms beside two CPU-bound processes on two cores (its threads wait on each other at every
# op), 0.11 ms idle.
LATENCY_THREADS = 1
LATENCY_QUANTILE = 0.1  # of the timed passes: the fast end, which load reaches only where it slows 9 in 10
LATENCY_WARMUP_S = 0.05  # untimed passes first, at least this long (and 5 of them): caches, allocator, clock


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, batch_size: int, repeats: int,
               device: torch.device = devices.CPU) -> float:
    """Wall time of one forward pass over a batch on `device` (where `model` is), in milliseconds:
    the 10th percentile (LATENCY_QUANTILE) of `repeats` timed passes, after LATENCY_WARMUP_S of
    untimed ones, on LATENCY_THREADS intra-op thread(s) (torch's setting is restored after) with
    the garbage collector paused. A GPU's queue is drained before each clock stops."""
    model.eval()
    batch = x[:batch_size].to(device)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    torch.set_num_threads(LATENCY_THREADS)
    gc.disable()
    try:
        warm_until, warmed = time.perf_counter() + LATENCY_WARMUP_S, 0
        while warmed < 5 or time.perf_counter() < warm_until:
            model(batch)
            warmed += 1
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(batch)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()
    return 1000 * float(np.quantile(times, LATENCY_QUANTILE))


def gap_closed(teacher: float, student: float, baseline: float) -> float | None:
    """Share of the teacher-baseline gap the student closes; None when the teacher does not
    beat the baseline (a tie or worse): then there is no gap, and the ratio would mean nothing."""
    gap = teacher - baseline
    return None if gap < 1e-12 else (student - baseline) / gap


def no_gap_reason(metrics: dict) -> str:
    """Why there is no gap-closed figure: the teacher ties or loses to the baseline (test accuracy)."""
    teacher, baseline = (100 * metrics[m]["test_accuracy"] for m in ("teacher", "baseline"))
    verb = "ties with" if abs(teacher - baseline) < 1e-9 else "does worse than"
    return f"the teacher ({teacher:.1f}%) {verb} the baseline ({baseline:.1f}%), so there is nothing to distil"


def passes_gate(student: dict, registry: RegistryConfig) -> Verdict:
    """The quality gate for the registry alias: accurate enough and fast enough at batch 1."""
    return verdict([Check("accuracy", student["test_accuracy"], registry.min_test_accuracy, ceiling=False),
                    Check("latency", student["latency_ms_b1"], registry.max_latency_ms_b1, ceiling=True, unit=" ms")])


def prediction_rows(labels: np.ndarray, preds: dict[str, np.ndarray], class_names: list[str]) -> list[dict]:
    """One row per test example: the true class and each model's prediction, by class name."""
    names = np.asarray(class_names)
    columns = {"actual": names[labels]} | {m: names[p] for m, p in preds.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def evaluate(cfg: EvaluateConfig, prepared_dir: str | Path, checkpoints: dict[str, str | Path],
             device: torch.device = devices.CPU) -> Evaluation:
    """Stage step evaluate: test metrics for teacher, student and baseline, and on text the
    reference's (nothing written).

    Metrics and latencies are measured on the CPU, the usual deployment target; with a
    GPU `device` (runtime.device) its latencies are added as device_latency_ms_*."""
    meta = data.read_meta(prepared_dir)
    test = data.read_split(prepared_dir, "test")
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    models = {name: checkpoint.load(checkpoints[name], task="classify") for name in ROLES}
    _check_lineage(checkpoints, models, meta)
    pad_id = (meta.tokens or {}).get("pad_id")  # text: token ids padded with it
    logits = {name: predict_logits(model, x, pad_id=pad_id) for name, (model, _) in models.items()}
    metrics = {name: quality_metrics(logits[name], y, logits["teacher"], cfg.ece_bins)
               | cost_metrics(cfg, model, checkpoints[name], x, device) for name, (model, _) in models.items()}
    configs = {name: ckpt.get("config", {}) for name, (_, ckpt) in models.items()}
    reference = reference_model(prepared_dir, meta.num_classes)
    if reference is not None:
        logits["reference"], size = reference
        metrics["reference"] = quality_metrics(logits["reference"], y, logits["teacher"], cfg.ece_bins) | size
        configs["reference"] = REFERENCE
    predictions = {name: lg.argmax(1).numpy() for name, lg in logits.items()}
    for key, values in noise_metrics(test.y, predictions, meta.class_names).items():
        metrics[key] = metrics.get(key, {}) | values
    acc = {name: metrics[name]["test_accuracy"] for name in ROLES}
    metrics["gap_closed"] = gap_closed(acc["teacher"], acc["student"], acc["baseline"])
    run_ids = {name: ckpt.get("mlflow_run_id") for name, (_, ckpt) in models.items()}
    described = (f"{len(test.y):,} test rows, {meta.num_classes} classes, prepared data {meta.fingerprint[:12]}; "
                 + _text_read(meta.tokens) + "MLflow runs: "
                 + ", ".join(f"{name} {run_id or 'not tracked'}" for name, run_id in run_ids.items()))
    return Evaluation(
        metrics=metrics, histories={name: ckpt.get("history", []) for name, (_, ckpt) in models.items()},
        labels=test.y, predictions=predictions,
        reliability={name: reliability_bins(logits[name].softmax(1), y, cfg.ece_bins) for name in ROLES},
        class_names=meta.class_names, run_ids=run_ids, described=described, configs=configs)


def cost_metrics(cfg: EvaluateConfig, model: nn.Module, path: str | Path, x: torch.Tensor,
                 device: torch.device) -> dict[str, float]:
    """Parameters, checkpoint bytes, CPU latencies, and with a GPU `device` its latencies too (on a copy
    there: the CPU model stays for what follows)."""
    cost = {"params": count_parameters(model), "checkpoint_bytes": Path(path).stat().st_size,
            "latency_ms_b1": latency_ms(model, x, 1, cfg.latency_repeats),
            "latency_ms_batch": latency_ms(model, x, cfg.latency_batch_size, cfg.latency_repeats)}
    if device.type != "cpu":
        on_device = copy.deepcopy(model).to(device)
        cost |= {f"device_latency_ms_{key}": latency_ms(on_device, x, size, cfg.latency_repeats, device)
                 for key, size in (("b1", 1), ("batch", cfg.latency_batch_size))}
    return cost


# The reference on text: what a practitioner would try before any network. C is fixed, not tuned on
# val: on Rotten Tomatoes split by movie as prepare does (8,876 train, 1,266 val, 2,666 test rows),
# C = 1, 3, 10, 30 scored 77.7-78.4 % on test, within noise of each other, while a grid would fit four
# times; one fit and score of C = 10 on ~10,000 rows took 9 s on two cores busy with other jobs.
REFERENCE = {"arch": "tfidf_logreg", "word_ngrams": "1-2", "char_wb_ngrams": "2-5", "sublinear_tf": True, "C": 10.0}
NO_CLASS_LOGIT = float(np.log(1e-12))  # a class absent from the train rows: the reference never answers it


def reference_model(prepared_dir: str | Path, num_classes: int) -> tuple[torch.Tensor, dict[str, int]] | None:
    """TF-IDF over word 1-2-grams and character 2-5-grams (within word bounds, sublinear tf) with
    logistic regression (scikit-learn, lbfgs), fitted on the train rows' text.

    Returns:
        The test rows' (N, num_classes) log-probabilities, and the model's size: params (its
        coefficients and intercepts) and features (the n-gram vocabulary). None where the prepared
        splits hold no text (feature vectors): there the baseline is the plain reference, and no
        reference row is added.
    """
    train, test = text_split(prepared_dir, "train"), text_split(prepared_dir, "test")
    if train is None or test is None:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    ngrams = FeatureUnion([("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                           ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))])
    model = make_pipeline(ngrams, LogisticRegression(C=REFERENCE["C"], max_iter=1000, random_state=0))
    model.fit(*train)
    head = model[-1]
    logp = np.full((len(test[1]), num_classes), NO_CLASS_LOGIT, dtype=np.float32)
    logp[:, head.classes_] = model.predict_log_proba(test[0])
    return torch.from_numpy(logp), {"params": int(head.coef_.size + head.intercept_.size),
                                    "features": int(head.coef_.shape[1])}


def text_split(prepared_dir: str | Path, name: str) -> tuple[list[str], np.ndarray] | None:
    """One prepared split's `text` column and labels; None where it has no text column."""
    path = Path(prepared_dir) / f"{name}.parquet"
    if "text" not in pq.read_schema(path).names:
        return None
    table = pq.read_table(path, columns=["text", "label"])
    return table.column("text").to_pylist(), data.labels(table)


PAIRS = (("student", "baseline"), ("student", "reference"))  # metrics["student_vs_baseline"], where both are


def noise_metrics(labels: np.ndarray, predictions: dict[str, np.ndarray], class_names: list[str]) -> dict[str, dict]:
    """What says which differences are noise, by metrics.json key (distill.significance):

    - per model: test_accuracy_ci95_low / _high (Wilson, 95 %), and above_majority_p_value (one-sided
      exact binomial test that it beats always answering the majority class);
    - test_split: rows, majority_class (its name), majority_rate, and one_class: {model: the class}
      for each model that predicts one class for every row;
    - student_vs_baseline (and student_vs_reference on text): McNemar's exact test on the same rows,
      {difference, p_value, wins, losses, rows}, wins the rows the student alone gets right.
    """
    rows = len(labels)
    correct = {name: p == labels for name, p in predictions.items()}
    majority, rate = significance.majority_rate(labels, len(class_names))
    out: dict[str, dict] = {}
    for name, right in correct.items():
        low, high = significance.wilson_interval(right.sum(), rows)
        out[name] = {"test_accuracy_ci95_low": low, "test_accuracy_ci95_high": high,
                     "above_majority_p_value": significance.above_majority_p_value(right.sum(), rows, rate)}
    out["test_split"] = {"rows": rows, "majority_class": class_names[majority], "majority_rate": rate,
                         "one_class": {name: class_names[c]
                                       for name, c in significance.one_class_models(predictions).items()}}
    for first, second in PAIRS:
        if first in correct and second in correct:
            out[f"{first}_vs_{second}"] = significance.mcnemar_exact(correct[first], correct[second])
    return out


def write_outputs(result: Evaluation, metrics_out: str | Path, predictions_out: str | Path,
                  reliability_dir: str | Path, curves_dir: str | Path) -> None:
    """metrics.json, the per-example predictions CSV, and one reliability CSV and one training
    curve (the checkpoint's per-epoch history) per model, atomically."""
    write_json(metrics_out, result.metrics)
    write_csv(predictions_out, prediction_rows(result.labels, result.predictions, result.class_names))
    for folder, tables in ((reliability_dir, result.reliability), (curves_dir, result.histories)):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            for name, rows in tables.items():
                write_csv(tmp / f"{name}.csv", rows)


def _text_read(tokens: dict | None) -> str:
    """For text, how much of the documents the models read (prepare's measure): a cut that reads
    a small part of the median document says more about the accuracies than the models do."""
    if not tokens or not tokens.get("median_tokens"):
        return ""
    length, median, cut = tokens["max_length"], tokens["median_tokens"], tokens.get("cut_fraction", 0.0)
    return (f"the models read the first {length} tokens of each text, {min(length / median, 1):.0%} of the median "
            f"document's {median}, and {cut:.0%} of documents are cut (data.text.max_length); ")


def _check_lineage(checkpoints: dict, models: dict, meta: data.PreparedMeta) -> None:
    """Refuse to compare models trained on other data or distilled from another teacher."""
    for name, (_, ckpt) in models.items():
        if ckpt.get("prepared_fingerprint") != meta.fingerprint:
            raise UserError(f"{checkpoints[name]}: trained on other prepared data; rerun train_{name}")
    teacher_sha = file_sha256(checkpoints["teacher"])
    if models["student"][1]["soft_labels"]["teacher_sha256"] != teacher_sha:
        raise UserError(f"{checkpoints['student']}: distilled from another teacher's soft labels; "
                        "rerun soft_labels and train_student")
