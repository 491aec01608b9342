"""The training loop: learning, selection on val, determinism."""

import numpy as np
import pytest

from distill import data, training
from distill.config import DataConfig, StudentConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=600, synthetic={"n_features": 20, "n_classes": 4,
                                                                          "hidden": 16}), out)
    return out


CFG = StudentConfig(arch="mlp", hidden=[32], epochs=4, batch_size=32, lr=0.01)


def train(prepared, tmp_path, seed, name="a"):
    return training.train_on_labels(CFG, seed, prepared, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv", name=name)


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
    assert result["best_epoch"] == 1 + int(np.argmax(val_acc))
