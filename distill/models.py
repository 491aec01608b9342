"""Networks and self-describing checkpoints.

Models map a batch of feature vectors (N, D) to logits (N, C); losses live in
distill.losses. Besides the built-in `mlp` and `cnn1d`, `arch` may be an import
path `package.module:factory` to the user's own model: the factory is called as
`factory(num_features=D, num_classes=C, **arch_kwargs)`, must return an
`nn.Module`, and is checked on a dummy batch before training (`check_model`). A checkpoint is a plain dict (weights, the args that rebuild the
model, the resolved config, epoch, validation metric, training history and input
provenance), loadable with `torch.load(weights_only=True)` and `load_checkpoint`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import AUTO_ARCH, BUILTIN_ARCHS, ModelTrainConfig
from distill.errors import UserError
from distill.io import atomic_path

CHECKPOINT_VERSION = 1


class MLP(nn.Module):
    """Fully connected ReLU network."""

    def __init__(self, num_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, D) -> (N, C)


class CNN1d(nn.Module):
    """1-D convolutions over the feature axis, then a fully connected head.

    Each conv block is conv (stride 1) -> batch norm -> ReLU, and every block after
    the first halves the length with stride 2, so the head sees a short sequence.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        channels: list[int],
        hidden: list[int],
        kernel_size: int = 5,
        dropout: float = 0.0,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch, length = 1, num_features
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            blocks += [
                nn.Conv1d(in_ch, ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(ch),
                nn.ReLU(),
            ]
            in_ch, length = ch, (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1
        self.features = nn.Sequential(*blocks)
        self.head = MLP(in_ch * length, num_classes, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # (N, D) -> (N, 1, D) -> (N, C_last, L)
        return self.head(h.flatten(1))  # (N, C_last * L) -> (N, classes)


BUILTIN = dict(zip(BUILTIN_ARCHS, (MLP, CNN1d)))  # the names are config's, so params validate without torch


def model_args(cfg: ModelTrainConfig, num_features: int, num_classes: int, signal: bool = False) -> dict[str, Any]:
    """The keyword arguments that rebuild a model, as stored in its checkpoint. `signal`: the
    features are an ordered signal (arch auto takes cnn1d), not the columns of a table (mlp)."""
    arch = ("cnn1d" if signal else "mlp") if cfg.arch == AUTO_ARCH else cfg.arch
    args: dict[str, Any] = {"arch": arch, "num_features": num_features, "num_classes": num_classes}
    if arch not in BUILTIN:
        return args | {"kwargs": dict(cfg.arch_kwargs)}
    args |= {"hidden": list(cfg.hidden), "dropout": cfg.dropout}
    if arch == "cnn1d":
        args |= {"channels": list(cfg.channels), "kernel_size": cfg.kernel_size}
    return args


def build_model(args: dict[str, Any]) -> nn.Module:
    """Instantiate a model from `model_args`."""
    kwargs = dict(args)
    arch = kwargs.pop("arch")
    if arch in BUILTIN:
        return BUILTIN[arch](**kwargs)
    factory = _import_factory(arch)
    try:
        model = factory(num_features=kwargs["num_features"], num_classes=kwargs["num_classes"], **kwargs["kwargs"])
    except TypeError as exc:
        raise UserError(f"arch {arch}: the factory refused its arguments ({exc}); it is called as "
                        "factory(num_features=..., num_classes=..., **arch_kwargs)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"arch {arch}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"arch {path}: cannot import {module_name} ({exc}); the module must be importable "
                        "from the project folder") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"arch {path}: {module_name} has no callable {attr}")
    return factory


def check_model(model: nn.Module, num_features: int, num_classes: int, arch: str) -> None:
    """Run a dummy batch through `model`: (2, num_features) in, (2, num_classes) logits out."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, num_features))
    except Exception as exc:  # the user's forward can raise anything
        raise UserError(f"arch {arch}: a batch of shape (2, {num_features}) fails in forward "
                        f"({type(exc).__name__}: {exc}); it must accept (batch, {num_features}) features") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"arch {arch}: returns {shape} for a batch of shape (2, {num_features}); "
                        f"it must return (batch, {num_classes}) logits")


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N, C) logits in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: str | Path, model: nn.Module, args: dict[str, Any], **info: Any) -> None:
    """Save weights, rebuild args and any extra `info` (config, epoch, metrics) atomically."""
    ckpt = {"version": CHECKPOINT_VERSION, "model_args": args, "state_dict": model.state_dict(), **info}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint; return the model in eval mode and the checkpoint dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; run the stage that makes it (dvc repro)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}); rerun its stage") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: not a checkpoint of this pipeline (version mismatch); rerun its stage")
    model = build_model(ckpt["model_args"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match its model arguments; rerun its stage") from None
    return model.eval(), ckpt
