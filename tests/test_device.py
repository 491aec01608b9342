"""runtime.device and runtime.precision: the device choice and its errors, mixed precision on
the CPU, checkpoints that load on a CPU whatever trained them; CUDA checks carry `gpu`."""

import subprocess

import pytest
import torch

from conftest import BIN, tiny_params, write_params
from distill import data, device, training
from distill.classification_params import StudentConfig
from distill.config import RuntimeConfig, load_params
from distill.errors import UserError
from distill import checkpoint
from distill.models import predict_logits

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


def test_auto_is_cuda_where_there_is_one_and_the_cpu_elsewhere():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.resolve(RuntimeConfig(device="auto")).type == expected
    assert device.resolve(RuntimeConfig(device="cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_asked_for_on_a_machine_without_it_is_one_sentence(name):
    with pytest.raises(UserError, match=f"runtime.device is '{name}' but torch sees no CUDA device here"):
        device.resolve(RuntimeConfig(device=name))


def test_fp16_on_the_cpu_is_refused_and_a_bad_device_name_is_a_validation_error():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        device.resolve(RuntimeConfig(device="cpu", precision="fp16"))
    with pytest.raises(ValueError, match="must be auto, cpu, cuda, cuda:N or mps"):
        RuntimeConfig(device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_a_stage_asked_for_cuda_without_it_exits_2_in_one_line_before_any_work(project):
    write_params(project / "params.yaml", tiny_params(**{"runtime.device": "cuda"}))
    subprocess.run([str(BIN / "python"), "-m", "stages.prepare", "--out", "data/prepared"], cwd=project, check=True,
                   capture_output=True)
    result = subprocess.run([str(BIN / "python"), "-m", "stages.train_teacher", "--prepared", "data/prepared",
                             "--model", "models/teacher.pt", "--history", "t.csv"], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA device" in result.stderr
    assert not (project / "models/teacher.pt").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from distill.classification_params import DataConfig

    out = tmp_path_factory.mktemp("device") / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=600, transfer_size=0,
                            synthetic={"n_features": 12, "n_classes": 3, "hidden": 8}), out)
    return out


def _train(prepared, tmp_path, where: torch.device, precision: str) -> tuple[dict, torch.nn.Module]:
    cfg = StudentConfig(arch="mlp", hidden=[32], epochs=6, batch_size=32, lr=0.01)
    job = training.TrainJob(cfg, 0, "m", world=training.World(device=where), precision=precision)
    result = training.train_on_labels(job, prepared, training.Outputs(tmp_path / "m.pt", tmp_path / "m.csv"))
    return result, checkpoint.load(tmp_path / "m.pt")[0]


def test_bf16_autocast_on_the_cpu_trains_and_the_checkpoint_is_float32_and_predicts(prepared, tmp_path):
    result, model = _train(prepared, tmp_path, torch.device("cpu"), "bf16")
    assert result["best_val_accuracy"] > 0.6  # 3 classes: chance is a third
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    test = data.read_split(prepared, "test")
    accuracy = (predict_logits(model, torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean()
    assert accuracy > 0.6
    (tmp_path / "fp32").mkdir()
    fp32, _ = _train(prepared, tmp_path / "fp32", torch.device("cpu"), "fp32")
    assert fp32["history"] != result["history"]  # bf16 really ran: its numbers differ from fp32's


def test_the_committed_params_run_on_the_cpu_at_fp32_with_device_auto():
    params = load_params("params.yaml")
    assert params.runtime.device == "auto" and params.runtime.precision == "fp32"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_saves_a_checkpoint_that_loads_and_predicts_on_the_cpu(prepared, tmp_path, precision):
    result, model = _train(prepared, tmp_path, torch.device("cuda"), precision)
    assert result["best_val_accuracy"] > 0.6
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    state = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(t.device.type == "cpu" for t in state.values())


@pytest.mark.gpu
@needs_cuda
def test_soft_labels_on_cuda_match_the_cpu_ones(prepared, tmp_path):
    from distill import softlabels
    from distill.classification_params import SoftLabelsConfig

    _train(prepared, tmp_path, torch.device("cpu"), "fp32")
    cfg = SoftLabelsConfig()
    cpu = softlabels.dump(tmp_path / "m.pt", prepared, tmp_path / "cpu", cfg)
    gpu = softlabels.dump(tmp_path / "m.pt", prepared, tmp_path / "gpu", cfg, device=torch.device("cuda"))
    assert cpu["rows"] == gpu["rows"]
    import numpy as np
    import pyarrow.parquet as pq

    def logits(folder):
        return np.stack(pq.read_table(folder / "part-00000.parquet").column("logits").to_numpy(zero_copy_only=False))

    assert np.allclose(logits(tmp_path / "cpu"), logits(tmp_path / "gpu"), atol=1e-3)


def test_torchrun_backend_and_process_count_follow_the_device():
    from distill import distributed
    from distill.config import DistributedConfig

    auto = DistributedConfig(backend="auto", nproc="auto")
    assert distributed.backend(auto, torch.device("cpu")) == "gloo"
    # nccl for the CUDA tensors, gloo beside it for the few CPU ones the loop all-reduces
    assert distributed.backend(auto, torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    with pytest.raises(UserError, match="nccl needs training on CUDA"):
        distributed.backend(DistributedConfig(backend="nccl"), torch.device("cpu"))
    assert distributed.processes(auto, torch.device("cpu")) == 1
    assert distributed.processes(DistributedConfig(nproc=3), torch.device("cpu")) == 3
