"""Benchmark: what offline soft labels save with a transformer teacher (the text pipeline).

Two ratios, each of two timings taken in this one run on this machine, from a finished
text pipeline folder (by default the first seed of `benchmarks/quality.py --configs
rotten-tomatoes`: the fine-tuned MiniLM, its soft labels, the prepared Rotten Tomatoes):

1. offline_vs_online  a student epoch reading the stored soft labels / the same epoch
                      running the teacher on every batch (target <= 0.1), over the same
                      `--rows` rows of train + transfer, the same student and batches
2. dump_throughput    rows/s of the soft_labels step (softlabels.dump: Parquet shards,
                      provenance) / rows/s of a bare loop of the same teacher over the
                      same rows, in the same length-sorted batches (target >= 0.9)

    python benchmarks/text_perf.py [--work benchmarks/.work/quality-rotten-tomatoes-seed0] [--rows 4096]

Writes benchmarks/results/text_perf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import data, softlabels, training  # noqa: E402
from distill.config import load_params  # noqa: E402
from distill.losses import Distillation  # noqa: E402
from distill import checkpoint  # noqa: E402
from distill.models import TOKEN_BATCH  # noqa: E402
from distill.rows import InMemoryRows  # noqa: E402


def student_epoch(work: Path, rows: InMemoryRows, distillation: Distillation) -> float:
    """Seconds of one epoch of the pipeline's student config over `rows` (the training loop's own timing)."""
    params = load_params(work / "params.yaml")
    cfg = params.student.model_copy(update={"epochs": 1, "min_steps": 0})
    meta = data.read_meta(work / "data" / "prepared")
    model = training.initial_model(cfg, meta, params.seed)
    val = data.read_split(work / "data" / "prepared", "val")
    job = training.TrainJob(cfg, params.seed, "student", distillation=distillation)
    return training.fit_classifier(model, job, rows, (val.x[:64], val.y[:64])).timings[0].seconds


def offline_vs_online(work: Path, n: int) -> dict:
    prepared, soft = work / "data" / "prepared", work / "data" / "soft_labels"
    meta = data.read_meta(prepared)
    stored = softlabels.StudentRows(prepared, soft, meta)
    block = stored.read_block(0)
    take = np.arange(min(n, len(block.y)))
    offline_rows = InMemoryRows(block.x[take], block.y[take], block.logits[take])
    online_rows = InMemoryRows(block.x[take], block.y[take])
    params = load_params(work / "params.yaml")
    teacher, _ = checkpoint.load(work / "models" / "teacher.pt")
    print(f"student epoch over {len(take)} rows, offline ...", flush=True)
    offline = student_epoch(work, offline_rows, Distillation.of(params.student))
    print("... and online (the teacher on every batch)", flush=True)
    online = student_epoch(work, online_rows, Distillation.of(params.student, teacher=teacher))
    return {"rows": len(take), "offline_epoch_s": offline, "online_epoch_s": online,
            "ratio": offline / online, "target": "<= 0.1", "met": offline / online <= 0.1}


@torch.inference_mode()
def bare_loop(model, x: torch.Tensor, row_group: int, pad_id: int) -> float:
    """Seconds for the teacher over `x` as the dump batches it, without the pipeline: each
    `row_group` rows sorted by length, passes of TOKEN_BATCH rows cut to their longest row,
    the encoder, mean pooling and head called directly."""
    model.eval()
    start = time.perf_counter()
    for g in range(0, len(x), row_group):
        group = x[g : g + row_group]
        lengths = (group != pad_id).sum(1)
        order = torch.argsort(lengths)
        for i in range(0, len(group), TOKEN_BATCH):
            idx = order[i : i + TOKEN_BATCH]
            ids = group[idx][:, : int(lengths[idx].max())].long()
            mask = ids != pad_id
            hidden = model.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            w = mask.unsqueeze(2).float()
            model.head((hidden * w).sum(1) / w.sum(1)).numpy()
    return time.perf_counter() - start


def dump_throughput(work: Path, repeats: int) -> dict:
    prepared = work / "data" / "prepared"
    cfg = load_params(work / "params.yaml").soft_labels
    teacher, _ = checkpoint.load(work / "models" / "teacher.pt")
    meta = data.read_meta(prepared)
    x = torch.from_numpy(np.concatenate([data.read_split(prepared, s).x for s in softlabels.LABELLED_SPLITS
                                         if (prepared / f"{s}.parquet").exists()]))
    bare, stage = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):  # interleaved, so drifts in machine load hit both
            print(f"bare loop and soft_labels dump over {len(x)} rows ({i + 1}/{repeats}) ...", flush=True)
            bare.append(bare_loop(teacher, x, cfg.batch_size, meta.tokens["pad_id"]))
            start = time.perf_counter()
            softlabels.dump(work / "models" / "teacher.pt", prepared, Path(tmp) / f"dump{i}", cfg)
            stage.append(time.perf_counter() - start)
    bare_rps, stage_rps = len(x) / statistics.median(bare), len(x) / statistics.median(stage)
    return {"rows": len(x), "row_group": cfg.batch_size, "pass_rows": TOKEN_BATCH, "bare_runs_s": bare,
            "stage_runs_s": stage, "bare_rows_per_s": bare_rps, "soft_labels_rows_per_s": stage_rps,
            "ratio": stage_rps / bare_rps, "target": ">= 0.9", "met": stage_rps / bare_rps >= 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="benchmarks/.work/quality-rotten-tomatoes-seed0",
                        help="a finished text pipeline folder")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the offline / online student epochs")
    parser.add_argument("--repeats", type=int, default=1, help="bare loop and dump runs each")
    parser.add_argument("--out", default="benchmarks/results/text_perf.json")
    args = parser.parse_args()
    work = ROOT / args.work
    torch.set_num_threads(os.cpu_count() or 1)
    report = {"command": "python benchmarks/text_perf.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "offline_vs_online": offline_vs_online(work, args.rows),
              "dump_throughput": dump_throughput(work, args.repeats)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("offline_vs_online", "dump_throughput"):
        r = report[name]
        print(f"{'met' if r['met'] else 'NOT MET':8} {name}: {r['ratio']:.3f} (target {r['target']})")


if __name__ == "__main__":
    main()
