"""Benchmark: what offline soft labels save, and what the pipeline costs beyond its training.

Seven measures, each a ratio of two timings (or sizes) taken in this one run on this
machine, written with the targets to benchmarks/results/perf.json:

1. offline_vs_online   student epoch time reading soft labels from Parquet / the same
                       training running the teacher on every batch (<= 0.5), both to
                       the end, with their test accuracies (equal within 0.5 pt)
2. dump_throughput     rows/s of the soft_labels step / rows/s of bare teacher
                       inference over the same rows (>= 0.9)
3. storage             bytes per row of float32, float16 and top-k soft labels, and the
                       student trained from each, on MNIST-1D and a 100-class problem
                       (float16 <= 0.5x float32 bytes at <= 0.2 pt accuracy change)
4. cache_overhead      fully cached `dvc repro` of the project / of a trivial 2-stage
                       pipeline (<= 1.5)
5. framework_overhead  `dvc repro` from scratch / benchmarks/bare_pytorch.py doing the
                       same compute (<= 1.3)
6. memory              peak RSS of the soft_labels and train_student stages at 100k and
                       1M transfer rows, soft labels in shards of 250k rows (< 2 GB,
                       roughly flat)
7. data_loading        share of a student epoch spent waiting for batches, in memory
                       (default data) and streamed (1M rows) (<= 10 %)

    python benchmarks/perf.py [--only NAME,...] [--out benchmarks/results/perf.json] [--merge]

It takes about half an hour on 2 cores. Measures 1, 2, 3 (MNIST-1D), 4, 5 and 7 share
one scratch copy of the project run with the default params.yaml (6 uses its code
only). `--merge` replaces only the measures run in an existing output file, keeps the
others, and records the command and time of each remeasured one under `remeasured`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill import data, device, shards, softlabels, training  # noqa: E402
from distill.classification_params import Params, SoftLabelsConfig, StudentConfig  # noqa: E402
from distill.config import RuntimeConfig, load_params  # noqa: E402
from distill.losses import Distillation  # noqa: E402
from distill import checkpoint
from distill.models import predict_logits  # noqa: E402
from distill.rows import InMemoryRows  # noqa: E402
from pipelines.tools import BIN  # noqa: E402
from tests.scratch import PROJECT_DIR, env, make_scratch_project  # noqa: E402

MEASURES = ("framework_overhead", "cache_overhead", "offline_vs_online", "dump_throughput", "storage", "memory",
            "data_loading")
GB = 1024**3

# ------------------------------------------------------------ arithmetic (tested)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator


def met(value: float, op: str, target: float) -> bool:
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[op]


def online_limit(t_student: float, t_teacher_forward: float) -> float:
    """The best offline/online ratio possible: the online epoch is at least student + teacher forward."""
    return t_student / (t_student + t_teacher_forward)


def summarize(results: dict) -> list[dict]:
    """One row per target: the measured value, the target, and whether it is met."""
    rows = []

    def add(measure: str, what: str, value: float, op: str, target: float) -> None:
        rows.append({"measure": measure, "what": what, "value": value, "target": f"{op} {target}",
                     "met": met(value, op, target)})

    if r := results.get("offline_vs_online"):
        add("offline_vs_online", "offline / online epoch time", r["ratio"], "<=", 0.5)
        add("offline_vs_online", "|accuracy difference| (pt)", r["accuracy_difference_pt"], "<=", 0.5)
    if r := results.get("dump_throughput"):
        add("dump_throughput", "stage rows/s / bare inference rows/s", r["ratio"], ">=", 0.9)
    if r := results.get("storage"):
        for name, d in r["datasets"].items():
            add("storage", f"{name}: float16 / float32 bytes", d["float16_bytes_ratio"], "<=", 0.5)
            add("storage", f"{name}: |float16 - float32 accuracy| (pt)", d["float16_accuracy_change_pt"], "<=", 0.2)
    if r := results.get("cache_overhead"):
        add("cache_overhead", "cached dvc repro: project / trivial", r["ratio"], "<=", 1.5)
    if r := results.get("framework_overhead"):
        add("framework_overhead", "dvc repro / bare PyTorch", r["ratio"], "<=", 1.3)
    if r := results.get("memory"):
        for stage, d in r["stages"].items():
            add("memory", f"{stage}: peak RSS at 1M rows (GB)", d["1000000"]["peak_rss_gb"], "<", 2.0)
            add("memory", f"{stage}: peak RSS 1M / 100k rows", d["ratio_1m_to_100k"], "<=", 1.5)
    if r := results.get("data_loading"):
        for mode, d in r.items():
            add("data_loading", f"{mode}: data wait / epoch time", d["data_wait_fraction"], "<=", 0.10)
    return rows


def merge_report(old: dict, new: dict) -> dict:
    """`old` with the measures of `new` in place of its own, the summary recomputed over all of
    them, and each replaced measure's command, time and machine under `remeasured`; the
    top-level command, time and machine stay those of `old`'s run."""
    measured = [m for m in MEASURES if m in new]
    merged = {**old, **{m: new[m] for m in measured}}
    merged["measure_wall_s"] = old.get("measure_wall_s", {}) | new.get("measure_wall_s", {})
    stamp = {k: new[k] for k in ("command", "measured_at", "machine")}
    merged["remeasured"] = old.get("remeasured", {}) | {m: stamp for m in measured}
    merged["summary"] = summarize({m: merged[m] for m in MEASURES if m in merged})
    return merged


