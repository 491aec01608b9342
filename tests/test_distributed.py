"""Distributed training: rank shares of each global batch, and torchrun runs against one process."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_stage_in_process, subprocess_env, tiny_params, write_params
from distill.rows import Batches, InMemoryRows
from scratch import make_scratch_project
from test_rows import CountingRows

# 2 processes against 1 with the same global batch: the same rows meet the same
# weights and the loss shares add up to the whole batch's loss, so the runs differ
# only by float rounding (summation order in the all-reduce), which training carries
# along. Measured on the tiny runs below: train loss within 2.4e-7 relative, weights
# within 9e-8; the tolerances leave room for other CPUs' rounding.
VAL_ACCURACY_TOLERANCE = 0.01  # per epoch, absolute: one validation row of 120 may flip
TRAIN_LOSS_RTOL = 1e-5  # per epoch, relative
WEIGHT_ATOL = 1e-5  # final weights, absolute


@pytest.mark.parametrize("buffer_rows", [None, 40])  # in memory, streamed
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_share_every_global_batch_without_overlap(buffer_rows, ranks):
    sizes = [30, 30, 37]
    one = Batches(CountingRows(sizes), batch_size=8, buffer_rows=buffer_rows)
    shares = [Batches(CountingRows(sizes), batch_size=8, buffer_rows=buffer_rows, rank=r, ranks=ranks)
              for r in range(ranks)]
    whole = [y.tolist() for _, y, _ in one.epoch(torch.Generator().manual_seed(5))]
    split = [[y.tolist() for _, y, _ in b.epoch(torch.Generator().manual_seed(5))] for b in shares]
    assert all(len(s) == len(whole) == one.steps_per_epoch for s in split)
    for step, batch in enumerate(whole):
        parts = [s[step] for s in split]
        assert sorted(sum(parts, [])) == sorted(batch)  # together: exactly the one-process batch


def _shares_on_rank(rank: int, port: int, out: dict) -> None:
    """One of two gloo ranks: this rank's shares of a KD batch loss, and its gradient."""
    import torch.distributed as dist

    from distill.losses import Distillation
    from distill.training import _rank_shares

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y, teacher = batch()
        model = linear()
        kd = Distillation(temperature=2.0, alpha=0.7)
        idx = torch.arange(len(y))[rank::2]
        logits = model(x[idx])
        shares = _rank_shares(kd(logits, teacher[idx], y[idx]), y[idx], logits, kd)
        shares["loss"].backward()
        grad = model.weight.grad.clone()
        dist.all_reduce(grad)
        out[rank] = ({k: float(v.detach()) for k, v in shares.items()}, grad)
    finally:
        dist.destroy_process_group()


def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(25, 4, generator=gen)
    y = torch.tensor([0, 1, 2, -1, -1] * 5)
    y[:12:2] = -1  # 11 labelled rows of 25: 4 on rank 0 (13 rows), 7 on rank 1 (12 rows)
    return x, y, torch.randn(25, 3, generator=gen)


def test_rank_shares_of_the_loss_and_gradient_add_up_to_the_whole_batch():
    """Two gloo processes, each on its share of a 25-row batch with labelled rows split 4 / 7:
    their loss shares sum, and their summed gradients equal, what one process gets."""
    import torch.multiprocessing as mp

    from servers import free_port
    from distill.losses import Distillation

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_shares_on_rank, args=(free_port(), out), nprocs=2)
        ranks = [out[0], out[1]]
    x, y, teacher = batch()
    model = linear()
    kd = Distillation(temperature=2.0, alpha=0.7)
    whole = kd(model(x), teacher, y)
    whole["loss"].backward()
    for key in ("loss", "kd", "ce"):
        assert sum(r[0][key] for r in ranks) == pytest.approx(float(whole[key].detach()), rel=1e-6), key
    torch.testing.assert_close(ranks[0][1], model.weight.grad)  # all-reduced: the same on both ranks


def test_one_process_batches_are_unchanged_by_the_rank_arguments():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    rows = InMemoryRows(x, np.arange(50))
    plain = [y.tolist() for _, y, _ in Batches(rows, 16).epoch(torch.Generator().manual_seed(1))]
    ranked = [y.tolist() for _, y, _ in Batches(rows, 16, rank=0, ranks=1).epoch(torch.Generator().manual_seed(1))]
    assert plain == ranked


# ---------------------------------------------------------------- torchrun, end to end


def stage_argv(root: Path, stage: str) -> list[str]:
    return shlex.split(yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"])[3:]


def run(root: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    # one thread a process, as torchrun gives each rank: the 1-process runs sum in the same order
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_close_runs(one: dict, two: dict) -> None:
    assert len(one["history"]) == len(two["history"])
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= VAL_ACCURACY_TOLERANCE, (a, b)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=TRAIN_LOSS_RTOL), (a, b)
    for name, weight in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], weight, rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(tmp_path):
    # 45 rows a global batch: 880 student rows end in a short batch of 25, split 13 + 12
    params = tiny_params(**{"student.batch_size": 45, "teacher.batch_size": 45, "student.epochs": 4})
    root = make_scratch_project(tmp_path / "project", yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "train_teacher", "soft_labels"):
        run_stage_in_process(root, stage)
    teacher_one = checkpoint(root / "models/teacher.pt")

    # the student: one process, then two by the params key (the stage starts torchrun itself)
    run(root, [sys.executable, "-m", "stages.train_student", *stage_argv(root, "train_student")])
    student_one = checkpoint(root / "models/student.pt")
    write_params(root / "params.yaml", params | {"distributed": {"nproc": 2, "backend": "gloo"},
                                                 "tracking": {"enabled": True, "experiment": "ddp"}})
    out = run(root, [sys.executable, "-m", "stages.train_student", *stage_argv(root, "train_student")])
    assert "--nproc-per-node=2" in out.stderr
    student_two = checkpoint(root / "models/student.pt")
    assert student_two["processes"] == 2 and "processes" not in student_one
    assert_close_runs(student_one, student_two)

    # rank 0 alone logged: one MLflow run for the stage, with the processes as a param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp")
    runs = client.search_runs([experiment.experiment_id], "tags.`distill.stage` = 'train_student'")
    assert len(runs) == 1 and runs[0].data.params["distributed.nproc"] == "2"
    assert runs[0].info.run_id == student_two["mlflow_run_id"]

    # the teacher, launched under torchrun by hand
    write_params(root / "params.yaml", params)
    run(root, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "stages.train_teacher", *stage_argv(root, "train_teacher")])
    teacher_two = checkpoint(root / "models/teacher.pt")
    assert teacher_two["processes"] == 2
    assert_close_runs(teacher_one, teacher_two)
    assert not any((root / ".resume").glob("*")), "rank 0 removes the resume state when training ends"
