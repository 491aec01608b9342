"""Bad input gets one clear sentence: params, data files and artifacts are refused by name.

Each case starts from a copy of a tiny project whose stages have all run, breaks one
thing, runs one stage command as DVC would (a fresh process), and checks: exit
status 2, the key or file named in the message, no traceback, and no DVC output
created or changed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import TINY_PARAMS, subprocess_env, tiny_params, write_params
from distill.io import file_sha256

OUTPUT_DIRS = ("data", "models", "reports")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the output folders, by content."""
    return {str(p.relative_to(root)): file_sha256(p) for d in OUTPUT_DIRS for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def run_stage(root: Path, stage: str) -> subprocess.CompletedProcess:
    cmd = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return subprocess.run(shlex.split(cmd), cwd=root, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


# ---------------------------------------------------------------- breakages


def params(**overrides) -> Callable[[Path], None]:
    return lambda root: write_params(root / "params.yaml", tiny_params(**overrides))


def raw_params(text: str) -> Callable[[Path], None]:
    return lambda root: (root / "params.yaml").write_text(text)


def table_source(df: pd.DataFrame | None, name: str, **data) -> Callable[[Path], None]:
    """params reading `name` (csv or parquet, written from `df` unless None) with data overrides."""

    def apply(root: Path) -> None:
        source = "parquet" if name.endswith(".parquet") else "csv"
        if df is not None:
            df.to_parquet(root / name) if source == "parquet" else df.to_csv(root / name, index=False)
        overrides = {"data.source": source, "data.path": name, "data.transfer_size": 0}
        write_params(root / "params.yaml", tiny_params(**overrides, **{f"data.{k}": v for k, v in data.items()}))

    return apply


def frame(n: int = 60, classes: int = 3, **extra) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"f1": rng.normal(size=n), "f2": rng.normal(size=n), "label": np.arange(n) % classes})
    return df.assign(**extra)


