"""params.yaml overrides from the command line (`--set key=value`), applied as DVC does.

One parser for both forms: `key=value` for a run, `key=v1,v2,...` for a sweep's
axis. An override changes that one value in params.yaml and nothing else (comments,
`null`s and flow lists stay), as `dvc exp run -S` would set it, and the result is
validated by distill.config, so a typo in a key or a value out of range is one
sentence before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any


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


def apply(path: Path, overrides: dict[str, Any]) -> Any:
    """Set each `key=value` of `overrides` in the params file at `path` (a value is read as YAML:
    `2`, `0.5`, `null`, `[64, 64]`, `mlp`), then validate it. Only those values change: comments,
    `null`s, flow lists and key order stay as the user wrote them (a round trip through
    ruamel.yaml, which DVC itself uses). Returns the validated params. On any error the file is
    left as it was and the error names the key."""
    original = path.read_text()
    document = _round_trip().load(original) or {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserError(f"--set {key}={value}: {path.name} has no key '{key}'; check its spelling")
        node[leaf] = _value(key, value)
    if overrides:
        stream = io.StringIO()
        _round_trip().dump(document, stream)
        path.write_text(stream.getvalue())
    try:
        return load_params(path, task=None)
    except UserError:
        path.write_text(original)
        raise


def _round_trip():
    from ruamel.yaml import YAML

    yaml_rt = YAML()  # round-trip mode: comments, flow style and quoting kept
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # no re-wrapping of long lines
    yaml_rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null",
                                                                                          "null"))
    return yaml_rt


def _value(key: str, text: Any) -> Any:
    """A --set value as YAML reads it ("2" -> 2, "[64, 64]" -> [64, 64], "null" -> None); a list
    or mapping is written in flow style, as one would type it."""
    if not isinstance(text, str):
        return text
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:  # YAML 1.2, as DVC reads -S values: 1e-3 is a number, `no` a string
        value = YAML(typ="safe").load(text) if text.strip() else text
    except YAMLError as exc:
        raise UserError(f"--set {key}={text}: not a value YAML can read ({str(exc).splitlines()[0]})") from None
    if isinstance(value, (list, dict)):
        from ruamel.yaml.comments import CommentedMap, CommentedSeq

        node = CommentedSeq(value) if isinstance(value, list) else CommentedMap(value)
        node.fa.set_flow_style()
        return node
    return value


def check(root: Path, overrides: dict[str, Any]) -> Any:
    """Apply `overrides` to a copy of root/params.yaml and validate it (params.yaml untouched);
    with none, params.yaml itself is validated, and its errors name it, not --set. Then the
    user's files those params name are read as the stages would read them (check_files).
    Returns the validated params."""
    params = load_params(root / "params.yaml", task=None)  # what is wrong in the file is not --set's fault
    if overrides:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "params.yaml"
            shutil.copy(root / "params.yaml", copy)
            try:
                params = apply(copy, overrides)
            except UserError as exc:
                said = " ".join(f"{k}={v}" for k, v in overrides.items())
                raise UserError(f"--set {said}: {str(exc).removeprefix(str(copy) + ': ')}".replace(
                    f"--set {said}: --set ", "--set ")) from None
    check_files(root, params)
    return params


def check_files(root: Path, params: Any) -> None:
    """What the task can refuse before DVC touches anything (distill.task.Task.check: a table's
    columns, the tokenizer and teacher folders), in the project folder `root`. DVC deletes a
    stage's outputs before running it: a refusal found here costs no earlier work."""
    from distill.task import get_task

    check = getattr(get_task(params.task), "check", None)  # a user's task may have no check
    if check is not None:
        with contextlib.chdir(root):
            check(params)