def storage_entry(folder: Path, rows: int, accuracy: float) -> dict:
    size = sum(p.stat().st_size for p in shards.shard_paths(folder))
    return {"bytes": size, "bytes_per_row": size / rows, "student_test_accuracy": accuracy}


def storage_summary(entries: dict) -> dict:
    fp32, fp16 = entries["float32"], entries["float16"]
    return {
        "formats": entries,
        "float16_bytes_ratio": ratio(fp16["bytes"], fp32["bytes"]),
        "float16_accuracy_change_pt": abs(fp16["student_test_accuracy"] - fp32["student_test_accuracy"]) * 100,
    }


# ------------------------------------------------------------ helpers


def run(cmd: list[str], cwd: Path, environ: dict | None = None) -> float:
    """Wall seconds of one command (output discarded; a failure raises)."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=environ or env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_run(cmd: list[str], cwd: Path, repeats: int = 3) -> dict:
    times = [run(cmd, cwd) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "runs_s": times}


def peak_rss(cmd: list[str], cwd: Path, environ: dict) -> tuple[int, float]:
    """(peak resident set size in bytes, wall seconds) of one child process.

    Read from the child's own high-water mark (VmHWM in /proc) while it runs: the
    rusage of a forked child would count this benchmark process's memory too.
    """
    start, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.DEVNULL, stderr=log)
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid))
            time.sleep(0.05)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {log.read().decode()[-2000:]}")
    return peak, time.perf_counter() - start


def vm_hwm(pid: int) -> int:
    """A process's peak resident set size so far, in bytes (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_accuracy(model: torch.nn.Module, prepared: Path) -> float:
    test = data.read_split(prepared, "test")
    logits = predict_logits(model, torch.from_numpy(test.x))
    return float((logits.argmax(1).numpy() == test.y).mean())


def train_student(cfg: StudentConfig, seed: int, prepared: Path, rows, distillation) -> training.TrainResult:
    model = training.initial_model(cfg, data.read_meta(prepared), seed)
    val = data.read_split(prepared, "val")
    job = training.TrainJob(cfg, seed, "student", distillation=distillation, buffer_rows=cfg.shuffle_buffer,
                            world=training.World(device=RUNTIME["device"]), precision=RUNTIME["precision"])
    return training.fit_classifier(model, job, rows, (val.x, val.y))


def student_rows_in_memory(prepared: Path) -> InMemoryRows:
    parts = [data.read_split(prepared, s) for s in softlabels.LABELLED_SPLITS if (prepared / f"{s}.parquet").exists()]
    return InMemoryRows(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def epoch_summary(timings: list) -> dict:
    return {
        "median_epoch_s": statistics.median(t.seconds for t in timings),
        "epochs": len(timings),
        "data_wait_fraction": sum(t.data_wait_s for t in timings) / sum(t.seconds for t in timings),
    }


class Project:
    """The scratch copy run with the default params.yaml, made on first use."""

    def __init__(self, root: Path):
        self.root, self.copied, self.made, self.repro_s = root, False, False, None

    def code(self) -> Path:
        """The scratch copy's folder, copied (nothing run) on first use."""
        if not self.copied:
            make_scratch_project(self.root)
            self.copied = True
        return self.root

    def get(self) -> Project:
        if not self.made:
            self.code()
            print("dvc repro of the default pipeline ...", flush=True)
            self.repro_s = run([str(BIN / "dvc"), "repro"], self.root)
            self.made = True
        return self

    @property
    def params(self) -> Params:
        return load_params(self.root / "params.yaml")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"


# ------------------------------------------------------------ measures


def framework_overhead(project: Project, tmp: Path) -> dict:
    p = project.get()
    print("bare PyTorch script ...", flush=True)
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "python"), str(p.root / "benchmarks" / "bare_pytorch.py"),
                          "--params", str(p.root / "params.yaml")], check=True, capture_output=True, text=True,
                         env=env()).stdout
    bare_s = time.perf_counter() - start
    metrics = json.loads((p.root / "reports" / "metrics.json").read_text())
    startup = median_run([str(BIN / "python"), "-c", "import stages.train_student"], p.root)
    mlflow_import = median_run([str(BIN / "python"), "-c", "import mlflow"], p.root)
    return {
        "pipeline_dvc_repro_s": p.repro_s,
        "bare_pytorch_s": bare_s,
        "ratio": ratio(p.repro_s, bare_s),
        "bare_test_accuracy": json.loads(out.splitlines()[-1])["test_accuracy"],
        "pipeline_test_accuracy": {m: metrics[m]["test_accuracy"] for m in ("teacher", "student", "baseline")},
        "stage_import_s": startup["median_s"],
        "mlflow_import_s": mlflow_import["median_s"],
    }


