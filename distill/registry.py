"""A registry: the names of one kind of choice (architectures, losses) mapped to the function that
builds or computes each, as torchdistill's `register_*`/`get_*` and mdistiller's `distiller_dict`.
A new architecture or loss is one function and one `@REGISTRY.register("name")` line; an unknown
name is refused in one sentence that lists the known ones. A user's own choice (an architecture,
a task) is named by import path, `package.module:name`, and found with `imported`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from distill.errors import UserError

F = TypeVar("F", bound=Callable)
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # package.module:name, a user's own model or task


def imported(path: str, what: str) -> Callable:
    """The function or class `package.module:name` names; one sentence if it cannot be had.
    `what`: what it is named as, for that sentence ("arch my_nets:build")."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what}: cannot import {module_name} ({exc}); the module must be importable "
                        "from the project folder") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise UserError(f"{what}: {module_name} has no callable {attr}")
    return found


class Registry(dict):
    """name -> function, for one `kind` of choice ("arch", "loss")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under `name` (a name taken is a programming error)."""

        def register(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name} is registered already (by {self[name].__qualname__})")
            self[name] = fn
            return fn

        return register

    def find(self, name: str, known: list[str] | None = None, other: str = "") -> Callable:
        """The function registered as `name`; one sentence naming the `known` ones (default: all) if none."""
        if name not in self:
            listed = ", ".join(sorted(self) if known is None else known)
            raise UserError(f"{self.kind} {name} is not known: use one of {listed}{other}")
        return self[name]
