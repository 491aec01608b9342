"""Your own model: `arch: package.module:factory` with `arch_kwargs`, checked before training."""

import textwrap

import pytest
import torch

from distill import data, softlabels, training
from distill.classification_params import DataConfig, SoftLabelsConfig, StudentConfig, TeacherConfig
from distill.errors import UserError
from distill import checkpoint

USER_MODULE = '''
import torch
from torch import nn


class Gated(nn.Module):
    """A small gated network, nothing the pipeline knows about."""

    def __init__(self, num_features, num_classes, width):
        super().__init__()
        self.value, self.gate = nn.Linear(num_features, width), nn.Linear(num_features, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))


def gated(num_features, num_classes, width=8):
    return Gated(num_features, num_classes, width)


def wrong_shape(num_features, num_classes):
    return nn.Linear(num_features, num_classes + 1)


def not_a_module(num_features, num_classes):
    return "hello"
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


@pytest.fixture
def prepared_with_soft_labels(tmp_path):
    prepared = tmp_path / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=600, transfer_size=400,
                            synthetic={"n_features": 12, "n_classes": 3, "hidden": 8}), prepared)
    teacher = TeacherConfig(arch="mlp", hidden=[32], epochs=3, batch_size=32, lr=0.01)
    training.train_on_labels(training.TrainJob(teacher, 0, "teacher"), prepared,
                             training.Outputs(tmp_path / "teacher.pt", tmp_path / "teacher.csv"))
    softlabels.dump(tmp_path / "teacher.pt", prepared, tmp_path / "soft", SoftLabelsConfig())
    return prepared, tmp_path / "soft"


def student(arch: str, **kwargs) -> StudentConfig:
    return StudentConfig(arch=arch, arch_kwargs=kwargs, epochs=3, batch_size=32, lr=0.01)


def test_a_student_given_by_import_path_trains_saves_and_reloads(tmp_path, user_module, prepared_with_soft_labels):
    prepared, soft = prepared_with_soft_labels
    result = training.train_student(training.TrainJob(student(f"{user_module}:gated", width=16)), prepared, soft,
                                    training.Outputs(tmp_path / "student.pt", tmp_path / "student.csv"))
    assert result["best_val_accuracy"] > 0.5
    assert result["parameters"] == 2 * (12 * 16 + 16) + (16 * 3 + 3)
    model, ckpt = checkpoint.load(tmp_path / "student.pt")
    assert type(model).__name__ == "Gated"
    assert ckpt["model_args"] == {"arch": "my_nets:gated", "num_features": 12, "num_classes": 3,
                                  "kwargs": {"width": 16}}
    assert model(torch.zeros(5, 12)).shape == (5, 3)


@pytest.mark.parametrize("arch, kwargs, message", [
    ("my_nets:wrong_shape", {}, "returns (2, 4) for a batch of shape (2, 12); it must return (batch, 3) logits"),
    ("my_nets:not_a_module", {}, "returned str, not a torch.nn.Module"),
    ("my_nets:gated", {"depth": 3}, "the factory refused its arguments"),
    ("my_nets:missing", {}, "my_nets has no callable missing"),
    ("no_such_package.nets:build", {}, "cannot import no_such_package.nets"),
])
def test_a_bad_user_model_is_refused_before_training(tmp_path, user_module, prepared_with_soft_labels, arch, kwargs,
                                                      message):
    prepared, soft = prepared_with_soft_labels
    with pytest.raises(UserError, match=None) as err:
        training.train_student(training.TrainJob(student(arch, **kwargs)), prepared, soft,
                               training.Outputs(tmp_path / "s.pt", tmp_path / "s.csv"))
    assert message in str(err.value) and arch in str(err.value)
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("arch, kwargs, message", [
    ("resnet", {}, "must be auto, mlp, cnn1d, or an import path"),
    ("my_nets.gated", {}, "must be auto, mlp, cnn1d, or an import path"),
    ("mlp", {"width": 3}, "arch_kwargs is for an import-path arch"),
])
def test_the_arch_key_takes_a_builtin_name_or_an_import_path(arch, kwargs, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        StudentConfig(arch=arch, arch_kwargs=kwargs)
