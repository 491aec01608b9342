"""Test-set metrics for teacher, student and baseline, under the same keys.

Quality: accuracy, NLL, expected calibration error, agreement with the teacher,
KL(teacher || model), mean predictive entropy. Cost: parameters, checkpoint bytes,
CPU latency at batch 1 and at a large batch. The derived headline is
gap_closed = (student - baseline) / (teacher - baseline) in test accuracy.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill import data, report
from distill.config import EvaluateConfig
from distill.errors import UserError
from distill.io import atomic_path, file_sha256, write_csv, write_json, write_text
from distill.models import count_parameters, load_checkpoint
from distill.training import predict_logits

MODELS = ("teacher", "student", "baseline")


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


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median wall time of one forward pass over a batch, in milliseconds."""
    model.eval()
    batch = x[:batch_size]
    for _ in range(3):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def gap_closed(teacher: float, student: float, baseline: float) -> float | None:
    """Share of the teacher-baseline gap the student closes; None when there is no gap."""
    gap = teacher - baseline
    return None if abs(gap) < 1e-12 else (student - baseline) / gap


def compare_table(metrics: dict) -> str:
    """A markdown table of the three models, plus the gap-closed headline."""
    keys = [("test_accuracy", "test acc", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
            ("teacher_agreement", "agree w/ teacher", "{:.4f}"), ("kl_from_teacher", "KL(teacher||m)", "{:.4f}"),
            ("entropy", "entropy", "{:.3f}"), ("params", "params", "{:,}"),
            ("checkpoint_bytes", "ckpt bytes", "{:,}"), ("latency_ms_b1", "ms @b1", "{:.3f}"),
            ("latency_ms_batch", "ms @batch", "{:.3f}")]
    lines = ["| model | " + " | ".join(h for _, h, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in MODELS:
        lines.append(f"| {m} | " + " | ".join(fmt.format(metrics[m][k]) for k, _, fmt in keys) + " |")
    gap = metrics.get("gap_closed")
    shown = "n/a (teacher and baseline tie)" if gap is None else f"{100 * gap:.1f}%"
    return "\n".join(lines) + f"\n\nGap closed by distillation (student - baseline) / (teacher - baseline): {shown}\n"


def prediction_rows(labels: np.ndarray, preds: dict[str, np.ndarray], class_names: list[str]) -> list[dict]:
    """One row per test example: the true class and each model's prediction, by class name."""
    names = np.asarray(class_names)
    columns = {"actual": names[labels]} | {m: names[p] for m, p in preds.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def evaluate(cfg: EvaluateConfig, prepared_dir: str | Path, checkpoints: dict[str, str | Path],
             metrics_out: str | Path, compare_out: str | Path, predictions_out: str | Path,
             reliability_dir: str | Path, report_out: str | Path | None = None,
             figures_dir: str | Path | None = None) -> dict:
    """Stage step evaluate: test metrics for teacher, student and baseline, the comparison,
    and (given `report_out` and `figures_dir`) the HTML report with its figures."""
    meta = data.read_meta(prepared_dir)
    test = data.read_split(prepared_dir, "test")
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    models = {name: load_checkpoint(checkpoints[name]) for name in MODELS}
    _check_lineage(checkpoints, models, meta)
    logits = {name: predict_logits(model, x) for name, (model, _) in models.items()}
    metrics: dict = {}
    for name, (model, _) in models.items():
        metrics[name] = quality_metrics(logits[name], y, logits["teacher"], cfg.ece_bins) | {
            "params": count_parameters(model),
            "checkpoint_bytes": Path(checkpoints[name]).stat().st_size,
            "latency_ms_b1": latency_ms(model, x, 1, cfg.latency_repeats),
            "latency_ms_batch": latency_ms(model, x, cfg.latency_batch_size, cfg.latency_repeats),
        }
    acc = {name: metrics[name]["test_accuracy"] for name in MODELS}
    metrics["gap_closed"] = gap_closed(acc["teacher"], acc["student"], acc["baseline"])
    write_json(metrics_out, metrics)
    write_text(compare_out, compare_table(metrics))
    preds = {name: lg.argmax(1).numpy() for name, lg in logits.items()}
    write_csv(predictions_out, prediction_rows(test.y, preds, meta.class_names))
    bins = {name: reliability_bins(lg.softmax(1), y, cfg.ece_bins) for name, lg in logits.items()}
    with atomic_path(reliability_dir) as tmp:
        tmp.mkdir()
        for name, rows in bins.items():
            write_csv(tmp / f"{name}.csv", rows)
    run_ids = {name: ckpt.get("mlflow_run_id") for name, (_, ckpt) in models.items()}
    if report_out is not None and figures_dir is not None:
        inputs = report.ReportInputs(
            metrics=metrics, histories={name: ckpt.get("history", []) for name, (_, ckpt) in models.items()},
            labels=test.y, predictions=preds, reliability=bins, class_names=meta.class_names)
        described = (f"{len(test.y):,} test rows, {meta.num_classes} classes, prepared data "
                     f"{meta.fingerprint[:12]}; MLflow runs: "
                     + ", ".join(f"{name} {run_id or 'not tracked'}" for name, run_id in run_ids.items()))
        report.write_report(inputs, report_out, figures_dir, described)
    return metrics | {"run_ids": run_ids}


def _check_lineage(checkpoints: dict, models: dict, meta: data.PreparedMeta) -> None:
    """Refuse to compare models trained on other data or distilled from another teacher."""
    for name, (_, ckpt) in models.items():
        if ckpt.get("prepared_fingerprint") != meta.fingerprint:
            raise UserError(f"{checkpoints[name]}: trained on other prepared data; rerun train_{name}")
    teacher_sha = file_sha256(checkpoints["teacher"])
    if models["student"][1]["soft_labels"]["teacher_sha256"] != teacher_sha:
        raise UserError(f"{checkpoints['student']}: distilled from another teacher's soft labels; "
                        "rerun soft_labels and train_student")
