"""Language models: GPT-2-architecture teacher and student, their checkpoints, and their training.

Models are transformers' causal LMs: GPT2LMHeadModel built from `teacher.*` / `student.*`
(layers, heads, width) over the prepared tokenizer's ids and `data.context_length` positions,
or a pretrained folder (`teacher.source: pretrained`, any AutoModelForCausalLM). A checkpoint
stores the model's config beside its weights, so it loads without the folder it came from.

Training counts optimizer steps (`steps`, `batch_size` windows each), with linear warm-up and
cosine decay (transformers' schedule); every `eval_every` steps and at the end the model is
scored on val (bits per token) and the best is kept; with `resume.every_steps` the training
state is saved every so many steps (distill/resume.py), and a killed run, rerun, picks up
from its last save and ends as the uninterrupted run would. The loss at each of a window's first
P = context_length - 1 positions is the next token's cross-entropy; the distilled student
mixes in the KL to the stored teacher targets (distill/sparse.py):

    loss = alpha * T^2 * KL(target_T || student_T) + (1 - alpha) * CE

Under torchrun each rank takes a disjoint share of every global batch and DDP averages the
gradients (shares weighted by their size); rank 0 alone writes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill import device as devices
from distill.corpus import CorpusMeta
from distill.distributed import World
from distill.errors import UserError
from distill.io import atomic_path, read_checkpoint, write_csv
from distill.lm_params import LM_DISTILLATION_KEYS, GPTConfig, LMResumeConfig, LMStudentConfig
from distill.progress import bar
from distill.resume import Resume
from distill.sparse import Targets, token_kl_loss
from distill.text import load_tokenizer, tokenizer_sha256

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "causal_lm"
CHECKPOINT_VERSION = 1
LN2 = math.log(2)


# ---------------------------------------------------------------- models and checkpoints


def gpt2(cfg: GPTConfig, meta: CorpusMeta, seed: int) -> nn.Module:
    """An untrained GPT2LMHeadModel of `cfg`'s size over the prepared vocabulary, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=meta.vocab_size, n_positions=meta.context_length, n_embd=cfg.width,
                        n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, bos_token_id=meta.eos_id, eos_token_id=meta.eos_id)
    return GPT2LMHeadModel(config)


