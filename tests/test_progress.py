"""Progress bars: shown on a terminal (or when forced), silent off one."""

from __future__ import annotations

import io

import numpy as np

from distill import progress
from distill.classification_params import ModelTrainConfig
from distill.checkpoint import build_model
from distill.models import model_args
from distill.rows import InMemoryRows
from distill.training import TrainJob, fit_classifier


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
    return fit_classifier(model, TrainJob(cfg, seed=0, name="tiny"), InMemoryRows(x, y), (x[:64], y[:64]))


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


def test_on_a_terminal_a_stage_draws_its_bars_on_a_pseudo_terminal_of_this_terminals_size(capfdbinary, monkeypatch):
    import sys

    from pipelines.tools import run_streaming, tool_env

    child = ("import shutil, sys; from tqdm import tqdm; print(sys.stderr.isatty(), *shutil.get_terminal_size()); "
             "[None for _ in tqdm(range(3), desc='rows', file=sys.stderr)]")
    monkeypatch.setenv("COLUMNS", "97")  # this terminal's size, as shutil reads it
    monkeypatch.setenv("LINES", "31")
    env = {k: v for k, v in tool_env().items() if k not in ("COLUMNS", "LINES")}  # the child asks its terminal
    seen: list[str] = []
    code, lines = run_streaming([sys.executable, "-c", child], ".", env, seen.append, terminal=True)
    assert code == 0 and seen == lines
    assert lines[0] == "True 97 31"  # a terminal, of this terminal's size: a 0 x 0 one draws no bar
    assert any(line.startswith("rows: 100%") and "3/3" in line for line in lines)  # the bar's last state
    assert b"\r" in capfdbinary.readouterr().err  # passed on as drawn, redraws and all
    code, lines = run_streaming([sys.executable, "-c", child], ".", env, seen.append, terminal=False)
    assert code == 0 and lines[0].startswith("False")
