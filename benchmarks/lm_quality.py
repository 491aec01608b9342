"""Benchmark: language-model distillation over seeds, and what the stored targets cost and give.

For each seed, the default language-model pipeline (lm/params.yaml with only `seed` changed,
tracking off) runs stage by stage in benchmarks/.work/lm/seed<N>/, each stage as its dvc.yaml
command (`python -m stages.<stage>`, timed: the sum is a fresh-cache run's wall time). Then,
with that seed's teacher, the soft labels are stored in every form compared here, a student is
distilled from each (same steps, seed and settings), and each is scored on the test windows:

  dense      every log-prob (float16)
  top-k      k in {8, 32, 128}
  sampled    random-sampling KD, 32 draws per token (the distinct ids and their counts)

The form lm/params.yaml names (sampled-32) is the default pipeline's own: its student is not trained twice.

It writes <out>.json (per seed and aggregate: bits per token, gap closed, bytes per token, the
ratios to dense, wall times, and whether each aim of the issue is met) and <out>.md (the README's
tables).

    python benchmarks/lm_quality.py [--seeds 0 1 2] [--out benchmarks/results/lm_quality]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import checkpoint, corpus, lm  # noqa: E402
from distill.sources import rotten_tomatoes_file  # noqa: E402
from distill.task import ROLES  # noqa: E402

STAGES = ("prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate")
# name -> soft_labels overrides
TARGETS = {
    "dense": {"targets": "dense"},
    "top-8": {"targets": "top_k", "top_k": 8},
    "top-32": {"targets": "top_k", "top_k": 32},
    "top-128": {"targets": "top_k", "top_k": 128},
    "sampled-32": {"targets": "sampled", "samples": 32},
}
DENSE_BUFFER = 2048  # windows of dense targets held at once (float16: about 1 GB)
AIMS = {"gap_closed_min": 0.30, "top32_bytes_max_fraction_of_dense": 1 / 20, "top32_bits_max_ratio_to_dense": 1.02,
        "wall_minutes_max": 20.0}


def default_targets() -> str:
    """Which of TARGETS the default pipeline (lm/params.yaml) stores."""
    soft = yaml.safe_load((ROOT / "lm" / "params.yaml").read_text())["soft_labels"]
    for name, over in TARGETS.items():
        if all(soft[key] == value for key, value in over.items()):
            return name
    sys.exit(f"lm/params.yaml's soft_labels ({soft}) is none of the compared forms: add it to TARGETS")


def stage_command(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "lm" / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return [sys.executable, *spec.split()[1:]]


def run(cmd: list[str], cwd: Path, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_PROGRESS="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen, cwd: Path) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{' '.join(proc.args)} failed in {cwd}:\n{err[-4000:]}")


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    wait(run(cmd, cwd), cwd)
    return time.perf_counter() - start


def write_params(work: Path, seed: int, soft: dict | None = None) -> Path:
    params = yaml.safe_load((ROOT / "lm" / "params.yaml").read_text())
    params["seed"] = seed
    params["data"]["path"] = str(rotten_tomatoes_file())
    params["tracking"]["enabled"] = False
    if soft:
        params["soft_labels"].update(soft)
        if soft["targets"] == "dense":
            params["student"]["shuffle_buffer"] = DENSE_BUFFER
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def one_seed(seed: int, base: Path, targets: bool = True) -> dict:
    work = base / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_params(work, seed)
    seconds = {}
    for stage in STAGES:  # the default pipeline, one stage at a time, as dvc repro runs it
        seconds[stage] = timed(stage_command(stage), work)
        print(f"seed {seed}: {stage} {seconds[stage]:.0f} s", flush=True)
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    record = {"seed": seed, "metrics": {m: metrics[m] for m in ROLES}, "gap_closed": metrics["gap_closed"],
              "stage_seconds": seconds, "wall_minutes": sum(seconds.values()) / 60}
    if not targets:
        (work / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
    test = corpus.read_windows(work / "data" / "prepared", "test")
    own = default_targets()
    variants = {name: work / f"targets-{name}" for name in TARGETS if name != own}
    for name, variant in variants.items():
        variant.mkdir()
        write_params(variant, seed, TARGETS[name])
        (variant / "data").mkdir()
        (variant / "data" / "prepared").symlink_to(work / "data" / "prepared")
        (variant / "models").mkdir()
        shutil.copy(work / "models" / "teacher.pt", variant / "models" / "teacher.pt")
    # the variants two at a time, one thread each (small models use one thread best)
    names = list(variants)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        procs = {n: run(stage_command("soft_labels"), variants[n], threads=1) for n in pair}
        for n, proc in procs.items():
            wait(proc, variants[n])
        procs = {n: run(stage_command("train_student"), variants[n], threads=1) for n in pair}
        for n, proc in procs.items():
            wait(proc, variants[n])
    targets = {}
    for name in TARGETS:
        if name == own:
            prov = json.loads((work / "data" / "soft_labels" / "provenance.json").read_text())
            bits = metrics["student"]["test_bits_per_token"]
        else:
            prov = json.loads((variants[name] / "data" / "soft_labels" / "provenance.json").read_text())
            model, _ = checkpoint.load(variants[name] / "models" / "student.pt", task="language_model")
            bits = lm.nats_per_token(model, test, 64, torch.device("cpu")) / math.log(2)
            if name == "dense":  # gigabytes; the others stay for benchmarks/lm_tails.py
                shutil.rmtree(variants[name] / "data" / "soft_labels")
        targets[name] = {"bytes_per_token": prov["bytes_per_token"], "student_bits_per_token": bits}
        print(f"seed {seed}: {name} {prov['bytes_per_token']:.1f} bytes/token, student {bits:.4f} bits/token",
              flush=True)
    record["targets"], record["default_targets"] = targets, own
    (work / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(records: list[dict]) -> dict:
    agg = {"bits_per_token": {m: mean_std([r["metrics"][m]["test_bits_per_token"] for r in records]) for m in ROLES},
           "kl_bits_per_token": {m: mean_std([max(r["metrics"][m]["kl_bits_per_token"], 0.0) for r in records])
                                 for m in ROLES},
           "params": {m: records[0]["metrics"][m]["params"] for m in ROLES},
           "gap_closed": mean_std([r["gap_closed"] for r in records]),
           "wall_minutes": mean_std([r["wall_minutes"] for r in records]),
           # the fastest seed: the others may have shared the machine with other work
           "wall_minutes_min": min(r["wall_minutes"] for r in records),
           "stage_seconds": {s: mean_std([r["stage_seconds"][s] for r in records]) for s in STAGES}}
    agg["targets"] = {}
    agg["target_seeds"] = [r["seed"] for r in records if "targets" in r]
    agg["default_targets"] = next((r["default_targets"] for r in records if "default_targets" in r), "top-32")
    records = [r for r in records if "targets" in r]  # the storage comparison: the seeds that ran it
    for name in TARGETS:
        bits = [r["targets"][name]["student_bits_per_token"] for r in records]
        ratio = [r["targets"][name]["student_bits_per_token"] / r["targets"]["dense"]["student_bits_per_token"]
                 for r in records]
        size = [r["targets"][name]["bytes_per_token"] for r in records]
        gaps = [(r["metrics"]["baseline"]["test_bits_per_token"] - r["targets"][name]["student_bits_per_token"])
                / (r["metrics"]["baseline"]["test_bits_per_token"] - r["metrics"]["teacher"]["test_bits_per_token"])
                for r in records]
        agg["targets"][name] = {"bytes_per_token": mean_std(size), "gap_closed": mean_std(gaps),
                                "bytes_fraction_of_dense": statistics.fmean(size) / statistics.fmean(
                                    [r["targets"]["dense"]["bytes_per_token"] for r in records]),
                                "student_bits_per_token": mean_std(bits), "bits_ratio_to_dense": mean_std(ratio)}
    if not records:
        return agg
    top32 = agg["targets"]["top-32"]
    agg["aims_met"] = {
        "student_beats_baseline": agg["bits_per_token"]["student"]["mean"] < agg["bits_per_token"]["baseline"]["mean"],
        "gap_closed": agg["gap_closed"]["mean"] >= AIMS["gap_closed_min"],
        "top32_bytes": top32["bytes_fraction_of_dense"] <= AIMS["top32_bytes_max_fraction_of_dense"],
        "top32_bits": top32["bits_ratio_to_dense"]["mean"] <= AIMS["top32_bits_max_ratio_to_dense"],
        "wall_time": agg["wall_minutes_min"] <= AIMS["wall_minutes_max"],
    }
    return agg


def pm(stat: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def markdown(agg: dict, seeds: list[int]) -> str:
    lines = [f"Language-model distillation, Rotten Tomatoes (split by movie), seeds {seeds}: held-out bits per "
             f"token, mean ± std (stored targets: seeds {agg['target_seeds']}).", "", "| model | parameters | bits / token | KL(teacher ‖ model), bits / token |",
             "|---|---|---|---|"]
    for m in ROLES:
        lines.append(f"| {m} | {agg['params'][m]:,} | {pm(agg['bits_per_token'][m])} | "
                     f"{pm(agg['kl_bits_per_token'][m])} |")
    lines += ["", f"Gap closed (baseline - student) / (baseline - teacher): {pm(agg['gap_closed'], '{:.1%}')}; "
              f"default pipeline wall time {agg['wall_minutes_min']:.1f} min at best, "
              f"{pm(agg['wall_minutes'], '{:.1f}')} min over the seeds, on this machine.", "",
              "| targets | bytes / token | of dense | student bits / token | ratio to dense student | gap closed |",
              "|---|---|---|---|---|---|"]
    for name, t in agg["targets"].items():
        shown = f"{name} (the default)" if name == agg["default_targets"] else name
        lines.append(f"| {shown} | {pm(t['bytes_per_token'], '{:.1f}')} | {t['bytes_fraction_of_dense']:.4f} | "
                     f"{pm(t['student_bits_per_token'])} | {pm(t['bits_ratio_to_dense'], '{:.4f}')} | "
                     f"{pm(t['gap_closed'], '{:.1%}')} |")
    lines += ["", "Aims met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in agg.get("aims_met", {}).items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/lm_quality")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "lm"))
    parser.add_argument("--no-targets", action="store_true", help="the default pipeline only, no storage comparison")
    parser.add_argument("--records", nargs="+", help="aggregate these seeds' record.json files, running nothing")
    args = parser.parse_args(argv)
    if args.records:
        records = sorted((json.loads(Path(p).read_text()) for p in args.records), key=lambda r: r["seed"])
        args.seeds = [r["seed"] for r in records]
    else:
        records = [one_seed(seed, Path(args.work), not args.no_targets) for seed in args.seeds]
    agg = aggregate(records)
    result = {"seeds": args.seeds, "aims": AIMS, "aggregate": agg, "per_seed": records,
              "machine": {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(agg, args.seeds))
    print(markdown(agg, args.seeds))
    return result


if __name__ == "__main__":
    main()
