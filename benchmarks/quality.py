"""Benchmark: distillation quality over seeds, against the published MNIST-1D and Hinton figures.

Each (configuration, seed) is a full pipeline run recorded as a DVC experiment
(`dvc exp run --temp --name ... -S seed=...`, so the workspace is untouched and
DVC's run cache reuses a teacher already trained for that seed) and logged to the
project's MLflow store. Configurations: the committed defaults (CNN student), an
MLP student, and scikit-learn's digits with the defaults. It writes benchmarks/results/quality.json
(per-seed and aggregate figures, and whether each bar of the quality issue is met)
and quality.md (the table the README quotes).

    python benchmarks/quality.py [--seeds 0 1 2] [--configs mnist1d-cnn mnist1d-mlp digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.evaluation import MODELS, gap_closed  # noqa: E402
from pipelines import experiments  # noqa: E402
from pipelines.tools import BIN  # noqa: E402


# Overrides of the committed params.yaml, as `dvc exp run -S` takes them.
CONFIGS: dict[str, dict[str, str]] = {
    "mnist1d-cnn": {},
    "mnist1d-mlp": {"student.arch": "mlp", "student.hidden": "[256,256]"},
    # the defaults on a table: an MLP pair (arch auto) and a MUNGE transfer set made from train
    "digits": {"data.source": "digits", "tracking.experiment": "distill-digits"},
}

# The bars of the quality issue (MNIST-1D, default split).
BAR = {"teacher_min": 0.97, "cnn_student_min": 0.95, "max_param_ratio": 0.1, "gap_closed_min": 0.9,
       "mlp_student_min": 0.90}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(records: list[dict]) -> dict:
    """Per-model mean ± std of each metric over seeds, and gap closed.

    `records` are metrics.json contents, one per seed. Gap closed is reported both
    per seed (mean ± std) and from the mean accuracies.
    """
    out: dict = {}
    for model in MODELS:
        keys = [k for k, v in records[0][model].items() if isinstance(v, (int, float))]
        out[model] = {k: mean_std([r[model][k] for r in records]) for k in keys}
    gaps = [gap_closed(*(r[m]["test_accuracy"] for m in MODELS)) for r in records]
    known = [g for g in gaps if g is not None]
    out["gap_closed"] = mean_std(known) if known else None
    acc = {m: out[m]["test_accuracy"]["mean"] for m in MODELS}
    out["gap_closed_of_means"] = gap_closed(acc["teacher"], acc["student"], acc["baseline"])
    out["param_ratio"] = out["student"]["params"]["mean"] / out["teacher"]["params"]["mean"]
    out["seeds"] = len(records)
    return out


def check_bar(results: dict[str, dict]) -> dict[str, bool]:
    """Which bars the aggregated MNIST-1D results meet."""
    cnn, mlp = results.get("mnist1d-cnn"), results.get("mnist1d-mlp")
    checks = {}
    if cnn:
        checks["teacher_at_least_97"] = cnn["teacher"]["test_accuracy"]["mean"] >= BAR["teacher_min"]
        checks["cnn_student_at_least_95"] = cnn["student"]["test_accuracy"]["mean"] >= BAR["cnn_student_min"]
        checks["student_at_most_tenth_of_teacher"] = cnn["param_ratio"] <= BAR["max_param_ratio"]
        checks["baseline_below_student"] = (cnn["baseline"]["test_accuracy"]["mean"]
                                            < cnn["student"]["test_accuracy"]["mean"])
        checks["gap_closed_at_least_90"] = (cnn["gap_closed"] or {"mean": 0})["mean"] >= BAR["gap_closed_min"]
        checks["at_least_3_seeds"] = cnn["seeds"] >= 3
    if mlp:
        checks["mlp_student_at_least_90"] = mlp["student"]["test_accuracy"]["mean"] >= BAR["mlp_student_min"]
    return checks


def fmt(stat: dict[str, float], scale: float = 100, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| data set / student | model | test accuracy % (mean ± std) | params | latency ms @b1 | gap closed % |",
             "|---|---|---|---|---|---|"]
    for name, agg in results.items():
        for model in MODELS:
            gap = fmt(agg["gap_closed"]) if model == "student" and agg["gap_closed"] else ""
            lines.append(f"| {name} ({agg['seeds']} seeds) | {model} | {fmt(agg[model]['test_accuracy'])} | "
                         f"{agg[model]['params']['mean']:,.0f} | {agg[model]['latency_ms_b1']['mean']:.3f} | {gap} |")
    return "\n".join(lines) + "\n"


def run_experiment(name: str, overrides: dict[str, str], seed: int) -> dict:
    """One full pipeline run as a DVC experiment in a temporary directory; its metrics."""
    args = [f"seed={seed}"] + [f"{k}={v}" for k, v in overrides.items()]
    # a rerun of the benchmark replaces its experiments; DVC's run cache keeps their work
    experiments.remove(ROOT, name)
    cmd = [str(BIN / "dvc"), "exp", "run", "--temp", "--name", name]
    for a in args:
        cmd += ["-S", a]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return experiments.metrics(ROOT, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()
    per_seed: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            start = time.perf_counter()
            metrics = run_experiment(f"quality-{config}-seed{seed}", CONFIGS[config], seed)
            per_seed.setdefault(config, []).append({"seed": seed, **metrics})
            print(f"{config} seed {seed}: " + ", ".join(f"{m} {metrics[m]['test_accuracy']:.4f}" for m in MODELS)
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {config: aggregate(records) for config, records in per_seed.items()}
    report = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "configs": {c: CONFIGS[c] for c in args.configs}, "bar": BAR, "per_seed": per_seed,
              "aggregate": results, "bar_met": check_bar(results)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(results))
    print(markdown_table(results))
    print(json.dumps(report["bar_met"], indent=2))


if __name__ == "__main__":
    main()
