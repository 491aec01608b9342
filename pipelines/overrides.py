"""params.yaml overrides from the command line (`--set key=value`), applied as DVC does.

One parser for both forms: `key=value` for a run, `key=v1,v2,...` for a sweep's
axis. Overrides are applied with DVC's own Hydra machinery (the `dvc exp run -S`
syntax) and the result is validated by distill.config, so a typo in a key or a
value out of range is one sentence before anything runs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from distill.config import load_params
from distill.errors import UserError


def parse(pairs: list[str], several: bool = False) -> dict[str, Any]:
    """["student.temperature=2"] -> {"student.temperature": "2"}; with `several`,
    ["student.temperature=1,2,4"] -> {"student.temperature": ["1", "2", "4"]} (values parsed by Hydra later)."""
    example = "student.temperature=1,2,4" if several else "student.temperature=2"
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        values = [v.strip() for v in value.split(",") if v.strip()] if several else value
        if not sep or not key or not values:
            raise UserError(f"--set {pair!r}: expected key={'value[,value...]' if several else 'value'}, e.g. {example}")
        out[key] = values
    if several and not out:
        raise UserError(f"a sweep needs at least one --set {example}")
    return out


def apply(path: Path, overrides: dict[str, Any]) -> None:
    """Edit the params file at `path` as `dvc exp run -S key=value` does, then validate it;
    on any error the file is left as it was and the error names the key."""
    from dvc.utils.hydra import apply_overrides

    original = path.read_text()
    raw = yaml.safe_load(original) or {}
    for key, value in overrides.items():
        if not _has_key(raw, key):
            raise UserError(f"--set {key}={value}: {path.name} has no key '{key}'; check its spelling")
    try:
        if overrides:
            apply_overrides(path, [f"{k}={v}" for k, v in overrides.items()])
        load_params(path, task=None)
    except UserError:
        path.write_text(original)
        raise
    except Exception as exc:  # dvc wraps Hydra's parse and composition errors (an unknown key, say)
        path.write_text(original)
        raise UserError(f"{path}: cannot apply overrides {overrides}: {exc}") from None


def check(root: Path, overrides: dict[str, Any]) -> None:
    """Apply `overrides` to a copy of root/params.yaml and validate it (params.yaml untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copy(root / "params.yaml", copy)
        try:
            apply(copy, overrides)
        except UserError as exc:
            said = " ".join(f"{k}={v}" for k, v in overrides.items())
            raise UserError(f"--set {said}: {str(exc).removeprefix(str(copy) + ': ')}".replace(
                f"--set {said}: --set ", "--set ")) from None


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