def cache_overhead(project: Project, tmp: Path) -> dict:
    p = project.get()
    trivial = tmp / "trivial"
    trivial.mkdir()
    (trivial / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
        "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    }}))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "repro", "-q"]):
        run(cmd, trivial)
    dvc = [str(BIN / "dvc"), "repro"]
    project_times, trivial_times = median_run(dvc, p.root), median_run(dvc, trivial)
    return {"project_cached_repro": project_times, "trivial_cached_repro": trivial_times,
            "ratio": ratio(project_times["median_s"], trivial_times["median_s"])}


def offline_vs_online(project: Project, tmp: Path) -> dict:
    p = project.get()
    params = p.params
    cfg = params.student
    kd = Distillation.of(cfg)
    print("student, offline soft labels ...", flush=True)
    rows = softlabels.StudentRows(p.prepared, p.root / "data" / "soft_labels", data.read_meta(p.prepared))
    offline = train_student(cfg, params.seed, p.prepared, rows, kd)
    teacher, _ = checkpoint.load(p.root / "models" / "teacher.pt")
    print("student, online teacher ...", flush=True)
    in_memory = student_rows_in_memory(p.prepared)
    online = train_student(cfg, params.seed, p.prepared, in_memory,
                           Distillation.of(cfg, teacher=teacher))
    x = torch.from_numpy(in_memory.block.x)
    forward = []
    for _ in range(3):  # the teacher forward alone, over one epoch's rows in training-size batches
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), cfg.batch_size):
                teacher(x[i : i + cfg.batch_size])
        forward.append(time.perf_counter() - start)
    off, on = epoch_summary(offline.timings), epoch_summary(online.timings)
    acc_off, acc_on = test_accuracy(offline.model, p.prepared), test_accuracy(online.model, p.prepared)
    return {
        "rows_per_epoch": len(x),
        "offline": off | {"test_accuracy": acc_off},
        "online": on | {"test_accuracy": acc_on},
        "teacher_forward_epoch_s": statistics.median(forward),
        "ratio": ratio(off["median_epoch_s"], on["median_epoch_s"]),
        "limit_t_student_over_t_student_plus_teacher_forward": online_limit(off["median_epoch_s"],
                                                                              statistics.median(forward)),
        "accuracy_difference_pt": abs(acc_off - acc_on) * 100,
    }


def dump_throughput(project: Project, tmp: Path, repeats: int = 3) -> dict:
    p = project.get()
    cfg = p.params.soft_labels
    teacher, _ = checkpoint.load(p.root / "models" / "teacher.pt")
    x = torch.from_numpy(student_rows_in_memory(p.prepared).block.x)
    bare, stage = [], []
    for i in range(repeats):  # interleaved, so drifts in machine load hit both
        start = time.perf_counter()
        with torch.inference_mode():
            for j in range(0, len(x), cfg.batch_size):
                teacher(x[j : j + cfg.batch_size])
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        softlabels.dump(p.root / "models" / "teacher.pt", p.prepared, tmp / f"dump{i}", cfg, **dump_runtime())
        stage.append(time.perf_counter() - start)
    bare_rps, stage_rps = len(x) / statistics.median(bare), len(x) / statistics.median(stage)
    return {"rows": len(x), "batch_size": cfg.batch_size, "bare_inference_rows_per_s": bare_rps,
            "soft_labels_rows_per_s": stage_rps, "bare_runs_s": bare, "stage_runs_s": stage,
            "ratio": ratio(stage_rps, bare_rps)}


