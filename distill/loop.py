"""The one training loop, for every task: optimizer steps over the task's batches, scored on val
every so often, the best model on val kept, the training state saved to resume.

What differs between tasks comes from the task's `Trainee` (distill/training.py for
classifiers, distill/lm.py for language models): how the random generators are seeded, what
a batch is and its loss parts, the learning-rate schedule, the validation score and which
score is better. What every task needs is here, once: AdamW, the loss scaler and autocast's
backward pass, DistributedDataParallel, the progress bar, the tracker's callback, best-on-val,
early stopping, and resume (rank 0 saves, every `resume.every` steps; a resumed epoch takes
the same batches from the same generator state, so an interrupted run ends as the
uninterrupted one would, bit for bit in one process on a CPU).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from distill import device as devices
from distill.distributed import World
from distill.progress import bar
from distill.resume import Resume

log = logging.getLogger(__name__)


class Trainee(Protocol):
    """A task's side of one model's training."""

    name: str  # teacher | student | baseline: log lines, progress bar
    unit: str  # what one optimizer step is called on the progress bar (batch, step)
    steps: int  # optimizer steps in all
    eval_every: int  # steps between val scores (a classifier: one epoch)

    def seed(self) -> torch.Generator: ...  # seed torch for this rank; the batch-order generator

    def schedule(self, opt: torch.optim.Optimizer) -> Any: ...  # the learning-rate schedule over `steps`

    def epoch(self, gen: torch.Generator) -> Iterator[Any]: ...  # one pass over the train batches

    def loss(self, net: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...
    # the loss parts to record, and what to backpropagate (this rank's share under DDP)

    def score(self, model: nn.Module, step: int, train: dict[str, float]) -> tuple[dict, dict]: ...
    # the val row for the history (train: the parts' means since the last score), and what the tracker gets

    def key(self, row: dict) -> tuple: ...  # larger is better

    def stop(self, row: dict, best_row: dict) -> bool: ...  # stop early (patience), after a score

    def describe(self, row: dict) -> str: ...  # the progress bar's note on a val row

    def resumed(self, step: int) -> str: ...
    # after a saved state of `step` steps was loaded (reseed other ranks, say): where it resumes ("epoch 3")


@dataclass(frozen=True)
class Run:
    """Where and how a training runs, whatever the task."""

    lr: float
    weight_decay: float
    world: World = World()
    precision: str = "fp32"
    on_score: Callable[[dict[str, float]], None] | None = None  # each val row (the tracker)
    resume: Resume | None = None  # every `resume.every` steps
    layer_decay: float | None = None  # the model's param_groups(lr, layer_decay) get their own lrs (pretrained)


@dataclass
class Best:
    model: nn.Module
    step: int = 0
    row: dict = field(default_factory=dict)
    key: tuple | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def fit(model: nn.Module, trainee: Trainee, run: Run) -> Best:
    """Train `model` for `trainee.steps` optimizer steps; return the best model on val, its step and row,
    and the history of val rows."""
    world, device, started = run.world, run.world.device, time.perf_counter()
    gen = trainee.seed()
    model.to(device).train()
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model
    groups = model.param_groups(run.lr, run.layer_decay) if run.layer_decay else model.parameters()
    opt = torch.optim.AdamW(groups, lr=run.lr, weight_decay=run.weight_decay)
    sched = trainee.schedule(opt)
    scaler = devices.grad_scaler(device, run.precision)
    best, sums = Best(model), {}
    saved = {"model": model, "optimizer": opt, "scheduler": sched} | ({"scaler": scaler} if scaler.is_enabled() else {})
    step, skip = _restore(run, saved, gen, best, sums, trainee)
    with bar(trainee.steps, trainee.name, unit=trainee.unit, initial=step, disable=not world.is_main) as progress:
        while step < trainee.steps:
            epoch_generator = gen.get_state()
            for done, batch in enumerate(trainee.epoch(gen), 1):
                if done <= skip:  # a resumed epoch: its first batches ran before the save
                    continue
                parts, loss = trainee.loss(net, batch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                progress.update(1)
                sums["n"] = sums.get("n", 0) + 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                stop = False
                if step % trainee.eval_every == 0 or step == trainee.steps:
                    stop = _score(model, trainee, run, step, sums, best, progress)
                if stop or step == trainee.steps:
                    step = trainee.steps  # done: leave both loops
                    break
                if run.resume and world.is_main and step % run.resume.every == 0:
                    run.resume.save(saved, step=step, in_epoch=done, epoch_generator=epoch_generator, sums=sums,
                                    best_model=best.model.state_dict(), best_step=best.step, best_row=best.row,
                                    history=best.history)
            skip = 0
    if trainee.steps == 0:
        _score(model, trainee, run, 0, sums, best, progress)
    if run.resume and world.is_main:
        run.resume.finish()
    best.seconds = time.perf_counter() - started
    best.model.cpu().eval()  # checkpoints are saved from the CPU copy: they load on any machine
    return best


def _score(model: nn.Module, trainee: Trainee, run: Run, step: int, sums: dict, best: Best, progress) -> bool:
    """Score on val, record the row, keep the model if it is the best so far; True: stop early."""
    n = max(sums.get("n", 1), 1)
    row, tracked = trainee.score(model, step, {k: v / n for k, v in sums.items() if k != "n"})
    sums.clear()
    model.train()
    best.history.append(row)
    if best.key is None or trainee.key(row) > best.key:
        best.step, best.row, best.key = step, row, trainee.key(row)
        best.model = copy.deepcopy(model).cpu().eval() if run.world.is_main else model
    if run.on_score:
        run.on_score(tracked)
    progress.set_postfix_str(trainee.describe(row))
    return trainee.stop(row, best.row)


def _restore(run: Run, saved: dict, gen: torch.Generator, best: Best, sums: dict, trainee: Trainee) -> tuple[int, int]:
    """A matching saved state loaded into the training objects: (steps done, batches of the current
    epoch done); (0, 0) when there is none."""
    carried = ("step", "in_epoch", "sums", "epoch_generator", "best_model", "best_step", "best_row", "history")
    state = run.resume.restore(saved, trainee.name, carried) if run.resume else None
    if state is None:
        return 0, 0
    sums |= dict(state["sums"])
    gen.set_state(state["epoch_generator"])  # the epoch's generator as it began
    best.step, best.row, best.history = state["best_step"], dict(state["best_row"]), list(state["history"])
    best.key = trainee.key(best.row) if best.row else None
    if best.step and run.world.is_main:
        best.model = copy.deepcopy(saved["model"]).cpu().eval()
        best.model.load_state_dict(state["best_model"])
    log.info("%s: resuming after %s from %s", trainee.name, trainee.resumed(state["step"]), run.resume.path)
    for row in best.history if run.on_score else ():  # the tracked history is the whole run's
        run.on_score(row)
    return state["step"], state["in_epoch"]
