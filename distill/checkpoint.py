"""One checkpoint format for every task, and the registry of architectures that rebuilds its models.

A checkpoint is one plain dict, as nanoGPT's ckpt.pt: the weights (`state_dict`), how to
rebuild the model (`model_args`, whose `arch` names a registered builder), the task that made
it, the params section it was trained with (`config`), the seed, where training stopped and its
val history, and its lineage (the prepared data, the soft labels, the MLflow run). Training
writes it, evaluation, the soft-label dump, serving and catch-up read it, with `torch.load`'s
weights-only loader (no pickled code runs).

Architectures are a registry: `register_arch(name)` maps a name to the builder of an untrained
model from a checkpoint's model_args (less `arch`), `get_arch(name)` finds it. Each task's model
module registers its own (distill/models.py the classifiers and a user's import-path factory,
distill/pretrained.py `transformer` and `torchscript`, distill/lm.py `causal_lm`); code that
loads a checkpoint imports the module that registers its arch.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.io import atomic_path, read_checkpoint
from distill.registry import Registry
from distill.registry import IMPORT_PATH

VERSION = 2  # 1: before the task was recorded (a language model's then had "kind": "causal_lm")
IMPORTED = "package.module:factory"  # the registry's entry that builds a user's import-path model

Builder = Callable[[dict[str, Any]], nn.Module]
ARCHS = Registry("arch")
register_arch = ARCHS.register


# the modules that register the built-in archs; imported when a name is not registered yet, so a
# checkpoint loads in a process that has imported none of them (a notebook, a server)
BUILT_IN = ("distill.models", "distill.pretrained", "distill.lm")


def get_arch(name: str) -> Builder:
    """The builder of arch `name`: a registered one, or the user's `package.module:factory`."""
    if name not in ARCHS or IMPORTED not in ARCHS:
        for module in BUILT_IN:
            importlib.import_module(module)
    if re.match(IMPORT_PATH, name) and IMPORTED in ARCHS:
        return functools.partial(ARCHS[IMPORTED], name)
    known = sorted(set(ARCHS) - {IMPORTED})
    return ARCHS.find(name, known, ", or package.module:factory for your own model")


def build_model(args: dict[str, Any]) -> nn.Module:
    """Instantiate a model from `model_args` (a checkpoint's), weights untrained."""
    kwargs = dict(args)
    return get_arch(kwargs.pop("arch"))(kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(path: str | Path, model: nn.Module, args: dict[str, Any], task: str, **info: Any) -> None:
    """The checkpoint of `model` (rebuilt from `args`, made by `task`) with `info`, written atomically."""
    ckpt = {"version": VERSION, "task": task, "model_args": args,
            "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}, **info}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def read(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of `path` (one written before the task was recorded is read as it would be
    written now); one sentence if it is not one of this pipeline's, or (`task`) another task's."""
    path = Path(path)
    ckpt = upgraded(read_checkpoint(path))
    if ckpt is None:
        raise UserError(f"{path}: not a checkpoint of this pipeline (version mismatch); rerun its stage")
    if task is not None and ckpt["task"] != task:
        raise UserError(f"{path}: a {ckpt['task']} checkpoint, not a {task} one; rerun its stage")
    return ckpt


def upgraded(ckpt: object) -> dict[str, Any] | None:
    """A version-1 checkpoint dict in this version's layout; None when it is no checkpoint of ours."""
    if not isinstance(ckpt, dict) or ckpt.get("version") not in (1, VERSION):
        return None
    if ckpt["version"] == VERSION:
        return ckpt
    if ckpt.get("kind") == "causal_lm":  # a language model's: its Hugging Face config, the params beside it
        rest = {k: v for k, v in ckpt.items() if k not in ("kind", "config", "config_params")}
        return rest | {"version": VERSION, "task": "language_model",
                       "model_args": {"arch": "causal_lm", "config": ckpt.get("config")},
                       "config": ckpt.get("config_params")}
    return ckpt | {"version": VERSION, "task": "classify"} if "model_args" in ckpt else None


def load(path: str | Path, task: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint (eval mode, on the CPU) and the checkpoint dict."""
    ckpt = read(path, task)
    try:
        model = build_model(ckpt["model_args"])
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: the model does not rebuild from its checkpoint ({type(exc).__name__}); "
                        "rerun its stage") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match its model arguments; rerun its stage") from None
    return model.eval(), ckpt