def storage_formats(name: str, prepared: Path, teacher_path: Path, student: StudentConfig, seed: int, top_k: int,
                    out: Path) -> dict:
    meta = data.read_meta(prepared)
    rows = meta.splits["train"] + meta.splits.get("transfer", 0)
    formats = {"float32": SoftLabelsConfig(dtype="float32", batch_size=4096),
               "float16": SoftLabelsConfig(dtype="float16", batch_size=4096),
               f"top{top_k}_float16": SoftLabelsConfig(dtype="float16", top_k=top_k, batch_size=4096)}
    entries = {}
    for fmt, cfg in formats.items():
        print(f"storage: {name} {fmt} ...", flush=True)
        softlabels.dump(teacher_path, prepared, out / fmt, cfg, **dump_runtime())
        result = train_student(student, seed, prepared, softlabels.StudentRows(prepared, out / fmt, meta),
                               Distillation.of(student))
        entries[fmt] = storage_entry(out / fmt, rows, test_accuracy(result.model, prepared))
    return storage_summary(entries) | {"rows": rows, "num_classes": meta.num_classes}


HUNDRED_CLASSES = {
    "data": {"source": "synthetic", "seed": 3, "num_samples": 20000, "transfer_size": 50000,
             "synthetic": {"n_features": 64, "n_classes": 100, "hidden": 64}},
    "teacher": {"arch": "mlp", "hidden": [512, 512], "epochs": 20, "batch_size": 256, "lr": 0.003,
                "weight_decay": 0.01},
    "student": {"arch": "mlp", "hidden": [64], "epochs": 20, "batch_size": 256, "lr": 0.003,
                "temperature": 4.0, "alpha": 0.9},
}


def storage(project: Project, tmp: Path) -> dict:
    p = project.get()
    params = p.params
    datasets = {"mnist1d": storage_formats("mnist1d", p.prepared, p.root / "models" / "teacher.pt", params.student,
                                           params.seed, 3, tmp / "mnist1d")}
    big = Params.model_validate(HUNDRED_CLASSES)
    prepared = tmp / "hundred" / "prepared"
    data.prepare(big.data, prepared)
    print("storage: 100-class teacher ...", flush=True)
    training.train_on_labels(training.TrainJob(big.teacher, 0, "teacher", world=training.World(device=RUNTIME["device"]),
                                               precision=RUNTIME["precision"]), prepared,
                             training.Outputs(tmp / "hundred" / "teacher.pt", tmp / "hundred" / "t.csv"))
    datasets["synthetic_100_classes"] = storage_formats("synthetic_100_classes", prepared, tmp / "hundred" / "teacher.pt", big.student, 0, 10,
                                                        tmp / "hundred")
    datasets["synthetic_100_classes"]["params"] = HUNDRED_CLASSES
    return {"datasets": datasets}


SCALE_SHARD_ROWS = 250_000  # 100k rows: one shard; 1M rows: five


def scale_params(project: Project, transfer_rows: int) -> dict:
    """A synthetic project for the memory measure: a quick teacher, soft labels in shards of
    SCALE_SHARD_ROWS rows, the default student for one epoch."""
    params = yaml.safe_load((project.code() / "params.yaml").read_text())
    params["data"] |= {"source": "synthetic", "seed": 1, "num_samples": 5000, "transfer_size": transfer_rows,
                       "synthetic": {"n_features": 40, "n_classes": 10, "hidden": 32}}
    params["teacher"] |= {"arch": "mlp", "hidden": [256, 256], "epochs": 2, "dropout": 0.0}
    params["soft_labels"] |= {"shard_rows": SCALE_SHARD_ROWS}
    params["student"] |= {"epochs": 1}
    params["tracking"]["enabled"] = False
    return params


STAGE_ARGS = {
    "prepare": ["--out", "data/prepared"],
    "train_teacher": ["--prepared", "data/prepared", "--model", "models/teacher.pt", "--history", "t.csv"],
    "soft_labels": ["--teacher", "models/teacher.pt", "--prepared", "data/prepared", "--out", "data/soft_labels"],
    "train_student": ["--prepared", "data/prepared", "--soft-labels", "data/soft_labels", "--model",
                      "models/student.pt", "--history", "s.csv"],
}


