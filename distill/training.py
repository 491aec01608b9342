"""Training: the loop shared by teacher, student and baseline, and the three stage steps.

Batches come from distill.rows: rows that fit the shuffle buffer sit in memory and
are drawn by a seeded permutation; a larger transfer set is streamed from Parquet
block by block (no DataLoader workers, ordered and repeatable either way). The
checkpoint kept is the one with the best validation accuracy; the test split is
never looked at here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill import data, loop, softlabels
from distill import device as devices
from distill.classification_params import ModelTrainConfig, ResumeConfig
from distill.distributed import World
from distill.io import file_sha256, write_csv
from distill.losses import UNLABELED, Distillation, cross_entropy, rank_share
from distill import checkpoint
from distill.checkpoint import build_model, count_parameters
from distill.models import check_model, model_args, predict_logits
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


def fit_classifier(model: nn.Module, job: TrainJob, train: Rows, val: tuple[np.ndarray, np.ndarray],
                   resume: Resume | None = None) -> TrainResult:
    """Train `model` on the `train` rows (y = -1 marks unlabelled rows), select on `val` (x, y), in
    the one training loop (distill/loop.py), epoch by epoch.

    Without `job.distillation` the loss is cross-entropy on the labelled rows; with it,
    the distillation loss against the teacher's logits. With `resume` (every `resume.every`
    epochs), the training state is saved and a matching saved state is picked up, so an
    interrupted run ends as an uninterrupted one would (bit for bit in one process on a CPU).
    Under torchrun (`job.world`), each rank trains on its share of every global batch.
    """
    cfg = job.cfg
    tokens = np.issubdtype(val[0].dtype, np.integer)  # token ids: batched by length, padded with the model's pad_id
    batches = Batches(train, cfg.batch_size, job.buffer_rows, job.world.rank, job.world.size,
                      pad_id=getattr(model, "pad_id", None) if tokens else None)
    trainee = ClassifierTrainee(job, batches, val)
    if resume is not None:  # saved every few epochs: the loop counts steps
        resume = replace(resume, every=resume.every * trainee.eval_every)
    best = loop.fit(model, trainee, loop.Run(cfg.lr, cfg.weight_decay, job.world, job.precision, job.on_epoch, resume,
                                             getattr(cfg, "layer_decay", None)))
    return TrainResult(best.model, best.row.get("epoch", 0), best.row.get("val_accuracy", -1.0),
                       best.row.get("val_loss", float("inf")), best.history, trainee.timings)


class ClassifierTrainee:
    """A classifier's side of the training loop: rows in batches, an epoch between val scores,
    cross-entropy or the distillation loss, val accuracy (then the lower val loss) is better."""

    unit = "batch"

    def __init__(self, job: TrainJob, batches: Batches, val: tuple[np.ndarray, np.ndarray]):
        self.job, self.batches, self.name = job, batches, job.name
        self.val_x, self.val_y = (torch.as_tensor(v).to(job.world.device) for v in val)
        self.eval_every = batches.steps_per_epoch
        self.epochs = planned_epochs(job.cfg, batches.steps_per_epoch)
        self.steps = self.epochs * batches.steps_per_epoch
        self.timings: list[EpochTiming] = []  # not in the history: it varies run to run
        self._timing, self._started = EpochTiming(), 0.0
        if job.distillation is not None and job.distillation.teacher is not None:
            job.distillation.teacher.to(job.world.device).eval()

    def seed(self) -> torch.Generator:
        return seed_everything(self.job.seed)

    def schedule(self, opt: torch.optim.Optimizer):
        return lr_schedule(opt, self.job.cfg, self.steps)

    def epoch(self, gen: torch.Generator):
        self._timing, self._started = EpochTiming(), time.perf_counter()
        return timed(self.batches.epoch(gen), self._timing)

    def loss(self, net: nn.Module, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss parts under the job's precision's autocast; DDP averages over ranks, so each
        rank's shares of the batch, times the ranks, sum to the batch's loss."""
        world = self.job.world
        x, y, teacher_logits = (devices.to_device(t, world.device) for t in batch)
        with devices.autocast(world.device, self.job.precision):
            logits = net(x)
            parts = _loss_parts(logits, y, x, teacher_logits, self.job.distillation)
            if world.distributed:
                parts = _rank_shares(parts, y, logits, self.job.distillation)
        return parts, parts["loss"] * world.size if world.distributed else parts["loss"]

    def score(self, model: nn.Module, step: int, train: dict[str, float]) -> tuple[dict, dict]:
        self._timing.seconds = time.perf_counter() - self._started
        self.timings.append(self._timing)
        if self.job.world.distributed:  # each rank holds its shares of the global batches' means: add them up
            train = _sum_over_ranks(train)
        row = _epoch_row(step // self.eval_every, train, model, self.val_x, self.val_y,
                         self.job.distillation is not None) | {"step": step}  # the models' common axis
        log.info("%s epoch %d/%d loss %.4f val_accuracy %.4f", self.name, row["epoch"], self.epochs,
                 row["train_loss"], row["val_accuracy"])
        timing = {"epoch_seconds": self._timing.seconds, "data_wait_fraction": self._timing.data_wait_fraction}
        return row, row | timing

    def key(self, row: dict) -> tuple:
        """The highest accuracy; among equal accuracies, as happen on a small val split, the lowest loss."""
        return row["val_accuracy"], -row["val_loss"]

    def stop(self, row: dict, best_row: dict) -> bool:
        patience = self.job.cfg.patience
        if patience and row["epoch"] - best_row["epoch"] >= patience:
            log.info("%s: stopping after epoch %d, no better checkpoint on val for %d epochs (patience)",
                     self.name, row["epoch"], patience)
            return True
        return False

    def describe(self, row: dict) -> str:
        return f"epoch {row['epoch']}/{self.epochs} val_accuracy {row['val_accuracy']:.4f}"

    def resumed(self, step: int) -> str:
        return f"epoch {step // self.eval_every}"


