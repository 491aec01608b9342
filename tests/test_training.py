"""The training loop: learning, selection on val, determinism."""

import numpy as np
import pytest

from distill import data, training
from distill.classification_params import DataConfig, StudentConfig
from distill.losses import Distillation
from distill.models import predict_logits


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=600, synthetic={"n_features": 20, "n_classes": 4,
                                                                          "hidden": 16}), out)
    return out


CFG = StudentConfig(arch="mlp", hidden=[32], epochs=4, batch_size=32, lr=0.01)


def train(prepared, tmp_path, seed, name="a"):
    return training.train_on_labels(training.TrainJob(CFG, seed, name), prepared,
                                    training.Outputs(tmp_path / f"{name}.pt", tmp_path / f"{name}.csv"))


def test_the_same_seed_gives_the_same_numbers(prepared, tmp_path):
    a, b = train(prepared, tmp_path, seed=3, name="a"), train(prepared, tmp_path, seed=3, name="b")
    assert a["history"] == b["history"]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_another_seed_gives_other_numbers(prepared, tmp_path):
    assert train(prepared, tmp_path, seed=1)["history"] != train(prepared, tmp_path, seed=2, name="b")["history"]


def test_training_learns_and_keeps_the_best_epoch_on_val(prepared, tmp_path):
    result = train(prepared, tmp_path, seed=0)
    val_acc = [row["val_accuracy"] for row in result["history"]]
    assert result["best_val_accuracy"] == max(val_acc) > 0.5
    # the highest accuracy; among equal ones (common on a small val split) the lowest loss
    best = min(result["history"], key=lambda row: (-row["val_accuracy"], row["val_loss"]))
    assert result["best_epoch"] == best["epoch"]


def _config(**update):
    from distill.classification_params import TeacherConfig

    return TeacherConfig(arch="mlp", hidden=[8], **update)


def test_a_small_data_set_gets_at_least_min_steps_and_patience_stops_early():
    assert training.planned_epochs(_config(epochs=5, min_steps=100), steps_per_epoch=4) == 25
    assert training.planned_epochs(_config(epochs=5, min_steps=100), steps_per_epoch=40) == 5
    assert training.planned_epochs(_config(epochs=5), steps_per_epoch=1) == 5


def test_the_baseline_takes_as_many_optimizer_steps_as_the_student(tmp_path):
    # 600 synthetic rows, 60 of them val and 120 test: 420 train; 2,000 transfer rows the student reads too
    out = tmp_path / "prepared"
    meta = data.prepare(DataConfig(source="synthetic", num_samples=600, transfer_size=2000,
                                   synthetic={"n_features": 20, "n_classes": 4, "hidden": 16}), out)
    rows = meta.splits["train"] + meta.splits["transfer"]
    student_steps = 4 * -(-rows // 32)  # CFG: 4 epochs of batches of 32 over train and transfer
    assert training.student_steps(CFG, meta) == student_steps
    job = training.with_student_budget(training.TrainJob(CFG, 0, "baseline"), meta)
    assert job.cfg.min_steps == student_steps and job.cfg.epochs == CFG.epochs
    result = training.train_on_labels(training.TrainJob(CFG, 0, "baseline"), out,
                                      training.Outputs(tmp_path / "b.pt", tmp_path / "b.csv"), student_budget=True)
    per_epoch = -(-meta.splits["train"] // 32)
    epochs = -(-student_steps // per_epoch)  # more epochs over train alone
    assert [r["step"] for r in result["history"]] == [per_epoch * (e + 1) for e in range(epochs)]
    # a patience of 2 of the student's epochs: as many optimizer steps of the baseline's
    patient = training.with_student_budget(training.TrainJob(CFG.model_copy(update={"patience": 2}), 0, "b"), meta)
    assert patient.cfg.patience == -(-2 * (student_steps // 4) // per_epoch)
    # no transfer rows: the student reads train alone, and the baseline keeps its epochs
    bare = data.prepare(DataConfig(source="synthetic", num_samples=600, transfer_size=0,
                                   synthetic={"n_features": 20, "n_classes": 4, "hidden": 16}), tmp_path / "bare")
    assert training.student_steps(CFG, bare) == 4 * -(-bare.splits["train"] // 32)
    assert training.with_student_budget(training.TrainJob(CFG, 0, "baseline"), bare).cfg.min_steps \
        == max(CFG.min_steps, training.student_steps(CFG, bare))


def test_patience_ends_training_after_epochs_without_a_better_checkpoint(prepared, tmp_path):
    from distill.rows import InMemoryRows

    split = data.read_split(prepared, "train")
    val = data.read_split(prepared, "val")
    meta = data.read_meta(prepared)
    cfg = _config(epochs=40, patience=3, lr=0.05)
    model = training.initial_model(cfg, meta, 0)
    result = training.fit_classifier(model, training.TrainJob(cfg, 0, "p"), InMemoryRows(split.x, split.y),
                                     (val.x, val.y))
    assert len(result.history) == result.best_epoch + 3 < 40


def test_online_distillation_matches_offline_from_the_same_teacher(prepared, tmp_path):
    import torch

    from distill import checkpoint
    from distill.rows import InMemoryRows

    train(prepared, tmp_path, seed=0, name="teacher")
    teacher, _ = checkpoint.load(tmp_path / "teacher.pt")
    meta, split, val = data.read_meta(prepared), data.read_split(prepared, "train"), data.read_split(prepared, "val")
    stored = predict_logits(teacher, torch.from_numpy(split.x)).numpy()
    histories = {}
    for mode, rows, kd in [
        ("offline", InMemoryRows(split.x, split.y, stored), Distillation(4.0, 0.9)),
        ("online", InMemoryRows(split.x, split.y), Distillation(4.0, 0.9, teacher=teacher)),
    ]:
        student = training.initial_model(CFG, meta, 0)
        result = training.fit_classifier(student, training.TrainJob(CFG, 0, distillation=kd), rows, (val.x, val.y))
        histories[mode] = result.history
        assert len(result.timings) == CFG.epochs and all(t.seconds > 0 for t in result.timings)
    for off, on in zip(histories["offline"], histories["online"]):
        assert off.keys() == on.keys()
        assert all(off[k] == pytest.approx(on[k], abs=1e-5) for k in off)


def test_a_student_trains_with_decoupled_kd_chosen_in_the_config(prepared, tmp_path):
    import torch

    from distill import checkpoint
    from distill.rows import InMemoryRows

    train(prepared, tmp_path, seed=0, name="teacher")
    teacher, _ = checkpoint.load(tmp_path / "teacher.pt")
    meta, split, val = data.read_meta(prepared), data.read_split(prepared, "train"), data.read_split(prepared, "val")
    logits = predict_logits(teacher, torch.from_numpy(split.x)).numpy()
    cfg = StudentConfig(arch="mlp", hidden=[32], epochs=4, batch_size=32, lr=0.01, loss="dkd",
                        dkd_target_weight=1.0, dkd_nontarget_weight=8.0)
    distillation = Distillation.of(cfg)
    assert distillation.loss == "dkd" and distillation.loss_options == {"target_weight": 1.0, "nontarget_weight": 8.0}
    student = training.initial_model(cfg, meta, 0)
    job = training.TrainJob(cfg, 0, distillation=distillation)
    result = training.fit_classifier(student, job, InMemoryRows(split.x, split.y, logits), (val.x, val.y))
    assert {"train_tckd", "train_nckd", "train_kd", "train_ce"} <= set(result.history[0])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy > 0.5
