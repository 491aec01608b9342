"""The pipeline's compute as one plain PyTorch script: the yardstick for framework overhead.

Same work as `dvc repro` on the default params.yaml: generate MNIST-1D (with the
transfer set), standardize, train the teacher, run it over train + transfer, train
the distilled student and the baseline, measure test accuracy. Same models, epochs,
batch sizes, optimizer, schedule and per-epoch validation with best-epoch selection;
no DVC, Prefect, MLflow, Parquet or subprocesses. benchmarks/perf.py times it as a
fresh process.

    python benchmarks/bare_pytorch.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.models import CNN1d, MLP  # noqa: E402  (the network definitions only)


def mnist1d(num_samples: int, transfer: int, seed: int, test_fraction: float):
    from mnist1d.data import get_dataset_args, make_dataset

    def generate(n, s, split):
        args = get_dataset_args()
        args.num_samples, args.seed, args.train_split = n, s, split
        return make_dataset(args)

    d = generate(num_samples, seed, 1 - test_fraction)
    return d["x"], d["y"], d["x_test"], d["y_test"], generate(transfer, seed + 1_000_003, 1.0)["x"]


def build(cfg: dict, d: int, c: int) -> torch.nn.Module:
    if cfg["arch"] == "cnn1d":
        return CNN1d(d, c, cfg["channels"], cfg["hidden"], cfg["kernel_size"], cfg["dropout"])
    return MLP(d, c, cfg["hidden"], cfg["dropout"])


def train(cfg, x, y, vx, vy, seed, teacher_logits=None, temperature=1.0, alpha=0.0):
    torch.manual_seed(seed)
    model = build(cfg, x.shape[1], 10)
    gen = torch.Generator().manual_seed(seed)
    steps = -(-len(x) // cfg["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps)
    best, best_acc = None, -1.0
    for _ in range(cfg["epochs"]):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg["batch_size"]):
            out, yb = model(x[idx]), y[idx]
            labelled = yb >= 0
            ce = F.cross_entropy(out[labelled], yb[labelled]) if labelled.any() else out.sum() * 0
            if teacher_logits is None:
                loss = ce
            else:
                t = temperature
                kd = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(teacher_logits[idx] / t, 1),
                              reduction="batchmean", log_target=True) * t * t
                loss = alpha * kd + (1 - alpha) * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            acc = float((model(vx).argmax(1) == vy).float().mean())
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model), acc
    return best.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    p = yaml.safe_load(Path(parser.parse_args().params).read_text())
    d = p["data"]
    x, y, xt, yt, xtr = mnist1d(d["num_samples"], d["transfer_size"], d["seed"], d["test_fraction"])
    rng = np.random.default_rng(d["seed"])
    perm = rng.permutation(len(x))
    n_val = int(round(len(x) * d["val_fraction"]))
    vi, ti = perm[:n_val], perm[n_val:]
    mean, std = x[ti].mean(0), x[ti].std(0) + 1e-12
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    tx, ty, vx, vy = f(x[ti]), torch.from_numpy(y[ti]).long(), f(x[vi]), torch.from_numpy(y[vi]).long()
    test_x, test_y, transfer_x = f(xt), torch.from_numpy(yt).long(), f(xtr)

    teacher = train(p["teacher"], tx, ty, vx, vy, p["seed"])
    sx = torch.cat([tx, transfer_x])
    sy = torch.cat([ty, torch.full((len(transfer_x),), -1)])
    with torch.inference_mode():
        logits = torch.cat([teacher(sx[i:i + 4096]) for i in range(0, len(sx), 4096)])
    s = p["student"]
    student = train(s, sx, sy, vx, vy, p["seed"], logits.clone(), s["temperature"], s["alpha"])
    baseline = train(s, tx, ty, vx, vy, p["seed"])
    with torch.inference_mode():
        acc = {name: float((m(test_x).argmax(1) == test_y).float().mean())
               for name, m in [("teacher", teacher), ("student", student), ("baseline", baseline)]}
    print(json.dumps({"test_accuracy": acc, "seconds": time.perf_counter() - START}))


if __name__ == "__main__":
    main()