def lr_schedule(opt: torch.optim.Optimizer, cfg: ModelTrainConfig, total: int):
    """One-cycle (the default), or with `cfg.warmup_fraction` linear warm-up then linear decay to 0."""
    if cfg.warmup_fraction is None:
        # each parameter group peaks at its own lr (cfg.lr, or less under layer-wise decay)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    warm = max(1, round(cfg.warmup_fraction * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm)))


def planned_epochs(cfg: ModelTrainConfig, steps_per_epoch: int) -> int:
    """`cfg.epochs`, or more when that many epochs of `steps_per_epoch` fall short of `cfg.min_steps`."""
    return max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))


def _student_batches(cfg: ModelTrainConfig, meta: data.PreparedMeta) -> int:
    """The distilled student's batches an epoch: over the rows it reads, train and transfer (the
    rows soft_labels labels)."""
    return -(-(meta.splits["train"] + meta.splits.get("transfer", 0)) // cfg.batch_size)


def student_steps(cfg: ModelTrainConfig, meta: data.PreparedMeta) -> int:
    """The distilled student's optimizer steps under `cfg`: its planned epochs of `_student_batches`."""
    per_epoch = _student_batches(cfg, meta)
    return planned_epochs(cfg, per_epoch) * per_epoch


def with_student_budget(job: TrainJob, meta: data.PreparedMeta) -> TrainJob:
    """The baseline's job: the student's config with `min_steps` raised to the student's steps.
    The baseline reads train alone and the student train and the transfer rows, so at the same
    epochs it would take a fraction of the student's optimizer steps; it takes more epochs, and
    a `patience` of the student's epochs becomes as many optimizer steps of its own."""
    cfg = job.cfg
    own = -(-meta.splits["train"] // cfg.batch_size)
    update: dict = {"min_steps": max(cfg.min_steps, student_steps(cfg, meta))}
    if cfg.patience:
        update["patience"] = -(-cfg.patience * _student_batches(cfg, meta) // own)
    return replace(job, cfg=cfg.model_copy(update=update))


def _loss_parts(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, teacher_logits: torch.Tensor | None,
                distillation: Distillation | None) -> dict[str, torch.Tensor]:
    """Cross-entropy alone, or the distillation loss's parts (the teacher run online when the rows carry no logits)."""
    if distillation is None:
        return {"loss": cross_entropy(logits, y)}
    if teacher_logits is None:
        teacher_logits = _teacher_forward(distillation, x)
    return distillation(logits, teacher_logits, y)


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
                    start: Callable[[data.PreparedMeta], tuple[nn.Module, dict]] | None = None,
                    student_budget: bool = False) -> dict:
    """Stage steps train_teacher and train_baseline: hard labels only, best checkpoint on val.

    The baseline is called with the student's config and `student_budget`: same architecture and
    seed, and the student's budget in optimizer steps (`with_student_budget`).
    `start`: makes the model to train and its model_args from the prepared data's meta (a
    pretrained teacher, distill.pretrained); None = the config's arch, untrained.
    """
    meta = data.read_meta(prepared_dir)
    if student_budget:
        job = with_student_budget(job, meta)
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
    row = {"epoch": 0, "step": 0, "train_loss": float("nan"), "val_loss": float(cross_entropy(logits, y)),
           "val_accuracy": float((logits.argmax(1) == y).float().mean())}
    log.info("%s: brought trained, nothing to train; val_accuracy %.4f", job.name, row["val_accuracy"])
    if job.on_epoch:
        job.on_epoch(row)
    if job.world.is_main:
        checkpoint.save(out.model, model, args, "classify", config=job.cfg.model_dump(), seed=job.seed, epoch=0,
                        val_accuracy=row["val_accuracy"], history=[row], class_names=meta.class_names,
                        prepared_fingerprint=meta.fingerprint, **out.info, **info)
        write_csv(out.history, [row])
    return {"best_epoch": 0, "best_val_accuracy": row["val_accuracy"], "parameters": count_parameters(model),
            "history": [row], "model": model, "example": val.x[:5]}


def train_student(job: TrainJob, prepared_dir: str | Path, soft_labels_dir: str | Path, out: Outputs,
                  resume: ResumeConfig | None = None,
                  start: Callable[[data.PreparedMeta], tuple[nn.Module, dict]] | None = None) -> dict:
    """Stage step train_student: distil from the stored soft labels (train + transfer rows).

    The distillation loss and the shuffle buffer come from the job's (student) config; the
    rows are streamed from Parquet when there are more than `cfg.shuffle_buffer`. `start`: as
    in train_on_labels (the baseline is given the same).
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
    result = _train_and_save(job, meta, rows, (val.x, val.y), out, resume, {"soft_labels": lineage}, start=start)
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
    resume_state = Resume.make(resume.dir, resume.every_epochs, job.name, inputs) if resume else None
    result = fit_classifier(model, job, train, val, resume_state)
    if job.world.is_main:
        info = out.info | ({"processes": job.world.size} if job.world.distributed else {})
        checkpoint.save(out.model, result.model, args, "classify", config=job.cfg.model_dump(), seed=job.seed,
                        epoch=result.best_epoch, val_accuracy=result.best_val_accuracy, history=result.history,
                        class_names=meta.class_names, prepared_fingerprint=meta.fingerprint, **info)
        write_csv(out.history, result.history)
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "parameters": count_parameters(result.model), "history": result.history,
            "model": result.model, "example": val[0][:5]}
