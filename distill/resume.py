"""Training state saved as a run goes, so a killed training stage picks up where it stopped.

A state is one file, `<dir>/<name>-<key>.pt`, where the key is a hash of everything the
training reads (config, seed, data, soft labels, processes, precision): other inputs never
pick it up. It holds the state of each training object (model, optimizer, schedule, random
generators) and whatever the loop needs to carry on; the loop removes it when training ends.
Classifiers save every few epochs (distill/training.py), language models every few steps
(distill/lm.py). The state lives outside DVC's outputs: DVC deletes a stage's outputs before
running it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.io import atomic_path

log = logging.getLogger(__name__)


def _state_of(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _set_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


RESERVED = {"key", "torch_rng", "cuda_rng"}


def _generators() -> dict[str, Any]:
    """torch's CPU generator, and the GPUs' once CUDA is in use (dropout on a GPU draws from those)."""
    out = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def _set_generators(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


@dataclass(frozen=True)
class Resume:
    """Where a training loop saves its state every `every` epochs or steps; a saved state is
    picked up only if its `key` (a hash of everything the training reads) matches."""

    path: Path
    key: str
    every: int

    @staticmethod
    def make(folder: str | Path, every: int, name: str, inputs: dict) -> Resume | None:
        """None when `every` is 0 (never save)."""
        if every == 0:
            return None
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        return Resume(Path(folder) / f"{name}-{key[:16]}.pt", key, every)

    def save(self, objects: dict[str, Any], **values: Any) -> None:
        """The state of each of `objects` (anything with state_dict, or a torch.Generator), torch's
        own generators (the CPU's, and the GPUs' once in use), and `values` (tensors, numbers, and
        lists and dicts of them), written atomically."""
        clash = (set(values) & set(objects)) | ((set(values) | set(objects)) & RESERVED)
        if clash:
            raise ValueError(f"resume state names used twice: {sorted(clash)}")
        state = {"key": self.key, **_generators(), **{name: _state_of(obj) for name, obj in objects.items()}, **values}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def restore(self, objects: dict[str, Any], name: str, values: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Load a matching saved state into `objects` and torch's generators; return the saved
        values, which must include `values` (None: nothing saved for these inputs, or a state that
        does not load: start over, the objects and generators as they were)."""
        if not self.path.is_file():
            return None
        initial = {key: copy.deepcopy(_state_of(obj)) for key, obj in objects.items()}
        generators = _generators()
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("key") != self.key:
                return None
            missing = [key for key in (*objects, *values) if key not in state]
            if missing:
                raise KeyError(f"no {missing} in the saved state")
            for key, obj in objects.items():
                _set_state(obj, state[key])
            _set_generators(state)
        except Exception as exc:  # a state from other code or a damaged file
            for key, obj in objects.items():
                _set_state(obj, initial[key])
            _set_generators(generators)
            log.warning("%s: ignoring saved training state %s (%s); starting from the beginning",
                        name, self.path, type(exc).__name__)
            return None
        return {key: value for key, value in state.items() if key not in objects and key not in RESERVED}

    def finish(self) -> None:
        """Training ended: the saved state is no longer needed."""
        self.path.unlink(missing_ok=True)
