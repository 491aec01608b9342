"""Benchmark: a temperature x alpha sweep of the distilled student, the evidence behind the defaults.

Each grid point is a DVC experiment (`dvc exp run --temp`) of the committed
params.yaml with `student.temperature` and `student.alpha` set; DVC's run cache
reuses prepare, teacher, soft labels and baseline, so only the student and
evaluate run. Writes benchmarks/results/sweep.json, sweep.md and sweep.png
(student test accuracy by temperature and alpha).

    python benchmarks/sweep.py [--temperatures 1 2 4 8] [--alphas 0.5 0.9 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.quality import run_experiment  # noqa: E402


def grid_table(results: list[dict], temperatures: list[float], alphas: list[float], key: str, scale: float,
               digits: int) -> str:
    """Markdown: rows are temperatures, columns alphas, cells `key` * `scale`."""
    value = {(r["temperature"], r["alpha"]): r[key] for r in results}
    lines = ["| T \\ alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |", "|---" * (len(alphas) + 1) + "|"]
    for t in temperatures:
        lines.append(f"| {t:g} | " + " | ".join(f"{scale * value[(t, a)]:.{digits}f}" for a in alphas) + " |")
    return "\n".join(lines) + "\n"


def tables(results: list[dict], temperatures: list[float], alphas: list[float]) -> str:
    return ("Student test accuracy (%):\n\n"
            + grid_table(results, temperatures, alphas, "student_test_accuracy", 100, 1)
            + "\nStudent test NLL:\n\n" + grid_table(results, temperatures, alphas, "student_nll", 1, 3))


def plot(results: list[dict], temperatures: list[float], alphas: list[float], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in alphas:
        ys = [100 * next(r["student_test_accuracy"] for r in results if r["temperature"] == t and r["alpha"] == a)
              for t in temperatures]
        ax.plot(temperatures, ys, marker="o", label=f"alpha = {a:g}")
    ax.axhline(100 * baseline, color="grey", linestyle="--", label="baseline (no distillation)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("Distilled student on MNIST-1D: temperature x alpha")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/sweep")
    args = parser.parse_args()
    results, baseline = [], None
    for t in args.temperatures:
        for a in args.alphas:
            metrics = run_experiment(f"sweep-T{t:g}-a{a:g}-seed{args.seed}",
                                     {"student.temperature": f"{t:g}", "student.alpha": f"{a:g}"}, args.seed)
            results.append({"temperature": t, "alpha": a,
                            "student_test_accuracy": metrics["student"]["test_accuracy"],
                            "student_nll": metrics["student"]["nll"]})
            baseline = metrics["baseline"]["test_accuracy"]
            print(f"T={t:g} alpha={a:g}: student {metrics['student']['test_accuracy']:.4f}", flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/sweep.py " + " ".join(sys.argv[1:]),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed,
              "baseline_test_accuracy": baseline, "results": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(tables(results, args.temperatures, args.alphas))
    plot(results, args.temperatures, args.alphas, baseline, out.with_suffix(".png"))
    print(tables(results, args.temperatures, args.alphas))


if __name__ == "__main__":
    main()
