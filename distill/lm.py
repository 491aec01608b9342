"""Language models: GPT-2-architecture teacher and student, their checkpoints, and their training.

Models are transformers' causal LMs: GPT2LMHeadModel built from `teacher.*` / `student.*`
(layers, heads, width) over the prepared tokenizer's ids and `data.context_length` positions,
or a pretrained folder (`teacher.source` or `student.source: pretrained`, any AutoModelForCausalLM;
distill/lm_start.py: where a student starts). A checkpoint stores the model's config beside its
weights, so it loads without the folder it came from.

Training counts optimizer steps (`steps`, `batch_size` windows each), with linear warm-up and
cosine decay (transformers' schedule); every `eval_every` steps and at the end the model is
scored on val (bits per token) and the best is kept; with `resume.every_steps` the training
state is saved every so many steps (distill/resume.py), and a killed run, rerun, picks up
from its last save and ends as the uninterrupted run would. The loss at each of a window's first
P = context_length - 1 positions is the next token's cross-entropy; the distilled student
mixes in a divergence D to the stored teacher targets (`student.loss`, distill/lm_losses.py;
the forward KL by default):

    loss = alpha * T^2 * D(target_T, student_T) + (1 - alpha) * CE

Under torchrun each rank takes a disjoint share of every global batch and DDP averages the
gradients (shares weighted by their size); rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill import device as devices
from distill import checkpoint, lm_losses, loop
from distill.checkpoint import count_parameters, register_arch
from distill.corpus import TASK, CorpusMeta
from distill.distributed import World
from distill.errors import UserError
from distill.io import write_csv
from distill.lm_params import LM_DISTILLATION_KEYS, GPTConfig, LMResumeConfig, LMStudentConfig
from distill.losses import get_loss
from distill.resume import Resume
from distill.sparse import Targets
from distill.text import load_tokenizer, model_folder, tokenizer_sha256

log = logging.getLogger(__name__)

ARCH = "causal_lm"  # the architecture registry's name for a Hugging Face causal LM
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


def pretrained(folder: str, meta: CorpusMeta, key: str = "teacher.model") -> nn.Module:
    """A pretrained causal LM folder (local files only) that the params key `key` names, checked
    against the prepared data: the tokenizer that made the ids, the vocabulary its head covers, the
    positions it has."""
    path = model_folder(folder, key)
    same_tokenizer(path, tokenizer_sha256(path), meta.tokenizer_sha256, key)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UserError(f"{path}: the model does not load as a causal language model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    return fits_data(model, path, meta)


def same_tokenizer(where: str | Path, own: str | None, data: str, key: str) -> None:
    """Refuse, in one sentence naming `key` and both hashes, the model `where` whose tokenizer (sha256
    `own`) is not the one the data was tokenized with (`data`)."""
    if own != data:
        fix = ("set data.tokenizer to the teacher's folder" if key == "teacher.model"
               else "give the student its own tokens: data.cross_tokenizer: true with data.student_tokenizer "
               "its folder")
        raise UserError(f"{where}: the tokenizer of {key} (sha256 {own}) is not the one the data was tokenized "
                        f"with ({data}); {fix}")


def fits_data(model: nn.Module, where: str | Path, meta: CorpusMeta) -> nn.Module:
    """`model`, refused in one sentence where its head predicts fewer ids than the prepared
    vocabulary or it has fewer positions than a window."""
    vocab = vocab_of(model)
    if vocab < meta.vocab_size:
        raise UserError(f"{where}: the model predicts {vocab} ids but its tokenizer has {meta.vocab_size}")
    positions = getattr(model.config, "n_positions", getattr(model.config, "max_position_embeddings", None))
    if positions is not None and positions < meta.context_length:
        raise UserError(f"data.context_length {meta.context_length} is more than the {positions} positions of "
                        f"{where}; lower it")
    return model


def vocab_of(model: nn.Module) -> int:
    """The ids a causal LM predicts (its logits' last dimension)."""
    return model.get_output_embeddings().weight.shape[0]


@register_arch(ARCH)
def _causal_lm(args: dict[str, Any]) -> nn.Module:
    """A causal LM from its Hugging Face config (a checkpoint's model_args["config"]), weights untrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(args["config"])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def lm_model_args(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint (distill/checkpoint.py) rebuilds a causal LM from: its arch and Hugging Face config.
    A language model's checkpoint is `checkpoint.save(path, model, lm_model_args(model), TASK, **info)`,
    read back with `checkpoint.load(path, task=TASK)` (TASK: distill.corpus's, "language_model")."""
    return {"arch": ARCH, "config": model.config.to_dict()}


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
    """`job.cfg.steps` optimizer steps over `batches` in the one training loop (distill/loop.py),
    scored on `val` every `eval_every` steps; the best model on val (its weights as at that step)
    is returned. With `job.resume`, rank 0 saves the training state every `resume.every` steps and
    a matching saved state is picked up: the same batches, dropout masks and schedule follow, bit
    for bit in one process on a CPU."""
    cfg = job.cfg
    run = loop.Run(cfg.lr, cfg.weight_decay, job.world, job.precision, job.on_eval, job.resume)
    best = loop.fit(model, LMTrainee(job, batches, val), run)
    return LMResult(best.model, best.step, best.row.get("val_bits_per_token", math.inf), best.history, best.seconds)


class LMTrainee:
    """A language model's side of the training loop: windows in batches, val bits per token every
    `eval_every` steps (fewer is better), the next-token cross-entropy or the divergence to the
    stored targets (`student.loss`)."""

    unit = "step"

    def __init__(self, job: LMJob, batches: WindowBatches, val: np.ndarray):
        self.job, self.batches, self.val, self.name = job, batches, val, job.name
        self.steps, self.eval_every = job.cfg.steps, job.cfg.eval_every

    def seed(self) -> torch.Generator:
        torch.manual_seed(self.job.seed + self.job.world.rank)  # dropout: each rank its own masks
        return torch.Generator().manual_seed(self.job.seed)

    def schedule(self, opt: torch.optim.Optimizer):
        from transformers import get_cosine_schedule_with_warmup

        self._schedule = get_cosine_schedule_with_warmup(opt, int(self.job.cfg.warmup_fraction * self.steps),
                                                         max(self.steps, 1))
        return self._schedule

    def epoch(self, gen: torch.Generator):
        return self.batches.epoch(gen)

    def loss(self, net: nn.Module, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids, targets, global_rows = batch
        parts = _loss(net, ids.to(self.job.world.device), targets, self.job, self.job.world.device)
        share = len(ids) * self.job.world.size / global_rows  # DDP averages: weight this rank by its rows
        return parts, parts["loss"] * share

    def score(self, model: nn.Module, step: int, train: dict[str, float]) -> tuple[dict, dict]:
        job = self.job
        bits = nats_per_token(model, self.val, 4 * job.cfg.batch_size, job.world.device, job.precision) / LN2
        row = {"step": step, **{f"train_{k}": v for k, v in train.items()}, "val_bits_per_token": bits,
               "lr": self._schedule.get_last_lr()[0]}
        log.info("%s: step %d, val %.4f bits/token", self.name, step, bits)
        return row, row

    def key(self, row: dict) -> tuple:
        return (-row["val_bits_per_token"],)

    def stop(self, row: dict, best_row: dict) -> bool:
        return False

    def describe(self, row: dict) -> str:
        return f"val {row['val_bits_per_token']:.4f} bits/token"

    def resumed(self, step: int) -> str:
        if self.job.world.rank:  # the state holds rank 0's generator: the other ranks' dropout, seeded afresh
            torch.manual_seed(self.job.seed + self.job.world.rank + 1_000_003 * step)
        return f"step {step}"


def _loss(net: nn.Module, ids: torch.Tensor, targets: Targets | None, job: LMJob, device: torch.device
          ) -> dict[str, torch.Tensor]:
    with devices.autocast(device, job.precision):
        logits = next_token_logits(net, ids)
    if job.distill is None or targets is None:
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        return {"loss": ce, "ce": ce}
    d = job.distill
    loss = get_loss(d.loss)  # forward_kl, reverse_kl, jsd, skew_kl or tvd (distill/lm_losses.py)
    return loss(logits, targets.to(device), ids[:, 1:], d.temperature, d.alpha, **lm_losses.options(d.loss, d))


def save_result(result: LMResult, job: LMJob, model_path: str | Path, history_path: str | Path,
                meta: CorpusMeta, info: dict) -> dict:
    """Rank 0: the best checkpoint (with its history and lineage) and the history CSV; the summary."""
    if job.world.is_main:
        checkpoint.save(model_path, result.model, lm_model_args(result.model), TASK, name=job.name,
                        config=job.cfg.model_dump(), seed=job.seed, step=result.best_step,
                        val_bits_per_token=result.best_val_bits, history=result.history,
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
