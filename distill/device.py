"""Where the models run and at what precision (`runtime.*`): the device, autocast, the gradient
scaler, and copying batches to the device.

`runtime.device: auto` is CUDA when torch sees a GPU, else the CPU; under torchrun each
process takes the GPU of its local rank. `runtime.precision: bf16 | fp16` runs the forward
passes and losses under autocast (weights, optimizer state and checkpoints stay float32);
fp16 also scales the loss (a GradScaler), and needs a GPU. Checkpoints are saved from the
CPU copy of the unwrapped model, so they load on a CPU-only machine.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from distill.config import RuntimeConfig
from distill.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

CPU = torch.device("cpu")


def resolve(cfg: RuntimeConfig) -> torch.device:
    """The device `cfg.device` names, checked against this machine (one sentence if it is not there)."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device is '{cfg.device}' but torch sees no CUDA device here "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                            "set runtime.device: auto or cpu")
        if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: a GPU per process
            if name != "cuda":
                raise UserError(f"runtime.device '{cfg.device}' names one GPU, but torchrun runs several processes, "
                                "each on the GPU of its local rank; set runtime.device: cuda or auto")
            name = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"runtime.device is '{cfg.device}' but only {torch.cuda.device_count()} CUDA "
                            "device(s) are visible; pick one of them or set runtime.device: auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("runtime.device is 'mps' but torch sees no Apple GPU here; set runtime.device: auto or cpu")
    device = torch.device(name)
    if cfg.precision == "fp16" and device.type == "cpu":
        raise UserError("runtime.precision fp16 needs a GPU (it is for CUDA's half-precision units); "
                        "use bf16 on the CPU, or fp32")
    return device


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed precision for the forward pass and loss (a no-op at fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (which would underflow small gradients); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A batch on `device`: copied from pinned memory without blocking when it goes to a GPU."""
    if tensor is None or device.type == "cpu":
        return tensor
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def describe(device: torch.device, precision: str) -> str:
    """'cpu fp32', 'cuda:0 bf16 (NVIDIA H200)': what a figure was measured on."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{device} {precision}{name}"
