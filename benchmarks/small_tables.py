"""Benchmark: the committed defaults on small tables of your own, against logistic regression.

A user who points `data.source: csv` at a table of a few hundred rows changes nothing
else. This runs exactly that for scikit-learn's bundled tables (written to CSV first):
the committed params.yaml with only `data.source`, `data.path`, `data.label_column` and
the seeds changed, through the same library steps as the stages (prepare, teacher,
soft labels, student, baseline, evaluate; no tracking), and a plain scikit-learn
LogisticRegression fitted on the same prepared train rows and scored on the same test
rows. It writes benchmarks/results/small_tables.json and small_tables.md (the README
quotes the table).

    python benchmarks/small_tables.py [--tables breast_cancer wine iris digits] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import data, evaluation, softlabels, training  # noqa: E402
from distill.config import load_params  # noqa: E402
from distill.task import ROLES  # noqa: E402

TABLES = ("breast_cancer", "wine", "iris", "digits")
RESULTS = ROOT / "benchmarks" / "results"


def write_table(name: str, path: Path) -> None:
    """One of scikit-learn's bundled tables as a CSV with a `label` column of class names."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame = bunch.frame.drop(columns=["target"])
    frame["label"] = [str(bunch.target_names[t]) for t in bunch.target]
    frame.to_csv(path, index=False)


def logistic_regression(prepared: Path) -> float:
    """Test accuracy of scikit-learn's LogisticRegression (defaults, more iterations) on the prepared split."""
    from sklearn.linear_model import LogisticRegression

    train, test = data.read_split(prepared, "train"), data.read_split(prepared, "test")
    clf = LogisticRegression(max_iter=5000).fit(train.x, train.y)
    return float((clf.predict(test.x) == test.y).mean())


def run_once(table: str, seed: int, work: Path, params_file: Path) -> dict:
    """The pipeline's steps with the committed defaults on `table`, split and trained with `seed`."""
    csv = work / f"{table}.csv"
    if not csv.exists():
        write_table(table, csv)
    params = load_params(params_file)
    params = params.model_copy(update={
        "seed": seed,
        "data": params.data.model_copy(update={"source": "csv", "path": str(csv), "label_column": "label",
                                               "seed": seed}),
    })
    out = work / f"{table}-{seed}"
    prepared, soft = out / "prepared", out / "soft_labels"
    start = time.perf_counter()
    meta = data.prepare(params.data, prepared)
    ckpt = {name: out / f"{name}.pt" for name in ROLES}

    def outputs(name: str) -> training.Outputs:
        return training.Outputs(ckpt[name], out / f"{name}.csv", {})

    teacher = training.train_on_labels(training.TrainJob(params.teacher, seed, "teacher"), prepared,
                                       outputs("teacher"))
    softlabels.dump(ckpt["teacher"], prepared, soft, params.soft_labels)
    student = training.train_student(training.TrainJob(params.student, seed, "student"), prepared, soft,
                                     outputs("student"))
    baseline = training.train_on_labels(training.TrainJob(params.student, seed, "baseline"), prepared,
                                        outputs("baseline"))
    result = evaluation.evaluate(params.evaluate, prepared, ckpt)
    epochs = {"teacher": teacher, "student": student, "baseline": baseline}
    return {
        "table": table, "seed": seed, "rows": meta.summary()["splits"], "features": meta.num_features,
        "classes": meta.num_classes, "seconds": time.perf_counter() - start,
        "logistic_regression": logistic_regression(prepared),
        **{m: {"test_accuracy": result.metrics[m]["test_accuracy"], "params": result.metrics[m]["params"],
               "epochs_run": len(epochs[m]["history"]), "best_epoch": epochs[m]["best_epoch"]}
           for m in ROLES},
        "gap_closed": result.metrics["gap_closed"],
    }


def mean_std(values: list[float]) -> str:
    """'mean ± std' in percent."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def summarise(runs: list[dict]) -> tuple[dict, str]:
    """Per table: mean accuracies over seeds and the two checks of the small-table bar."""
    summary, lines = {}, [
        "| table (rows × features, classes) | logistic regression | teacher | distilled student | baseline "
        "| teacher − LR (pts) | student − baseline (pts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for table in dict.fromkeys(r["table"] for r in runs):
        rs = [r for r in runs if r["table"] == table]
        acc = {k: [r[k] if k == "logistic_regression" else r[k]["test_accuracy"] for r in rs]
               for k in ("logistic_regression", *ROLES)}
        mean = {k: statistics.fmean(v) for k, v in acc.items()}
        teacher_vs_lr = 100 * (mean["teacher"] - mean["logistic_regression"])
        student_vs_base = 100 * (mean["student"] - mean["baseline"])
        summary[table] = {"seeds": len(rs), "mean": mean, "teacher_minus_lr_points": teacher_vs_lr,
                          "student_minus_baseline_points": student_vs_base,
                          "teacher_within_1_point_of_lr": teacher_vs_lr >= -1.0,
                          "student_not_below_baseline": student_vs_base >= 0.0}
        rows = sum(rs[0]["rows"][s] for s in ("train", "val", "test"))
        lines.append(f"| {table} ({rows} × {rs[0]['features']}, {rs[0]['classes']}) | "
                     + " | ".join(mean_std(acc[k]) for k in ("logistic_regression", *ROLES))
                     + f" | {teacher_vs_lr:+.1f} | {student_vs_base:+.1f} |")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the defaults to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for table in args.tables:
            for seed in args.seeds:
                runs.append(run_once(table, seed, Path(tmp), args.params))
                r = runs[-1]
                print(f"{table} seed {seed}: LR {r['logistic_regression']:.3f} "
                      + " ".join(f"{m} {r[m]['test_accuracy']:.3f} ({r[m]['epochs_run']} ep)"
                                 for m in ROLES) + f"  {r['seconds']:.0f} s", flush=True)
    summary, table_md = summarise(runs)
    result = {"command": "python benchmarks/small_tables.py " + " ".join(argv or sys.argv[1:]),
              "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_tables.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "small_tables.md").write_text(table_md)
    print(table_md)
    return result


if __name__ == "__main__":
    main()
