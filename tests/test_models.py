"""Model shapes and self-describing checkpoints."""

import pytest
import torch

from distill.config import StudentConfig, TeacherConfig
from distill.errors import UserError
from distill.models import build_model, count_parameters, load_checkpoint, model_args, save_checkpoint


@pytest.mark.parametrize(
    "cfg",
    [
        TeacherConfig(arch="mlp", hidden=[32, 16]),
        TeacherConfig(arch="cnn1d", channels=[8, 8, 8], hidden=[16], kernel_size=5),
        StudentConfig(arch="cnn1d", channels=[4], hidden=[], kernel_size=3),
    ],
)
@pytest.mark.parametrize("num_features", [40, 64, 7])
def test_models_map_features_to_logits(cfg, num_features):
    model = build_model(model_args(cfg, num_features, 10))
    assert model(torch.randn(5, num_features)).shape == (5, 10)


def test_width_and_depth_come_from_the_config():
    small = build_model(model_args(TeacherConfig(arch="mlp", hidden=[8]), 40, 10))
    big = build_model(model_args(TeacherConfig(arch="mlp", hidden=[64, 64]), 40, 10))
    assert count_parameters(small) == 40 * 8 + 8 + 8 * 10 + 10
    assert count_parameters(big) > 10 * count_parameters(small)


def test_a_checkpoint_rebuilds_the_same_model_and_carries_its_description(tmp_path):
    cfg = TeacherConfig(arch="cnn1d", channels=[4, 4], hidden=[8])
    args = model_args(cfg, 40, 10)
    model = build_model(args).eval()
    save_checkpoint(tmp_path / "m.pt", model, args, config=cfg.model_dump(), epoch=3, val_accuracy=0.5)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(6, 40)
    torch.testing.assert_close(loaded(x), model(x))
    assert ckpt["epoch"] == 3 and ckpt["config"]["channels"] == [4, 4] and ckpt["model_args"] == args
    assert isinstance(torch.load(tmp_path / "m.pt", weights_only=True), dict)


def test_a_missing_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this pipeline"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_weights_of_another_architecture_are_refused(tmp_path):
    args = model_args(TeacherConfig(arch="mlp", hidden=[8]), 40, 10)
    save_checkpoint(tmp_path / "m.pt", build_model(args), args)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["model_args"] = model_args(TeacherConfig(arch="cnn1d", channels=[4], hidden=[8]), 40, 10)
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(UserError, match="weights do not match"):
        load_checkpoint(tmp_path / "m.pt")
