"""Training: the loop shared by teacher, student and baseline, and the three stage steps.

Batches come from distill.rows: rows that fit the shuffle buffer sit in memory and
are drawn by a seeded permutation; a larger transfer set is streamed from Parquet
block by block (no DataLoader workers, ordered and repeatable either way). The
checkpoint kept is the one with the best validation accuracy; the test split is
never looked at here.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distill import data, softlabels
from distill import device as devices
from distill.classification_params import ModelTrainConfig, ResumeConfig
from distill.distributed import World
from distill.io import file_sha256, write_csv
from distill.losses import UNLABELED, Distillation, cross_entropy, rank_share
from distill.models import build_model, check_model, count_parameters, model_args, predict_logits, save_checkpoint
from distill.progress import bar
from distill.resume import Resume
from distill.rows import Batches, EpochTiming, InMemoryRows, Rows, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """One training run: the model's config and budget, the seed, and how the run goes.

    The stage steps build it (train_student adds the distillation and the shuffle buffer
    from its config); `fit` reads nothing else.
    """

    cfg: ModelTrainConfig
    seed: int = 0
    name: str = "model"  # teacher | student | baseline: log lines, progress bar, resume file
    distillation: Distillation | None = None  # None: cross-entropy on the labelled rows
    buffer_rows: int | None = None  # rows held in memory at once (None: all)
    world: World = World()  # this process's place under torchrun, and its device (runtime.device)
    precision: str = "fp32"  # runtime.precision: fp32 | bf16 | fp16 (autocast; see distill/device.py)
    on_epoch: Callable[[dict[str, float]], None] | None = None  # each epoch's row plus its timing


@dataclass(frozen=True)
class Outputs:
    """Where a training stage step writes, and what its checkpoint records besides the model."""

    model: Path
    history: Path
    info: dict = field(default_factory=dict)  # stored in the checkpoint (the MLflow run id, say)


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float = float("inf")
    history: list[dict[str, float]] = field(default_factory=list)
    timings: list[EpochTiming] = field(default_factory=list)  # not in the history: it varies run to run


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a generator for batch order; CPU kernels deterministic.

    Deterministic mode would also fill every new tensor's memory before use, a
    debugging aid that costs about 8 % of a small model's training step; no kernel
    here reads memory it has not written, so that filling is turned off.
    """
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.Generator().manual_seed(seed)


def fit(model: nn.Module, job: TrainJob, train: Rows, val: tuple[np.ndarray, np.ndarray],
        resume: Resume | None = None) -> TrainResult:
    """Train `model` on the `train` rows (y = -1 marks unlabelled rows), select on `val` (x, y).

    Without `job.distillation` the loss is cross-entropy on the labelled rows; with it,
    the distillation loss against the teacher's logits. With `resume`, the training state
    (weights, optimizer, schedule, random generators, best model, history) is saved every
    few epochs and a matching saved state is picked up, so an interrupted run ends as an
    uninterrupted one would (bit for bit in one process on a CPU). Under torchrun (`job.world`),
    the model is wrapped in DistributedDataParallel, each rank trains on its share of
    every global batch, and only rank 0 saves resume state.
    """
    cfg, world = job.cfg, job.world
    gen = seed_everything(job.seed)
    batches = Batches(train, cfg.batch_size, job.buffer_rows, world.rank, world.size)
    model.to(world.device)
    val_x, val_y = (torch.as_tensor(v).to(world.device) for v in val)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epochs = planned_epochs(cfg, batches.steps_per_epoch)
    sched = lr_schedule(opt, cfg, epochs * batches.steps_per_epoch)
    scaler = devices.grad_scaler(world.device, job.precision)
    best = TrainResult(copy.deepcopy(model), 0, -1.0)
    if job.distillation is not None and job.distillation.teacher is not None:
        job.distillation.teacher.to(world.device).eval()
    done = _restore(resume, model, opt, sched, gen, best, job.name) if resume else 0
    net = model
    if world.distributed:
        net = DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    for row in best.history if job.on_epoch else ():  # a resumed run reports the epochs it picked up, too
        job.on_epoch(row)
    with bar(epochs * batches.steps_per_epoch, job.name, unit="batch", initial=done * batches.steps_per_epoch,
             disable=not world.is_main) as progress:
        for epoch in range(done + 1, epochs + 1):
            sums, timing = train_epoch(net, batches, gen, (opt, sched, scaler), job, progress)
            row = _epoch_row(epoch, sums, model, val_x, val_y, job.distillation is not None)
            _record(best, model, row, timing, job, epochs)
            progress.set_postfix_str(f"epoch {epoch}/{epochs} val_accuracy {row['val_accuracy']:.4f}")
            if cfg.patience and epoch - best.best_epoch >= cfg.patience:
                log.info("%s: stopping after epoch %d, no better checkpoint on val for %d epochs (patience)",
                         job.name, epoch, cfg.patience)
                break
            if resume and world.is_main and epoch % resume.every == 0 and epoch < epochs:
                _save(resume, epoch, model, opt, sched, gen, best)
    if resume and world.is_main:
        resume.finish()
    best.model.cpu().eval()  # checkpoints are saved from the CPU copy: they load on any machine
    return best