def truncated_table(name: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        frame().to_parquet(root / name)
        (root / name).write_bytes((root / name).read_bytes()[:-50])
        table_source(None, name)(root)

    return apply


def truncate(rel: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return apply


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def soft_labels_with_provenance(**changes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        import json

        path = root / "data/soft_labels/provenance.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return apply


def provenance_without_last_shard(root: Path) -> None:
    """provenance.json lists one shard fewer than the folder holds (its row total adjusted to match)."""
    import json

    path = root / "data/soft_labels/provenance.json"
    prov = json.loads(path.read_text())
    prov["rows"] -= prov["shards"].pop()["rows"]
    path.write_text(json.dumps(prov))


def shard_of_another_set(root: Path) -> None:
    """part-00001 replaced by the same shard of a float16 set made from the same teacher and data."""
    from distill import softlabels
    from distill.classification_params import SoftLabelsConfig

    other = root / "other_soft_labels"
    cfg = SoftLabelsConfig(**TINY_PARAMS["soft_labels"] | {"dtype": "float16"})
    softlabels.dump(root / "models/teacher.pt", root / "data/prepared", other, cfg)
    shutil.copy(other / "part-00001.parquet", root / "data/soft_labels/part-00001.parquet")


def foreign_soft_labels(root: Path) -> None:
    pq.write_table(pq.read_table(root / "data/prepared/train.parquet"), root / "data/soft_labels/part-00000.parquet")


def other_architecture(rel: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        ckpt = torch.load(root / rel, weights_only=True)
        ckpt["model_args"] = ckpt["model_args"] | {"hidden": [99]}
        torch.save(ckpt, root / rel)

    return apply


CASES = [
    # params.yaml: refused before any work, naming the key, the value and what is allowed
    ("unknown key", "prepare", raw_params(yaml.safe_dump(TINY_PARAMS | {"studnet": {}})), ["'studnet'"]),
    ("misspelt nested key", "train_student",
     raw_params(yaml.safe_dump(TINY_PARAMS | {"student": TINY_PARAMS["student"] | {"temprature": 2}})),
     ["student.temprature"]),
    ("temperature 0", "train_student", params(**{"student.temperature": 0}), ["student.temperature = 0"]),
    ("alpha above 1", "train_student", params(**{"student.alpha": 1.5}), ["student.alpha = 1.5"]),
    ("batch size 0", "train_teacher", params(**{"teacher.batch_size": 0}), ["teacher.batch_size = 0"]),
    ("negative size", "prepare", params(**{"data.transfer_size": -5}), ["data.transfer_size = -5"]),
    ("unknown architecture", "train_teacher", params(**{"teacher.arch": "resnet"}), ["teacher.arch", "resnet"]),
    ("unknown data source", "prepare", params(**{"data.source": "imagenet"}), ["data.source", "imagenet"]),
    ("wrong type", "train_baseline", params(**{"student.epochs": "ten"}), ["student.epochs", "ten"]),
    ("zero width", "train_teacher", params(**{"teacher.hidden": [0]}), ["teacher.hidden"]),
    ("unknown dtype", "soft_labels", params(**{"soft_labels.dtype": "int8"}), ["soft_labels.dtype", "int8"]),
    ("top_k not below the classes", "soft_labels", params(**{"soft_labels.top_k": 4}), ["soft_labels.top_k = 4"]),
    ("params file missing", "prepare", remove("params.yaml"), ["params.yaml", "not found"]),
    ("params not YAML", "prepare", raw_params("data: [unclosed\n"), ["params.yaml", "YAML"]),
    ("params file empty", "prepare", raw_params("# nothing here yet\n"), ["params.yaml", "is empty", "distill new"]),
    # the user's data file, checked by prepare
    ("data file missing", "prepare", table_source(None, "missing.csv"), ["missing.csv", "not found"]),
    ("truncated parquet", "prepare", truncated_table("cut.parquet"), ["cut.parquet", "cannot be read"]),
    ("a column named twice", "prepare", table_source(pd.concat([frame(), frame()[["f2"]]], axis=1), "d.csv"),
     ["d.csv", "column 'f2' appears 2 times"]),
    ("no label column", "prepare", table_source(frame(), "d.csv", label_column="target"),
     ["d.csv", "'target'", "data.label_column"]),
    ("no numeric features", "prepare",
     table_source(pd.DataFrame({"name": list("abcdef") * 5, "label": [0, 1] * 15}), "d.csv"),
     ["d.csv", "no numeric feature columns"]),
    ("non-numeric feature", "prepare", table_source(frame(colour="red"), "d.csv", feature_columns=["f1", "colour"]),
     ["d.csv", "'colour' is not numeric"]),
    ("NaN values", "prepare", table_source(frame(f3=[np.nan] + [1.0] * 59), "d.csv"),
     ["d.csv", "'f3'", "NaN", "data.on_nan"]),
    ("infinite values", "prepare", table_source(frame(f3=[np.inf] + [1.0] * 59), "d.parquet"),
     ["d.parquet", "'f3'", "infinite"]),
    ("a single class", "prepare", table_source(frame(classes=1), "d.csv"), ["only one class"]),
    ("a class too small to split", "prepare",
     table_source(frame().assign(label=[0, 1] * 29 + [2, 0]), "d.csv"), ["class '2' has 1 rows"]),
    # artifacts handed from stage to stage
    # soft labels: TINY_PARAMS' shard_rows makes three shards, part-00000 to part-00002, and provenance.json
    ("truncated soft-label shard", "train_student", truncate("data/soft_labels/part-00001.parquet"),
     ["data/soft_labels/part-00001.parquet", "truncated"]),
    ("missing soft-label shard", "train_student", remove("data/soft_labels/part-00002.parquet"),
     ["data/soft_labels/part-00002.parquet", "not found", "lists 3 shards"]),
    ("soft-label shard of another set", "train_student", shard_of_another_set,
     ["data/soft_labels/part-00001.parquet", "not shard 1 of this soft-label set"]),
    ("provenance listing fewer shards", "train_student", provenance_without_last_shard,
     ["data/soft_labels/part-00002.parquet", "does not list", "lists 2"]),
    ("soft-label provenance missing", "train_student", remove("data/soft_labels/provenance.json"),
     ["data/soft_labels/provenance.json", "not found"]),
    ("stale soft labels", "train_student", soft_labels_with_provenance(prepared_fingerprint="0" * 64),
     ["data/soft_labels/provenance.json", "stale"]),
    ("soft labels with other classes", "train_student", soft_labels_with_provenance(num_classes=7),
     ["data/soft_labels/provenance.json", "7 classes"]),
    ("foreign parquet as a soft-label shard", "train_student", foreign_soft_labels,
     ["data/soft_labels/part-00000.parquet", "provenance"]),
    ("truncated teacher checkpoint", "soft_labels", truncate("models/teacher.pt"), ["models/teacher.pt"]),
    ("checkpoint of another architecture", "evaluate", other_architecture("models/student.pt"),
     ["models/student.pt", "do not match"]),
    ("prepared data missing", "train_teacher", remove("data/prepared/meta.json"), ["data/prepared/meta.json"]),
    ("truncated prepared split", "train_teacher", truncate("data/prepared/train.parquet"),
     ["data/prepared/train.parquet"]),
]


@pytest.mark.parametrize("name, stage, breakage, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name_without_traceback_or_changed_outputs(tiny_pipeline, tmp_path, name, stage,
                                                                            breakage, named):
    root = tmp_path / "project"
    shutil.copytree(tiny_pipeline, root, symlinks=True)  # the session's build, never changed itself
    breakage(root)
    before = snapshot(root)
    result = run_stage(root, stage)
    assert result.returncode == 2, result.stderr
    message = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(message) == 1, result.stderr
    for text in named:
        assert text in message[0], message[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(root) == before


def test_there_are_at_least_twenty_cases_across_params_data_and_artifacts():
    stages = {stage for _, stage, _, _ in CASES}
    assert len(CASES) >= 20 and {"prepare", "train_teacher", "soft_labels", "train_student", "evaluate"} <= stages