def pretrained(folder: str, meta: CorpusMeta) -> nn.Module:
    """A pretrained causal LM folder (local files only), checked against the prepared data: the
    tokenizer that made the ids, the vocabulary its head covers, the positions it has."""
    path = Path(folder)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json); set teacher.model to one")
    own = tokenizer_sha256(path)
    if meta.tokenizer_sha256 != own:
        raise UserError(f"{path}: the teacher's tokenizer (sha256 {own}) is not the one the data was tokenized "
                        f"with ({meta.tokenizer_sha256}); set data.tokenizer to the teacher's folder")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UserError(f"{path}: the model does not load as a causal language model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < meta.vocab_size:
        raise UserError(f"{path}: the model predicts {vocab} ids but its tokenizer has {meta.vocab_size}")
    positions = getattr(model.config, "n_positions", getattr(model.config, "max_position_embeddings", None))
    if positions is not None and positions < meta.context_length:
        raise UserError(f"data.context_length {meta.context_length} is more than the {positions} positions of "
                        f"{path}; lower it")
    return model


def vocab_of(model: nn.Module) -> int:
    """The ids a causal LM predicts (its logits' last dimension)."""
    return model.get_output_embeddings().weight.shape[0]


def save(path: str | Path, model: nn.Module, **info: Any) -> None:
    """The model's config and weights, and `info` (history, lineage), written atomically."""
    ckpt = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "config": model.config.to_dict(),
            "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}, **info}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def is_checkpoint(path: str | Path) -> bool:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours, or not a torch file at all
        return False
    return isinstance(ckpt, dict) and ckpt.get("kind") == CHECKPOINT_KIND


def load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint written by `save`: the model (eval mode, on the CPU) and the checkpoint dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND or ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: not a language-model checkpoint of this pipeline; rerun its stage")
    try:
        config = dict(ckpt["config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: the model does not rebuild from its checkpoint ({type(exc).__name__}); "
                        "rerun its stage") from None
    return model.eval(), ckpt


def check_lineage(path: str | Path, ckpt: dict, meta: CorpusMeta) -> None:
    """Refuse a checkpoint trained on other prepared data, by name."""
    if ckpt.get("prepared_fingerprint") != meta.fingerprint:
        raise UserError(f"{path}: trained on other prepared data; rerun its stage (dvc repro)")


class NextTokenLogits(nn.Module):
    """A causal LM as ids (B, T) -> logits (B, T, V): the plain tensor function MLflow logs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (GPT-2's tied input and output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- scoring


def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) windows -> (B, T - 1, V) logits at each position that has a next token."""
    return model(input_ids=ids).logits[:, :-1]


@torch.no_grad()
def nats_per_token(model: nn.Module, windows: np.ndarray, batch_size: int, device: torch.device,
                   precision: str = "fp32") -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of `windows`."""
    was_training = model.training
    model.eval()
    total_nats, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start:start + batch_size]).to(device)
        with devices.autocast(device, precision):
            logits = next_token_logits(model, ids)
        total_nats += float(F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total_nats / max(count, 1)


# ---------------------------------------------------------------- batches


class WindowBatches:
    """Batches of train windows, with their stored targets when distilling.

    Without targets: a seeded permutation of the windows per epoch. With them: the soft-label
    row groups in a seeded order, `buffer` windows at a time shuffled together (all at once when
    they fit), so a set larger than memory streams. Each rank takes its share of each batch.
    """

    def __init__(self, windows: np.ndarray, batch_size: int, world: World, targets=None, buffer: int = 0):
        self.windows, self.batch_size, self.world = windows, batch_size, world
        self.targets, self.buffer = targets, buffer

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, Targets | None, int]]:
        """(ids of this rank's share, its targets or None, the global batch's size) per step."""
        if self.targets is None:  # one block: every window, no targets
            blocks = [(np.arange(len(self.windows)), None)]
        else:
            blocks = ((block.windows, block.targets) for block in self.targets.blocks(gen, self.buffer))
        for rows, targets_of in blocks:
            order = torch.randperm(len(rows), generator=gen).numpy()
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                if len(idx) < self.world.size:  # a last batch too small to give every rank a window
                    continue
                mine = np.array_split(idx, self.world.size)[self.world.rank]
                yield (torch.from_numpy(self.windows[rows[mine]]), None if targets_of is None else targets_of(mine),
                       len(idx))


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class LMJob:
    """One language model's training: its config and budget, seed, name, where and how it runs."""

    cfg: GPTConfig
    seed: int = 0
    name: str = "model"  # teacher | student | baseline
    distill: LMStudentConfig | None = None  # the student's KD settings; None: cross-entropy alone
    world: World = World()
    precision: str = "fp32"
    on_eval: Callable[[dict[str, float]], None] | None = None  # each val row (MLflow)
    resume: Resume | None = None  # where the training state is saved every few steps


@dataclass
class LMResult:
    model: nn.Module
    best_step: int
    best_val_bits: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def resumable(job: LMJob, cfg: LMResumeConfig, meta: CorpusMeta, **inputs: Any) -> LMJob:
    """`job` saving its training state under `cfg.dir` every `cfg.every_steps` steps, keyed by
    everything its training reads: its config, seed, data, processes and precision, and `inputs`
    (the soft labels, the folder it starts from)."""
    config = job.cfg.model_dump(exclude=set(LM_DISTILLATION_KEYS) if job.distill is None else None)
    key = {"name": job.name, "config": config, "seed": job.seed, "prepared": meta.fingerprint,
           "processes": job.world.size, "precision": job.precision, **inputs}
    return replace(job, resume=Resume.make(cfg.dir, cfg.every_steps, job.name, key))


def train(model: nn.Module, job: LMJob, batches: WindowBatches, val: np.ndarray) -> LMResult:
    """`job.cfg.steps` optimizer steps over `batches`, scored on `val` every `eval_every` steps;
    the best model on val (its weights as at that step) is returned. With `job.resume`, rank 0
    saves the training state every `resume.every` steps and a matching saved state is picked up:
    the same batches, dropout masks and schedule follow, bit for bit in one process on a CPU."""
    from transformers import get_cosine_schedule_with_warmup

    cfg, device, world = job.cfg, job.world.device, job.world
    gen = torch.Generator().manual_seed(job.seed)
    torch.manual_seed(job.seed + world.rank)  # dropout: each rank its own masks
    model.to(device).train()
    net = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_fraction * cfg.steps), max(cfg.steps, 1))
    scaler = devices.grad_scaler(device, job.precision)
    best = LMResult(model, 0, math.inf)
    sums: dict[str, float] = {}
    started, step, skip = time.perf_counter(), 0, 0
    saved = {"model": model, "optimizer": opt, "scheduler": sched} | ({"scaler": scaler} if scaler.is_enabled() else {})
    carried = ("step", "in_epoch", "sums", "epoch_generator", "best_model", "best_step", "best_val_bits", "history")
    state = job.resume.restore(saved, job.name, carried) if job.resume else None
    if state is not None:  # the epoch's generator as it began, and the batches of it already done
        step, skip, sums = state["step"], state["in_epoch"], dict(state["sums"])
        gen.set_state(state["epoch_generator"])
        best.best_step, best.best_val_bits, best.history = state["best_step"], state["best_val_bits"], state["history"]
        if best.best_step and world.is_main:
            best.model = copy.deepcopy(model).cpu().eval()
            best.model.load_state_dict(state["best_model"])
        if world.rank:  # the state holds rank 0's generator: the other ranks' dropout, seeded afresh
            torch.manual_seed(job.seed + world.rank + 1_000_003 * step)
        log.info("%s: resuming after step %d from %s", job.name, step, job.resume.path)
        for row in best.history if job.on_eval else ():  # the tracked history is the whole run's
            job.on_eval(row)

    def score() -> None:
        bits = nats_per_token(model, val, 4 * cfg.batch_size, device, job.precision) / LN2
        row = {"step": step, **{f"train_{k}": v / max(sums.get("n", 1), 1) for k, v in sums.items() if k != "n"},
               "val_bits_per_token": bits, "lr": sched.get_last_lr()[0]}
        best.history.append(row)
        sums.clear()
        if bits < best.best_val_bits:
            best.best_step, best.best_val_bits = step, bits
            best.model = copy.deepcopy(model).cpu().eval() if world.is_main else model
        log.info("%s: step %d, val %.4f bits/token", job.name, step, bits)
        if job.on_eval:
            job.on_eval(row)

    with bar(cfg.steps, job.name, unit="step", initial=step) as progress:
        while step < cfg.steps:
            epoch_generator = gen.get_state()
            for done, (ids, targets, global_rows) in enumerate(batches.epoch(gen), 1):
                if done <= skip:  # a resumed epoch: its first batches ran before the save
                    continue
                parts = _loss(net, ids.to(device), targets, job, device)
                share = len(ids) * world.size / global_rows  # DDP averages: weight this rank by its rows
                opt.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"] * share).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                progress.update(1)
                sums["n"] = sums.get("n", 0) + 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    score()
                if step == cfg.steps:
                    break
                if job.resume and world.is_main and step % job.resume.every == 0:
                    job.resume.save(saved, step=step, in_epoch=done, epoch_generator=epoch_generator, sums=sums,
                                    best_model=best.model.state_dict(), best_step=best.best_step,
                                    best_val_bits=best.best_val_bits, history=best.history)
            skip = 0
    if cfg.steps == 0:
        score()
    if job.resume and world.is_main:
        job.resume.finish()
    best.seconds = time.perf_counter() - started
    return best


