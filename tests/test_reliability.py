"""A killed run loses nothing, the same seed gives the same numbers, two runs at once do not collide."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, run_pipeline_in_process, run_stage_in_process, subprocess_env, tiny_params
from distill import data, training
from distill.classification_params import DataConfig, StudentConfig
from distill import checkpoint
from distill.resume import Resume
from distill.rows import InMemoryRows
from scratch import make_scratch_project


def stage_cmd(root: Path, stage: str) -> list[str]:
    return shlex.split(yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"])


def scratch(tmp_path: Path, **overrides) -> Path:
    return make_scratch_project(tmp_path / "project", yaml.safe_dump(tiny_params(**overrides), sort_keys=False))


# ---------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def test_an_interrupted_fit_resumes_from_its_last_save_and_ends_as_an_uninterrupted_one(tmp_path):
    prepared = tmp_path / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=600), prepared)
    meta, train, val = data.read_meta(prepared), data.read_split(prepared, "train"), data.read_split(prepared, "val")
    cfg = StudentConfig(arch="mlp", hidden=[32], epochs=5, batch_size=32, lr=0.01, dropout=0.3)
    rows = InMemoryRows(train.x, train.y)

    def run(resume=None, stop_after: int | None = None) -> training.TrainResult:
        def on_epoch(row):
            if row["epoch"] == stop_after and "epoch_seconds" in row:
                raise Interrupted

        model = training.initial_model(cfg, meta, 0)
        job = training.TrainJob(cfg, 0, on_epoch=on_epoch)
        return training.fit_classifier(model, job, rows, (val.x, val.y), resume)

    reference = run()
    resume = Resume.make(tmp_path / "resume", 2, "s", {"k": 1})
    with pytest.raises(Interrupted):
        run(resume, stop_after=3)  # saved after epoch 2, killed during epoch 3's bookkeeping
    assert resume.path.is_file()
    resumed = run(resume)
    assert resumed.history == reference.history  # dropout and batch order included
    assert [t.seconds > 0 for t in resumed.timings] == [True] * 3  # only epochs 3-5 ran again
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                   reference.model.state_dict().values()))
    assert not resume.path.exists()  # removed once training ends
    other = Resume.make(tmp_path / "resume", 2, "s", {"k": 2})
    assert other.path != resume.path  # other inputs never pick up this state


def test_a_saved_state_that_does_not_fit_is_ignored_and_leaves_the_training_objects_as_they_were(tmp_path, caplog):
    model, gen = torch.nn.Linear(3, 2), torch.Generator().manual_seed(5)
    resume = Resume.make(tmp_path, 1, "m", {"k": 1})
    resume.save({"generator": gen, "model": model}, step=3)
    for clash in ({"model": 1}, {"torch_rng": 1}):
        with pytest.raises(ValueError, match="used twice"):
            resume.save({"model": model}, **clash)
    other_gen = torch.Generator().manual_seed(6)
    wider = torch.nn.Linear(3, 4)  # other code: the generator loads, then the model does not
    before = [t.clone() for t in wider.state_dict().values()]
    gen_before, rng_before = other_gen.get_state(), torch.get_rng_state()
    assert resume.restore({"generator": other_gen, "model": wider}, "m") is None
    assert "ignoring saved training state" in caplog.text
    assert torch.equal(other_gen.get_state(), gen_before) and torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(wider.state_dict().values(), before, strict=True))
    assert resume.restore({"model": torch.nn.Linear(3, 2)}, "m", ("epoch",)) is None  # a value the loop needs
    same = torch.nn.Linear(3, 2)
    assert resume.restore({"generator": other_gen, "model": same}, "m", ("step",)) == {"step": 3}
    assert torch.equal(same.weight, model.weight) and torch.equal(other_gen.get_state(), gen.get_state())


@pytest.mark.slow
def test_a_training_stage_killed_mid_epoch_resumes_and_matches_the_uninterrupted_run(tmp_path):
    root = scratch(tmp_path, **{"data.num_samples": 20000, "data.transfer_size": 0,
                                "teacher.hidden": [256, 256], "teacher.epochs": 6, "teacher.batch_size": 32})
    run_stage_in_process(root, "prepare")
    cmd = stage_cmd(root, "train_teacher")
    # CPU kernels sum in an order that depends on the thread count, and OpenMP / MKL may
    # change it under load: one thread each makes the processes comparable bit for bit.
    env = subprocess_env() | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
    reference = cmd[:]
    reference[reference.index("models/teacher.pt")] = "models/reference.pt"
    subprocess.run(reference, cwd=root, env=env, check=True, capture_output=True)
    assert not list((root / ".resume").glob("*")), "a finished run leaves no saved state"

    proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "teacher epoch 3/6" in line:
            time.sleep(0.2)  # into epoch 4
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "models" / "teacher.pt").exists()
    assert len(list((root / ".resume").glob("teacher-*.pt"))) == 1

    rerun = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True)
    assert "teacher: resuming after epoch" in rerun.stderr
    assert "teacher epoch 1/6" not in rerun.stderr
    _, resumed = checkpoint.load(root / "models" / "teacher.pt")
    _, uninterrupted = checkpoint.load(root / "models" / "reference.pt")
    assert resumed["epoch"] == uninterrupted["epoch"]
    assert resumed["val_accuracy"] == uninterrupted["val_accuracy"]
    assert resumed["history"] == uninterrupted["history"]
    for a, b in zip(resumed["state_dict"].values(), uninterrupted["state_dict"].values(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- atomic outputs


@pytest.mark.slow
def test_soft_labels_killed_mid_write_leave_no_partial_parquet_and_the_rerun_cleans_up(tmp_path):
    root = scratch(tmp_path, **{"data.transfer_size": 400_000, "soft_labels.batch_size": 256,
                                "soft_labels.shard_rows": 100_000})
    for stage in ("prepare", "train_teacher"):
        run_stage_in_process(root, stage)
    proc = subprocess.Popen(stage_cmd(root, "soft_labels"), cwd=root, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline and partial is None:
        found = [p for p in (root / "data").glob(".soft_labels.tmp-*/part-*.parquet") if p.stat().st_size]
        partial = found[0] if found else None
        time.sleep(0.01)
    assert partial is not None, "the soft-label shards are written into a temporary folder"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "data" / "soft_labels").exists(), "nothing at the output path DVC would cache"

    subprocess.run(stage_cmd(root, "soft_labels"), cwd=root, env=subprocess_env(), check=True, capture_output=True)
    assert [p.name for p in (root / "data").iterdir() if p.name.startswith(".soft_labels")] == []
    meta = data.read_meta(root / "data" / "prepared")
    from distill.softlabels import read_soft_labels

    assert len(read_soft_labels(root / "data" / "soft_labels", meta).ids) == meta.splits["train"] + 400_000


# ---------------------------------------------------------------- determinism


def test_the_same_params_and_seed_give_identical_metrics_and_artifacts(tiny_pipeline, tmp_path):
    """A second build, in this process, against the session's build by `dvc repro` (a process per stage)."""
    root = make_scratch_project(tmp_path / "again", yaml.safe_dump(tiny_params(), sort_keys=False))
    run_pipeline_in_process(root)
    runs = []
    for built in (tiny_pipeline, root):
        metrics = json.loads((built / "reports" / "metrics.json").read_text())
        for model in ("teacher", "student", "baseline"):
            for key in [k for k in metrics[model] if k.startswith("latency")]:
                del metrics[model][key]  # wall-clock timings, the one thing allowed to differ
        runs.append((built, metrics))
    (a, metrics_a), (b, metrics_b) = runs
    assert metrics_a == metrics_b
    soft = [f"data/soft_labels/{p.name}" for p in sorted((a / "data/soft_labels").iterdir())]
    assert len(soft) == 4  # TINY_PARAMS: three shards and provenance.json
    for rel in ("data/prepared/train.parquet", *soft, "reports/train/student.csv", "reports/predictions.csv"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for model in ("teacher", "student", "baseline"):
        ckpt_a, ckpt_b = (torch.load(r / "models" / f"{model}.pt", weights_only=True) for r in (a, b))
        assert all(torch.equal(x, y) for x, y in zip(ckpt_a["state_dict"].values(), ckpt_b["state_dict"].values()))
        assert ckpt_a["history"] == ckpt_b["history"]


# ---------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_two_dvc_repro_at_once_one_runs_the_other_is_refused_and_nothing_is_corrupted(tmp_path):
    root = scratch(tmp_path)
    dvc = [str(BIN / "dvc"), "repro"]
    procs = [subprocess.Popen(dvc, cwd=root, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = outputs[[p.returncode for p in procs].index(codes[1])]
    # DVC's repository lock or its per-output lock, whichever the second run reached first
    assert ("Unable to acquire lock. Most likely another DVC process is running" in refused
            or ("is busy, it is being blocked by" in refused and "dvc repro" in refused)), refused
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=root, env=subprocess_env(), capture_output=True,
                            text=True, check=True)
    assert "up to date" in status.stdout
    meta = data.read_meta(root / "data" / "prepared")
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics) >= {"teacher", "student", "baseline"} and meta.num_classes == 4
    assert np.isfinite(metrics["student"]["test_accuracy"])
    assert not [p for p in root.rglob(".*.tmp-*")]
