"""Training on several processes: torchrun launches them, DistributedDataParallel syncs them.

A training stage runs distributed in either of two ways:

- `distributed.nproc: N` in params.yaml (N > 1): the stage starts itself again under
  `torchrun --standalone --nproc-per-node N` on this machine and waits for it;
- the stage launched under torchrun by hand (any torchrun options: several nodes,
  an existing rendezvous): it joins the process group torchrun describes.

Every rank draws the same seeded permutation and takes a disjoint share of each
global batch (`student.batch_size` / `teacher.batch_size` stay the global batch), so
N processes see exactly the rows one process would; each rank's loss terms are
weighted by its share of the batch's rows (labelled rows, for the cross-entropy), so
the averaged gradient is the global batch's (distill.training). Rank 0 alone writes checkpoints, DVC
outputs, resume state and MLflow runs; the other ranks only compute.

The backend (`distributed.backend: auto`) is `nccl` when training runs on CUDA (one
process per GPU: `distributed.nproc: auto` starts one per visible GPU, and each takes
the GPU of its local rank, distill/device.py), `gloo` on the CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from distill import device as devices
from distill.config import DistributedConfig, RuntimeConfig, TrackingConfig
from distill.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = devices.CPU  # where this process trains (runtime.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world torchrun describes in the environment (one process when not under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1


def backend(cfg: DistributedConfig, device: torch.device) -> str:
    """nccl for CUDA tensors, with gloo beside it for the few CPU tensors the loop all-reduces
    (row counts, epoch sums); gloo alone on the CPU (see the module docstring)."""
    if cfg.backend == "nccl" and device.type != "cuda":
        raise UserError(f"distributed.backend nccl needs training on CUDA, but runtime.device resolves to {device}; "
                        "set distributed.backend: auto or gloo")
    if device.type == "cuda" and cfg.backend in ("auto", "nccl"):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def processes(cfg: DistributedConfig, device: torch.device = devices.CPU) -> int:
    """`cfg.nproc`; auto: one per visible GPU when training on CUDA, else 1."""
    if cfg.nproc != "auto":
        return cfg.nproc
    return torch.cuda.device_count() if device.type == "cuda" else 1


@contextmanager
def process_group(cfg: DistributedConfig, device: torch.device = devices.CPU) -> Iterator[World]:
    """Join torchrun's process group for the block (nothing to join in a single process)."""
    world = current()
    if not world.distributed:
        yield World(world.rank, world.size, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend(cfg, device))
    if not world.is_main:  # one copy of the log lines is enough
        logging.getLogger("distill").setLevel(logging.WARNING)
    try:
        joined = current()
        yield World(joined.rank, joined.size, device)
    finally:
        dist.destroy_process_group()


def launch(nproc: int, module: str, argv: Sequence[str]) -> int:
    """Run `python -m module argv` under torchrun with `nproc` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    log.info("launching %d processes: torchrun --standalone --nproc-per-node=%d -m %s", nproc, nproc, module)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def run_stage(cfg: DistributedConfig, runtime: RuntimeConfig, module: str, argv: Sequence[str] | None,
              body: Callable[[World], T]) -> T | dict:
    """A training stage's body, in this process or (nproc > 1, not yet under torchrun) in torchrun's.

    Under torchrun the process group is joined around `body(world)`; `body` is given
    the World (rank, size, device) so it trains where runtime.device says and writes
    only on rank 0. A device that is not there stops the stage before any process starts.
    """
    device = devices.resolve(runtime)
    nproc = processes(cfg, device)
    if nproc > 1 and not under_torchrun():
        backend(cfg, device)  # a backend that cannot work on this device: one sentence, before torchrun
        code = launch(nproc, module, list(sys.argv[1:] if argv is None else argv))
        if code:
            raise UserError(f"distributed training ({nproc} processes) failed with exit status {code}; "
                            "the first rank's error is printed above")
        return {"nproc": nproc}
    with process_group(cfg, device) as world:
        return body(world)


def rank_stage_run(world: World, stage: str, cfg: TrackingConfig, params: dict, receipt: str | None,
                   inputs_sha256: Callable[[], str]):
    """The stage's MLflow run (tracking.stage_run) on rank 0; a no-op run, and no receipt, elsewhere."""
    from distill import tracking

    if not world.is_main:
        cfg, receipt = cfg.model_copy(update={"enabled": False}), None
    return tracking.stage_run(stage, cfg, params, receipt, inputs_sha256)


def run_training(stage: str, task, params, paths, receipt: str | None, logged: dict,
                 argv: Sequence[str] | None, inputs_sha256: Callable[[], str]) -> dict:
    """A training stage (train_teacher, train_student, train_baseline): the task's method of that
    name on every rank (run_stage), inside the stage's tracked run (`logged`: its params;
    `inputs_sha256`: the fingerprint of its DVC inputs, from the stage). A student's run is tagged with
    the teacher and soft-label runs it learned from, and records the soft labels as its dataset."""
    def body(world: World) -> dict:
        with rank_stage_run(world, stage, params.tracking, logged, receipt, inputs_sha256) as run:
            result = getattr(task, stage)(params, paths, world, run)
            if paths.soft_labels is not None:
                lineage = result["soft_labels"]
                run.set_tags({"distill.teacher_run_id": lineage["teacher_run_id"],
                              "distill.soft_labels_run_id": lineage["soft_labels_run_id"]})
                # the folder; the digest is provenance.json's, which lists every shard's sha256
                run.log_dataset(paths.soft_labels, "soft_labels", lineage["soft_labels_sha256"], context="training")
        return result

    return run_stage(params.distributed, params.runtime, f"stages.{stage}", argv, body)