def _loss(net: nn.Module, ids: torch.Tensor, targets: Targets | None, job: LMJob, device: torch.device
          ) -> dict[str, torch.Tensor]:
    with devices.autocast(device, job.precision):
        logits = next_token_logits(net, ids)
    if job.distill is None or targets is None:
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        return {"loss": ce, "ce": ce}
    d = job.distill
    return token_kl_loss(logits, targets.to(device), ids[:, 1:], d.temperature, d.alpha, d.tail)


def save_result(result: LMResult, job: LMJob, model_path: str | Path, history_path: str | Path,
                meta: CorpusMeta, info: dict) -> dict:
    """Rank 0: the best checkpoint (with its history and lineage) and the history CSV; the summary."""
    if job.world.is_main:
        save(model_path, result.model, name=job.name, config_params=job.cfg.model_dump(), seed=job.seed,
             step=result.best_step, val_bits_per_token=result.best_val_bits, history=result.history,
             prepared_fingerprint=meta.fingerprint, tokenizer_sha256=meta.tokenizer_sha256, **info)
        write_csv(history_path, result.history)
    return {"best_step": result.best_step, "best_val_bits_per_token": result.best_val_bits,
            "parameters": count_parameters(result.model), "train_seconds": result.seconds,
            "history": result.history, "model": result.model}


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate(model: nn.Module, prompt: np.ndarray, new_tokens: int, top_k: int, seed: int) -> np.ndarray:
    """`new_tokens` ids sampled after `prompt` (top-k sampling, seeded), within the context."""
    gen = torch.Generator().manual_seed(seed)
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    ids = torch.from_numpy(prompt).unsqueeze(0)
    model.eval()
    for _ in range(new_tokens):
        logits = model(input_ids=ids[:, -positions:]).logits[0, -1].float()
        values, index = logits.topk(min(top_k, logits.numel()))
        pick = index[torch.multinomial(F.softmax(values, -1), 1, generator=gen)]
        ids = torch.cat([ids, pick.view(1, 1)], dim=1)
    return ids[0, len(prompt):].numpy()


def tokenizer(meta: CorpusMeta):
    """The prepared tokenizer (to decode samples)."""
    return load_tokenizer(meta.tokenizer_dir, needs_pad=False)
