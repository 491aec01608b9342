"""Model shapes, the architecture registry and self-describing checkpoints."""

import pytest
import torch
from torch import nn

from distill import checkpoint, pretrained
from distill.checkpoint import ARCHS, build_model, count_parameters, get_arch, register_arch
from distill.classification_params import BUILTIN_ARCHS, StudentConfig, TeacherConfig
from distill.errors import UserError
from distill.models import MLP, model_args

TOKENS = {"vocab_size": 30, "pad_id": 0}


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
    checkpoint.save(tmp_path / "m.pt", model, args, "classify", config=cfg.model_dump(), epoch=3, val_accuracy=0.5)
    loaded, ckpt = checkpoint.load(tmp_path / "m.pt")
    x = torch.randn(6, 40)
    torch.testing.assert_close(loaded(x), model(x))
    assert ckpt["epoch"] == 3 and ckpt["config"]["channels"] == [4, 4] and ckpt["model_args"] == args
    assert isinstance(torch.load(tmp_path / "m.pt", weights_only=True), dict) and ckpt["task"] == "classify"


def test_a_checkpoint_of_the_earlier_format_still_loads_as_the_task_that_made_it(tmp_path):
    args = model_args(TeacherConfig(arch="mlp", hidden=[8]), 40, 10)
    model = build_model(args).eval()
    torch.save({"version": 1, "model_args": args, "state_dict": model.state_dict(), "epoch": 2}, tmp_path / "v1.pt")
    loaded, ckpt = checkpoint.load(tmp_path / "v1.pt")
    assert ckpt["task"] == "classify" and ckpt["epoch"] == 2
    x = torch.randn(3, 40)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(UserError, match="a classify checkpoint, not a language_model one"):
        checkpoint.load(tmp_path / "v1.pt", task="language_model")


def test_a_missing_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this pipeline"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_weights_of_another_architecture_are_refused(tmp_path):
    args = model_args(TeacherConfig(arch="mlp", hidden=[8]), 40, 10)
    checkpoint.save(tmp_path / "m.pt", build_model(args), args, "classify")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["model_args"] = model_args(TeacherConfig(arch="cnn1d", channels=[4], hidden=[8]), 40, 10)
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(UserError, match="weights do not match"):
        checkpoint.load(tmp_path / "m.pt")


def test_every_builtin_arch_the_config_accepts_has_a_builder():
    assert set(BUILTIN_ARCHS) <= set(ARCHS)


def test_importing_pretrained_registers_the_transformer_and_torchscript_archs():
    assert {pretrained.TRANSFORMER, pretrained.TORCHSCRIPT} <= set(ARCHS)


def test_an_unknown_arch_is_refused_in_one_sentence_naming_the_known_ones():
    with pytest.raises(UserError, match=r"^arch resnet is not known: use one of (causal_lm, )?cnn1d, mlp, textcnn, torchscript, "
                                        r"transformer, or package.module:factory for your own model$"):
        get_arch("resnet")
    with pytest.raises(UserError, match="arch resnet is not known"):
        build_model({"arch": "resnet", "num_features": 4, "num_classes": 2})


@pytest.fixture
def linear_arch():
    """An arch registered for one test, and removed again after it."""

    @register_arch("linear")
    def linear(args):
        return nn.Linear(args["num_features"], args["num_classes"])

    yield linear
    del ARCHS["linear"]


def test_a_registered_arch_is_found_by_name_and_its_checkpoint_round_trips(tmp_path, linear_arch):
    assert get_arch("linear") is linear_arch
    args = {"arch": "linear", "num_features": 5, "num_classes": 3}
    model = build_model(args)
    checkpoint.save(tmp_path / "m.pt", model, args, "classify")
    loaded, _ = checkpoint.load(tmp_path / "m.pt")
    x = torch.randn(4, 5)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="arch mlp is registered already"):
        register_arch("mlp")(lambda args: MLP(**args))


def test_an_import_path_arch_needs_no_registration():
    builder = get_arch("torch.nn:Linear")
    assert "torch.nn:Linear" not in ARCHS
    with pytest.raises(UserError, match="the factory refused its arguments"):  # Linear takes no num_features=
        builder({"num_features": 4, "num_classes": 2, "kwargs": {}})


@pytest.mark.parametrize("arch", BUILTIN_ARCHS)
def test_a_checkpoint_of_every_builtin_arch_round_trips(tmp_path, arch):
    cfg = TeacherConfig(arch=arch, hidden=[8], channels=[4, 4], kernel_sizes=[2, 3], embedding_dim=8)
    tokens = TOKENS if arch == "textcnn" else None
    args = model_args(cfg, 12, 3, tokens=tokens)
    model = build_model(args).eval()
    checkpoint.save(tmp_path / "m.pt", model, args, "classify")
    loaded, ckpt = checkpoint.load(tmp_path / "m.pt")
    x = torch.randint(1, 30, (4, 12)) if tokens else torch.randn(4, 12)
    assert type(loaded) is type(model) and ckpt["model_args"] == args
    torch.testing.assert_close(loaded(x), model(x))


def test_a_transformer_checkpoint_round_trips_without_its_folder(tmp_path):
    from transformers import BertConfig

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16).to_dict()
    args = {"arch": pretrained.TRANSFORMER, "num_features": 12, "num_classes": 3, "config": config, **TOKENS}
    model = build_model(args).eval()
    assert isinstance(model, pretrained.TransformerClassifier)
    checkpoint.save(tmp_path / "t.pt", model, args, "classify")
    loaded, _ = checkpoint.load(tmp_path / "t.pt")
    x = torch.randint(1, 30, (4, 12))
    torch.testing.assert_close(loaded(x), model(x))


def test_a_torchscript_checkpoint_round_trips(tmp_path):
    net = MLP(6, 3, [8]).eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    args = {"arch": pretrained.TORCHSCRIPT, "num_features": 6, "num_classes": 3,
            "script": (tmp_path / "net.ts").read_bytes()}
    checkpoint.save(tmp_path / "t.pt", build_model(args), args, "classify")
    loaded, _ = checkpoint.load(tmp_path / "t.pt")
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), net(x))


def test_a_checkpoint_loads_in_a_process_that_imported_no_model_module(tmp_path):
    import subprocess
    import sys

    args = model_args(TeacherConfig(arch="mlp", hidden=[8]), 40, 10)
    checkpoint.save(tmp_path / "m.pt", build_model(args), args, "classify")
    code = "from distill import checkpoint; import sys; print(type(checkpoint.load(sys.argv[1])[0]).__name__)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "MLP", out.stderr
