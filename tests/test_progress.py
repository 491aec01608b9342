"""Progress bars: shown on a terminal (or when forced), silent off one."""

from __future__ import annotations

import io

import numpy as np

from distill import progress
from distill.config import ModelTrainConfig
from distill.models import build_model, model_args
from distill.rows import InMemoryRows
from distill.training import TrainJob, fit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_enabled_follows_terminal_ci_and_override(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress.enabled(Terminal())
    assert not progress.enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not progress.enabled(Terminal())
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled(io.StringIO())
    monkeypatch.setenv(progress.ENV, "0")
    monkeypatch.delenv("CI")
    assert not progress.enabled(Terminal())


def tiny_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    cfg = ModelTrainConfig(arch="mlp", hidden=[8], epochs=2, batch_size=64, lr=0.01)
    model = build_model(model_args(cfg, 6, 2))
    return fit(model, TrainJob(cfg, seed=0, name="tiny"), InMemoryRows(x, y), (x[:64], y[:64]))


def test_training_shows_epochs_and_batches_when_forced(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    tiny_fit()
    err = capsys.readouterr().err
    assert "tiny" in err and "8/8" in err and "batch" in err  # 2 epochs x 4 batches
    assert "epoch 2/2 val_accuracy" in err


def test_training_prints_no_bar_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)  # pytest's captured stderr is not a terminal
    tiny_fit()
    assert "batch/s" not in capsys.readouterr().err