def lr_schedule(opt: torch.optim.Optimizer, cfg: ModelTrainConfig, total: int):
    """One-cycle (the default), or with `cfg.warmup_fraction` linear warm-up then linear decay to 0."""
    if cfg.warmup_fraction is None:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    warm = max(1, round(cfg.warmup_fraction * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm)))


def planned_epochs(cfg: ModelTrainConfig, steps_per_epoch: int) -> int:
    """`cfg.epochs`, or more when that many epochs of `steps_per_epoch` fall short of `cfg.min_steps`."""
    return max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))


def train_epoch(net: nn.Module, batches: Batches, gen: torch.Generator, optim: tuple, job: TrainJob,
                progress) -> tuple[dict[str, float], EpochTiming]:
    """One pass over the batches: each loss part's mean over the epoch's steps (summed over the
    ranks under torchrun), and the epoch's timing. `optim` is (optimizer, LR schedule, loss
    scaler); batches go to the job's device, forward and loss under its precision's autocast."""
    opt, sched, scaler = optim
    device = job.world.device
    net.train()
    sums: dict[str, float] = {}
    timing, start = EpochTiming(), time.perf_counter()
    for batch in timed(batches.epoch(gen), timing):
        x, y, teacher_logits = (devices.to_device(t, device) for t in batch)
        with devices.autocast(device, job.precision):
            logits = net(x)
            parts = _loss_parts(logits, y, x, teacher_logits, job.distillation)
            if job.world.distributed:
                parts = _rank_shares(parts, y, logits, job.distillation)
        opt.zero_grad(set_to_none=True)
        # DDP averages over ranks; each rank's shares of the batch sum to the batch's loss
        scaler.scale(parts["loss"] * job.world.size if job.world.distributed else parts["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        progress.update()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() / batches.steps_per_epoch
    timing.seconds = time.perf_counter() - start
    if job.world.distributed:  # each rank holds its shares of the global batches' means: add them up
        sums = _sum_over_ranks(sums)
    return sums, timing


def _loss_parts(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, teacher_logits: torch.Tensor | None,
                distillation: Distillation | None) -> dict[str, torch.Tensor]:
    """Cross-entropy alone, or the distillation loss's parts (the teacher run online when the rows carry no logits)."""
    if distillation is None:
        return {"loss": cross_entropy(logits, y)}
    if teacher_logits is None:
        teacher_logits = _teacher_forward(distillation, x)
    return distillation(logits, teacher_logits, y)


def _record(best: TrainResult, model: nn.Module, row: dict[str, float], timing: EpochTiming, job: TrainJob,
            epochs: int) -> None:
    """Add an epoch to the history and the tracker, keep the model if it is the best on val (the
    highest accuracy; among equal accuracies, as happen on a small val split, the lowest loss), log
    a line."""
    best.history.append(row)
    best.timings.append(timing)
    if job.on_epoch:
        job.on_epoch(row | {"epoch_seconds": timing.seconds, "data_wait_fraction": timing.data_wait_fraction})
    if (row["val_accuracy"], -row["val_loss"]) > (best.best_val_accuracy, -best.best_val_loss):
        best.model, best.best_epoch = copy.deepcopy(model), row["epoch"]
        best.best_val_accuracy, best.best_val_loss = row["val_accuracy"], row["val_loss"]
    log.info("%s epoch %d/%d loss %.4f val_accuracy %.4f", job.name, row["epoch"], epochs,
             row["train_loss"], row["val_accuracy"])


def _rank_shares(parts: dict[str, torch.Tensor], y: torch.Tensor, logits: torch.Tensor,
                 distillation: Distillation | None) -> dict[str, torch.Tensor]:
    """This rank's shares of the global batch's loss terms (losses.rank_share), its row and
    labelled-row counts summed across ranks with one small all-reduce."""
    import torch.distributed as dist

    labelled = int((y != UNLABELED).sum())
    counts = torch.tensor([len(y), labelled], dtype=torch.float64)
    dist.all_reduce(counts)
    if not len(y):  # an empty share still joins the gradient all-reduce, with zeros
        zero = logits.sum() * 0.0
        return {k: zero for k in parts}
    labelled_share = labelled / counts[1].item() if counts[1] else 0.0
    return rank_share(parts, len(y) / counts[0].item(), labelled_share, distillation)


def _sum_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    values = torch.tensor(list(sums.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


def _save(resume: Resume, epoch: int, model, opt, sched, gen: torch.Generator, best: TrainResult) -> None:
    resume.save({"model": model, "optimizer": opt, "scheduler": sched, "generator": gen, "best_model": best.model},
                epoch=epoch, best_epoch=best.best_epoch, best_val_accuracy=best.best_val_accuracy,
                best_val_loss=best.best_val_loss, history=best.history)


def _restore(resume: Resume, model, opt, sched, gen: torch.Generator, best: TrainResult, name: str) -> int:
    """Load a matching saved state into the training objects; return the epochs it covers (0: none)."""
    state = resume.restore({"model": model, "optimizer": opt, "scheduler": sched, "generator": gen,
                            "best_model": best.model}, name,
                           ("epoch", "best_epoch", "best_val_accuracy", "best_val_loss", "history"))
    if state is None:
        return 0
    best.best_epoch, best.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    best.best_val_loss = state["best_val_loss"]
    best.history = list(state["history"])
    log.info("%s: resuming after epoch %d from %s", name, state["epoch"], resume.path)
    return state["epoch"]


def _teacher_forward(d: Distillation, x: torch.Tensor) -> torch.Tensor:
    if d.teacher is None:
        raise ValueError("distillation needs stored teacher logits in the rows or a teacher to run online")
    with torch.no_grad():  # not inference_mode: the loss keeps these logits for its backward pass
        return d.teacher(x)


def _epoch_row(
    epoch: int, sums: dict[str, float], model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, kd: bool
) -> dict[str, float]:
    logits = predict_logits(model, val_x)
    row = {
        "epoch": epoch,
        "train_loss": sums["loss"],
        "val_loss": float(cross_entropy(logits, val_y)),
        "val_accuracy": float((logits.argmax(1) == val_y).float().mean()),
    }
    if kd:  # the loss's parts: ce and kd, and for dkd tckd and nckd
        row |= {f"train_{k}": v for k, v in sums.items() if k != "loss"}
    return row


# ---------------------------------------------------------------- stage steps


def train_on_labels(job: TrainJob, prepared_dir: str | Path, out: Outputs, resume: ResumeConfig | None = None,
                    start: Callable[[data.PreparedMeta], tuple[nn.Module, dict]] | None = None) -> dict:
    """Stage steps train_teacher and train_baseline: hard labels only, best checkpoint on val.

    The baseline is called with the student's config: same architecture, seed and budget.
    `start`: makes the model to train and its model_args from the prepared data's meta (a
    pretrained teacher, distill.pretrained); None = the config's arch, untrained.
    """
    meta = data.read_meta(prepared_dir)
    train, val = data.read_split(prepared_dir, "train"), data.read_split(prepared_dir, "val")
    return _train_and_save(job, meta, InMemoryRows(train.x, train.y), (val.x, val.y), out, resume, start=start)


def use_as_is(model: nn.Module, args: dict, job: TrainJob, prepared_dir: str | Path, out: Outputs,
              info: dict) -> dict:
    """Stage step train_teacher for a teacher brought trained (teacher.source: checkpoint): nothing
    is trained; the model is scored on val and saved as this pipeline's checkpoint, with `info`
    (the file's name and sha256, and what the file said of itself)."""
    meta = data.read_meta(prepared_dir)
    val = data.read_split(prepared_dir, "val")
    logits = predict_logits(model, torch.from_numpy(val.x), pad_id=(meta.tokens or {}).get("pad_id"))
    y = torch.from_numpy(val.y)
    row = {"epoch": 0, "train_loss": float("nan"), "val_loss": float(cross_entropy(logits, y)),
           "val_accuracy": float((logits.argmax(1) == y).float().mean())}
    log.info("%s: brought trained, nothing to train; val_accuracy %.4f", job.name, row["val_accuracy"])
    if job.on_epoch:
        job.on_epoch(row)
    if job.world.is_main:
        save_checkpoint(out.model, model, args, config=job.cfg.model_dump(), seed=job.seed, epoch=0,
                        val_accuracy=row["val_accuracy"], history=[row], class_names=meta.class_names,
                        prepared_fingerprint=meta.fingerprint, **out.info, **info)
        write_csv(out.history, [row])
    return {"best_epoch": 0, "best_val_accuracy": row["val_accuracy"], "parameters": count_parameters(model),
            "history": [row], "model": model, "example": val.x[:5]}


def train_student(job: TrainJob, prepared_dir: str | Path, soft_labels_dir: str | Path, out: Outputs,
                  resume: ResumeConfig | None = None) -> dict:
    """Stage step train_student: distil from the stored soft labels (train + transfer rows).

    The distillation loss and the shuffle buffer come from the job's (student) config; the
    rows are streamed from Parquet when there are more than `cfg.shuffle_buffer`.
    """
    job = replace(job, name="student", distillation=job.distillation or Distillation.of(job.cfg),
                  buffer_rows=job.cfg.shuffle_buffer)
    meta = data.read_meta(prepared_dir)
    rows = softlabels.StudentRows(prepared_dir, soft_labels_dir, meta)
    val = data.read_split(prepared_dir, "val")
    prov = rows.provenance
    lineage = {"teacher_sha256": prov["teacher_sha256"],
               "teacher_run_id": prov.get("teacher_run_id"),
               "soft_labels_run_id": prov.get("run_id"),
               "soft_labels_sha256": file_sha256(rows.path)}
    out = replace(out, info=out.info | {"soft_labels": lineage})
    result = _train_and_save(job, meta, rows, (val.x, val.y), out, resume, {"soft_labels": lineage})
    return result | {"soft_labels": lineage}


def initial_model(cfg: ModelTrainConfig, meta: data.PreparedMeta, seed: int) -> nn.Module:
    """The untrained model of `cfg` for the prepared data, its weights fixed by `seed`, checked
    on a dummy batch (an import-path model with the wrong shapes stops here)."""
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = build_model(model_args(cfg, meta.num_features, meta.num_classes, meta.signal, meta.tokens))
    check_model(model, meta.num_features, meta.num_classes, cfg.arch, meta.tokens)
    return model


def _train_and_save(job: TrainJob, meta: data.PreparedMeta, train: Rows, val: tuple, out: Outputs,
                    resume: ResumeConfig | None, resume_inputs: dict | None = None, start=None) -> dict:
    """Train, then (rank 0 only, under torchrun) save the best checkpoint and the history."""
    if start is None:
        args = model_args(job.cfg, meta.num_features, meta.num_classes, meta.signal, meta.tokens)
        model = initial_model(job.cfg, meta, job.seed)
    else:
        torch.manual_seed(job.seed)  # the new head's initial weights
        model, args = start(meta)
    log.info("%s: %s with %d parameters, %d training rows", job.name, args["arch"], count_parameters(model),
             sum(train.block_sizes))
    inputs = {"name": job.name, "config": job.cfg.model_dump(), "seed": job.seed, "prepared": meta.fingerprint,
              "model_args": args, "processes": job.world.size, "precision": job.precision, **(resume_inputs or {})}
    result = fit(model, job, train, val, Resume.make(resume.dir, resume.every_epochs, job.name, inputs) if resume else None)
    if job.world.is_main:
        info = out.info | ({"processes": job.world.size} if job.world.distributed else {})
        save_checkpoint(out.model, result.model, args, config=job.cfg.model_dump(), seed=job.seed,
                        epoch=result.best_epoch, val_accuracy=result.best_val_accuracy, history=result.history,
                        class_names=meta.class_names, prepared_fingerprint=meta.fingerprint, **info)
        write_csv(out.history, result.history)
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "parameters": count_parameters(result.model), "history": result.history,
            "model": result.model, "example": val[0][:5]}