def scale_project(project: Project, tmp: Path, n: int) -> tuple[Path, dict]:
    """Run the stages of a synthetic project with `n` transfer rows as fresh processes;
    return its folder and the peak RSS and wall time of soft_labels and train_student."""
    root = tmp / f"scale{n}"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(scale_params(project, n), sort_keys=False))
    # The folder holds params and outputs only; the code is the scratch copy's.
    code = env() | {"PYTHONPATH": str(project.code())}
    measured = {}
    for stage, args in STAGE_ARGS.items():
        print(f"memory: {stage} at {n} transfer rows ...", flush=True)
        cmd = [str(BIN / "python"), "-m", f"stages.{stage}", "--params", "params.yaml", *args]
        if stage in ("soft_labels", "train_student"):
            rss, seconds = peak_rss(cmd, root, code)
            measured[stage] = {"peak_rss_bytes": rss, "peak_rss_gb": rss / GB, "seconds": seconds}
        else:
            run(cmd, root, code)
    prov = shards.read_provenance(root / "data" / "soft_labels")
    for entry in measured.values():
        entry |= {"rows": prov["rows"], "shards": len(prov["shards"])}
    return root, measured


def memory(project: Project, tmp: Path, sizes=(100_000, 1_000_000)) -> dict:
    stages: dict[str, dict] = {}
    for n in sizes:
        for stage, entry in scale_project(project, tmp, n)[1].items():
            stages.setdefault(stage, {})[str(n)] = entry
    for d in stages.values():
        d["ratio_1m_to_100k"] = ratio(d[str(sizes[1])]["peak_rss_bytes"], d[str(sizes[0])]["peak_rss_bytes"])
    return {"stages": stages, "shard_rows": SCALE_SHARD_ROWS,
            "params": {str(n): scale_params(project, n) for n in sizes}}


def data_loading(project: Project, tmp: Path) -> dict:
    p = project.get()
    params = p.params
    result = {}
    print("data loading: default data, in memory ...", flush=True)
    cfg = params.student.model_copy(update={"epochs": 3})
    rows = softlabels.StudentRows(p.prepared, p.root / "data" / "soft_labels", data.read_meta(p.prepared))
    kd = Distillation.of(cfg)
    result["default_in_memory"] = epoch_summary(train_student(cfg, params.seed, p.prepared, rows, kd).timings)
    big = tmp / "scale1000000"
    if not (big / "data" / "soft_labels").exists():  # made by the memory measure when it ran first
        scale_project(project, tmp, 1_000_000)
    print("data loading: 1M rows, streamed ...", flush=True)
    prepared = big / "data" / "prepared"
    rows = softlabels.StudentRows(prepared, big / "data" / "soft_labels", data.read_meta(prepared))
    cfg = params.student.model_copy(update={"epochs": 1})
    result["streamed_1m_rows"] = epoch_summary(train_student(cfg, 0, prepared, rows, kd).timings)
    result["streamed_1m_rows"]["shuffle_buffer"] = cfg.shuffle_buffer
    return result


# ------------------------------------------------------------ main


# Where the library's steps run in this benchmark (--device, --precision); recorded with every figure.
RUNTIME: dict = {"device": torch.device("cpu"), "precision": "fp32"}


def dump_runtime() -> dict:
    return {"device": RUNTIME["device"], "precision": RUNTIME["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="runtime.device for the library's steps (cpu, cuda, auto)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated measures, in this order")
    parser.add_argument("--out", default="benchmarks/results/perf.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other measures of an existing --out file, replace only these")
    args = parser.parse_args()
    chosen = [m for m in MEASURES if m in args.only.split(",")]
    RUNTIME.update(device=device.resolve(RuntimeConfig(device=args.device, precision=args.precision)),
                   precision=args.precision)
    results: dict = {}
    walls: dict[str, float] = {}
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        project = Project(Path(tmp) / "project")
        for name in chosen:
            started = time.perf_counter()
            results[name] = globals()[name](project, Path(tmp))
            walls[name] = time.perf_counter() - started
            print(json.dumps({name: results[name], "wall_s": walls[name]}, indent=2, default=str), flush=True)
    report = {
        "command": "python benchmarks/perf.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": device.describe(RUNTIME["device"], RUNTIME["precision"])},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summarize(results),
        "measure_wall_s": walls,
        **results,
    }
    out = PROJECT_DIR / args.out
    if args.merge and out.is_file():
        report = merge_report(json.loads(out.read_text()), report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for row in report["summary"]:
        print(f"{'met' if row['met'] else 'NOT MET':8} {row['what']}: {row['value']:.3f} (target {row['target']})")


if __name__ == "__main__":
    main()
