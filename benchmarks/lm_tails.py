"""Benchmark: what the top-k tail mass is taken to stand for, measured on one pipeline's soft labels.

With a finished language-model pipeline folder of benchmarks/lm_quality.py (default:
benchmarks/.work/lm/seed0: its top-32 soft labels, in top-32/ unless the default pipeline
stored top-32 itself, and its baseline), one student per `student.tail` (zero, uniform, bucket) is
trained with `stages.train_student` (same steps, seed and settings; only the tail changes), and
each is scored on the test windows.
Writes benchmarks/results/lm_tails.json.

    python benchmarks/lm_tails.py [--work benchmarks/.work/lm/seed0]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.lm_quality import timed  # noqa: E402
from distill import checkpoint, corpus, lm  # noqa: E402

TAILS = ("zero", "uniform", "bucket")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "lm" / "seed0"))
    parser.add_argument("--out", default="benchmarks/results/lm_tails.json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    test = corpus.read_windows(work / "data" / "prepared", "test")
    top32 = work / "top-32" if (work / "top-32").is_dir() else work
    prov = json.loads((top32 / "data" / "soft_labels" / "provenance.json").read_text())
    result = {"soft_labels": f"{prov['targets']} {prov['width']}", "work": str(work),
              "teacher_bits_per_token": metrics["teacher"]["test_bits_per_token"],
              "baseline_bits_per_token": metrics["baseline"]["test_bits_per_token"], "students": {}}
    for tail in TAILS:
        folder = work / f"tail-{tail}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "data").mkdir(parents=True)
        for name in ("prepared", "soft_labels"):
            (folder / "data" / name).symlink_to(top32 / "data" / name)
        params = yaml.safe_load((top32 / "params.yaml").read_text())
        params["student"]["tail"] = tail
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        seconds = timed("train_student", folder)
        model, _ = checkpoint.load(folder / "models" / "student.pt", task="language_model")
        bits = lm.nats_per_token(model, test, 64, torch.device("cpu")) / math.log(2)
        result["students"][tail] = {"test_bits_per_token": bits, "seconds": seconds}
        print(f"tail {tail}: student {bits:.4f} bits/token ({seconds:.0f} s)", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
