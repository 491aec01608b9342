"""A third task, kept outside the library to show what a new task takes: regression on a table.

The teacher (a wide MLP) and the student (a narrow one) predict a number; the soft labels are
the teacher's predictions over train and a transfer set of unlabeled rows, stored as Parquet;
the student learns alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, label) and the
baseline the labels alone; evaluate scores test MSE. One file, the six methods of
distill.task.Task, named in params.yaml as `task: regression_task:RegressionTask`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from distill.config import BaseRegistryConfig, DistributedConfig, RuntimeConfig, Section, TrackingConfig
from distill.io import file_sha256, write_json, write_text
from distill.task import Headline


class DataSection(Section):
    """A smooth function of a few features, with noise; split into train, transfer, val and test."""

    rows: int = Field(600, gt=50, description="labelled rows (transfer: as many again, unlabelled)")
    features: int = Field(6, gt=0)
    noise: float = Field(0.1, ge=0)
    seed: int = 0


class ModelSection(Section):
    hidden: int = Field(64, gt=0)
    epochs: int = Field(40, gt=0)
    lr: float = Field(0.01, gt=0)


class StudentSection(ModelSection):
    hidden: int = Field(4, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the MSE to the teacher's predictions")


class Registry(BaseRegistryConfig):
    model_name: str = Field("regression-student", min_length=1)
    max_test_mse: float = Field(1.0, gt=0)


class RegressionParams(Section):
    """The whole params.yaml of the regression task."""

    task: Literal["regression_task:RegressionTask"]
    seed: int = 0
    data: DataSection = DataSection()
    teacher: ModelSection = ModelSection()
    soft_labels: Section = Section()
    student: StudentSection = StudentSection()
    evaluate: Section = Section()
    distributed: DistributedConfig = DistributedConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: Registry = Registry()


def split(prepared: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.read_parquet(prepared / f"{name}.parquet")
    return torch.tensor(frame.drop(columns="y").to_numpy(), dtype=torch.float32), torch.tensor(frame["y"].to_numpy())


def mlp(features: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).squeeze(1).double()


class RegressionTask:
    name: ClassVar[str] = "regression_task:RegressionTask"
    params_model: ClassVar[type] = RegressionParams
    distillation_keys: ClassVar[tuple[str, ...]] = ("alpha",)
    reports: ClassVar[dict[str, str]] = {"compare": "markdown comparison to write"}
    user_files: ClassVar[dict] = {}
    report_plots: ClassVar[dict] = {}
    pipeline_plots: ClassVar[list] = []
    headline: ClassVar[Headline] = Headline("test_mse", "MSE", " MSE", digits=4, lower_is_better=True)
    exp_metrics: ClassVar[tuple[str, ...]] = ()
    exp_params: ClassVar[tuple[str, ...]] = ("student.hidden", "student.alpha", "student.epochs", "seed")

    def check(self, params: RegressionParams) -> None:
        pass  # the data is generated: no file of the user's to look at

    def prepare(self, params: RegressionParams, out: Path, run: Any) -> dict:
        cfg = params.data
        rng = np.random.default_rng(cfg.seed)
        x = rng.normal(size=(2 * cfg.rows, cfg.features))
        y = np.sin(x[:, 0] * 2) + x[:, 1] ** 2 / 2 + cfg.noise * rng.normal(size=len(x))
        out.mkdir(parents=True)
        cuts = {"train": (0, cfg.rows // 2), "val": (cfg.rows // 2, 3 * cfg.rows // 4),
                "test": (3 * cfg.rows // 4, cfg.rows), "transfer": (cfg.rows, 2 * cfg.rows)}
        for name, (start, stop) in cuts.items():
            frame = pd.DataFrame(x[start:stop], columns=[f"x{i}" for i in range(cfg.features)])
            frame.assign(y=np.nan if name == "transfer" else y[start:stop]).to_parquet(out / f"{name}.parquet")
        run.log_metrics({f"rows_{name}": stop - start for name, (start, stop) in cuts.items()})
        return {"splits": {name: stop - start for name, (start, stop) in cuts.items()}}

    def train_teacher(self, params: RegressionParams, paths, world: Any, run: Any) -> dict:
        return self._fit(params, params.teacher, paths, run, None)

    def soft_labels(self, params: RegressionParams, teacher: Path, prepared: Path, out: Path, run: Any) -> dict:
        ckpt = torch.load(teacher, weights_only=False)
        model = mlp(ckpt["features"], ckpt["hidden"], 0)
        model.load_state_dict(ckpt["state"])
        x = torch.cat([split(prepared, "train")[0], split(prepared, "transfer")[0]])
        out.mkdir(parents=True)
        pd.DataFrame({"teacher": predict(model, x).numpy()}).to_parquet(out / "part-00000.parquet")
        sha = file_sha256(out / "part-00000.parquet")
        write_json(out / "provenance.json", {"teacher_run_id": ckpt["run_id"], "soft_labels_run_id": run.run_id,
                                             "soft_labels_sha256": sha})
        run.log_metrics({"rows": len(x)})
        return {"rows": len(x), "teacher_run_id": ckpt["run_id"], "teacher_sha256": file_sha256(teacher)}

    def train_student(self, params: RegressionParams, paths, world: Any, run: Any) -> dict:
        lineage = json.loads((paths.soft_labels / "provenance.json").read_text())
        targets = pd.read_parquet(paths.soft_labels / "part-00000.parquet")["teacher"].to_numpy()
        return self._fit(params, params.student, paths, run, torch.tensor(targets)) | {"soft_labels": lineage}

    def train_baseline(self, params: RegressionParams, paths, world: Any, run: Any) -> dict:
        return self._fit(params, params.student, paths, run, None)

    def _fit(self, params: RegressionParams, cfg: ModelSection, paths, run: Any, soft: torch.Tensor | None) -> dict:
        """Full-batch Adam on MSE to the labels (and to the teacher's predictions, over train + transfer)."""
        x, y = split(paths.prepared, "train")
        xv, yv = split(paths.prepared, "val")
        xt = torch.cat([x, split(paths.prepared, "transfer")[0]]) if soft is not None else x
        model = mlp(x.shape[1], cfg.hidden, params.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        history = []
        for epoch in range(cfg.epochs):
            opt.zero_grad()
            pred = model(xt).squeeze(1).double()
            loss = torch.mean((pred[:len(y)] - y) ** 2)
            if soft is not None:
                loss = cfg.alpha * torch.mean((pred - soft) ** 2) + (1 - cfg.alpha) * loss
            loss.backward()
            opt.step()
            history.append({"epoch": epoch + 1, "train_loss": loss.item(),
                            "val_mse": torch.mean((predict(model, xv) - yv) ** 2).item()})
        paths.model.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "features": x.shape[1], "hidden": cfg.hidden,
                    "run_id": run.run_id}, paths.model)
        paths.history.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(history).to_csv(paths.history, index=False)
        run.log_metrics({"val_mse": history[-1]["val_mse"]})
        return {"val_mse": history[-1]["val_mse"]}

    def evaluate(self, params: RegressionParams, paths, run: Any) -> dict:
        x, y = split(paths.prepared, "test")
        metrics, run_ids = {}, {}
        for role, path in paths.checkpoints.items():
            ckpt = torch.load(path, weights_only=False)
            model = mlp(ckpt["features"], ckpt["hidden"], 0)
            model.load_state_dict(ckpt["state"])
            metrics[role] = {"test_mse": torch.mean((predict(model, x) - y) ** 2).item()}
            run_ids[role] = ckpt["run_id"]
        t, s, b = (metrics[r]["test_mse"] for r in ("teacher", "student", "baseline"))
        metrics["gap_closed"] = (b - s) / (b - t) if b > t else None
        write_json(paths.outputs["metrics"], metrics)
        write_text(paths.outputs["compare"], "| model | test MSE |\n|---|---|\n"
                   + "".join(f"| {r} | {metrics[r]['test_mse']:.4f} |\n" for r in ("teacher", "student", "baseline")))
        run.log_metrics({f"{r}.test_mse": metrics[r]["test_mse"] for r in ("teacher", "student", "baseline")})
        return metrics | {"run_ids": run_ids, "passed": s <= params.registry.max_test_mse}
