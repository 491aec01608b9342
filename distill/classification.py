"""The classification task: tables, signals and text into classes (task: classify).

One implementation of distill.task.Task. Data are prepared into Parquet splits (distill/data.py),
models are the built-in or the user's architectures, a pretrained Hugging Face encoder or a
checkpoint (distill/models.py, distill/pretrained.py), trained epoch by epoch on labels or on
the teacher's stored logits (distill/training.py, distill/losses.py), whose soft labels are raw
logits per row (distill/softlabels.py), scored by accuracy, NLL, calibration and agreement
(distill/evaluation.py) and reported in distill/report.py.

Each method imports what its stage runs in its own body, so that a stage's DVC code deps are
its own import closure (distill/task.py says why).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from distill.classification_params import DISTILLATION_KEYS, Params
from distill.task import EvaluatePaths, Headline, TrainPaths

log = logging.getLogger(__name__)


class ClassificationTask:
    """Classifiers over vectors, signals and text: the teacher's logits are the soft labels."""

    name: ClassVar[str] = "classify"
    params_model: ClassVar[type] = Params
    distillation_keys: ClassVar[tuple[str, ...]] = DISTILLATION_KEYS
    reports: ClassVar[dict[str, str]] = {
        "compare": "markdown comparison to write", "predictions": "per-example predictions CSV to write",
        "reliability": "directory of reliability-diagram CSVs", "report": "HTML report to write",
        "figures": "directory of the report's PNG figures",
        "curves": "directory of each model's per-epoch CSV (plot data)"}
    user_files: ClassVar[dict[str, list[tuple[str, str]]]] = {
        "prepare": [("${data.path}", "your data file (data/raw, the folder, when the source generates its data)"),
                    ("${data.transfer_path}", "your file of unlabeled rows (data/raw when none)"),
                    ("${data.text.tokenizer}", "text: the tokenizer folder (data/raw when the data is not text)")],
        "train_teacher": [("${teacher.model}", "a pretrained folder or checkpoint file (data/raw when trained here)")],
        "train_student": [("${teacher.model}", "the teacher's folder: student.embedding_init teacher reads its embeddings")],
        "train_baseline": [("${teacher.model}", "the teacher's folder: student.embedding_init teacher reads its embeddings")]}
    # dvc.yaml's plots: report files drawn by `dvc plots show`, and the curves across models
    teacher_prepared: ClassVar[tuple[str, ...] | None] = None  # the teacher reads all of data/prepared
    report_plots: ClassVar[dict[str, dict]] = {"predictions": {"template": "confusion", "x": "actual", "y": "student"},
                                               "figures": {}}
    pipeline_plots: ClassVar[list[dict]] = [
        {"Validation accuracy by optimizer step": {
            "template": "by_model",  # .dvc/plots/by_model.json: a colour per model, a dash per git revision
            "x": "step", "y": {f"reports/curves/{role}.csv": "val_accuracy" for role in ("teacher", "student", "baseline")}}},
        {"Reliability diagram (test)": {
            "x": "confidence", "y": {f"reports/reliability/{role}.csv": "accuracy"
                                     for role in ("teacher", "student", "baseline")}}}]
    headline: ClassVar[Headline] = Headline("test_accuracy", "acc", "%", scale=100, digits=2)
    exp_metrics: ClassVar[tuple[str, ...]] = ("params", "latency_ms_b1")
    exp_params: ClassVar[tuple[str, ...]] = ("student.arch", "student.temperature", "student.alpha", "student.loss",
                                             "student.epochs", "teacher.arch", "teacher.epochs", "soft_labels.top_k",
                                             "seed")

    def check(self, params: Params) -> None:
        from distill import pretrained, sources, text, vocabulary

        sources.check_table(params.data)
        vocabulary.check(params.student, params.teacher)
        if params.data.text_column is not None:
            text.load_tokenizer(params.data.text.tokenizer)
        teacher = params.teacher
        if teacher.source == "pretrained":
            text.model_folder(teacher.model, "teacher.model")
        elif teacher.source == "checkpoint":
            pretrained.user_checkpoint(teacher.model)

    def prepare(self, params: Params, out: Path, run: Any) -> dict:
        from distill import data

        summary = data.prepare(params.data, out).summary()
        run.log_metrics({f"rows_{split}": n for split, n in summary["splits"].items()}
                        | {"num_classes": summary["num_classes"], "num_features": summary["num_features"]})
        return summary

    def train_teacher(self, params: Params, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import data, pretrained, training
        from distill.errors import UserError

        teacher = params.teacher
        job, out = self._job(params, "teacher", paths, world, run)
        if teacher.source == "checkpoint":
            meta = data.read_meta(paths.prepared)
            model, model_args, info = pretrained.load_user_checkpoint(teacher.model, meta.num_features,
                                                                      meta.num_classes, meta.tokens, meta.class_names)
            record = pretrained.source_record(teacher.model)
            run.set_tags({"distill.teacher_source": "checkpoint",
                          "distill.teacher_source_sha256": record["teacher_source_sha256"]})
            source_info = {k: v for k, v in info.items() if k != "history"}
            result = training.use_as_is(model, model_args, job, paths.prepared, out, record | {"source_info": source_info})
            warning = pretrained.chance_warning(result["best_val_accuracy"], data.read_split(paths.prepared, "val").y,
                                                meta.class_names, data.standardized(paths.prepared))
            if warning and world.is_main:
                log.warning(warning)
        else:
            def from_folder(meta):
                if meta.tokens is None:
                    raise UserError(f"teacher.source pretrained reads text; data.source '{params.data.source}' is "
                                    "not text (set data.text_column, or use teacher.source: train)")
                return pretrained.load_pretrained(teacher.model, meta.num_classes, meta.tokens, meta.num_features,
                                                  teacher.trainable_layers, teacher.pooling)

            start = from_folder if teacher.source == "pretrained" else None
            result = training.train_on_labels(job, paths.prepared, out, params.resume, start=start)
        self._log_training(run, result, paths.model)
        return result

    def soft_labels(self, params: Params, teacher: Path, prepared: Path, out: Path, run: Any) -> dict:
        from distill import device, softlabels

        where = device.resolve(params.runtime)  # a device that is not there: one sentence, before any work
        result = softlabels.dump(teacher, prepared, out, params.soft_labels, run_id=run.run_id,
                                 device=where, precision=params.runtime.precision)
        run.log_metrics({"rows": result["rows"], "bytes": result["bytes"], "shards": len(result["shards"]),
                         "bytes_per_row": result["bytes"] / max(result["rows"], 1)})
        return result

    def train_student(self, params: Params, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import training

        job, out = self._job(params, "student", paths, world, run)
        result = training.train_student(job, paths.prepared, paths.soft_labels, out, params.resume,
                                        start=self._student_start(params, paths.prepared))
        text = self._served_text(params, paths.prepared)
        self._log_training(run, result, paths.model, mlflow_model=text is not None, text=text or None)
        return result

    def train_baseline(self, params: Params, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import training

        job, out = self._job(params, "baseline", paths, world, run)
        result = training.train_on_labels(job, paths.prepared, out, params.resume,
                                          start=self._student_start(params, paths.prepared), student_budget=True)
        self._log_training(run, result, paths.model)
        return result

    def _student_start(self, params: Params, prepared: Path):
        """The student's and the baseline's one starting point (their vocabulary and first embeddings)."""
        from distill import vocabulary

        return vocabulary.student_start(params.student, params.teacher, prepared)

    def _log_training(self, run: Any, result: dict, checkpoint: Path, mlflow_model: bool = False,
                      text: dict | None = None) -> None:
        """A training's final metrics, and its checkpoint file as an artifact. With `mlflow_model`
        (the student, which the registry serves) the model is also logged as an MLflow model
        (torch.export, about 3 s; on text with the tokenizer, `text`); the teacher and the baseline
        are compared by their metrics and keep only the checkpoint."""
        steps = result["history"][-1].get("step", 0) if result["history"] else 0  # the baseline's: the student's
        run.log_metrics({k: result[k] for k in ("best_val_accuracy", "best_epoch", "parameters")} | {"steps": steps})
        run.log_artifact(str(checkpoint), "checkpoint")
        if mlflow_model:
            run.log_model(result["model"], result["example"], str(checkpoint), text=text)

    def _served_text(self, params: Params, prepared: Path) -> dict | None:
        """What the served student reads raw text with (tracking.StageRun.log_model): the tokenizer
        folder prepare used (the same files: meta.json has their hash), max_length, pad_id and the
        class names. {} on features (nothing to add); None when the folder changed since prepare
        (then no served model: it would read the text with other ids)."""
        from distill import data, text

        meta = data.read_meta(prepared)
        if meta.tokens is None:
            return {}
        folder = text.resolve_folder(params.data.text.tokenizer).resolve()
        if text.tokenizer_sha256(folder) != meta.tokens["tokenizer_sha256"]:
            log.warning("train_student: the MLflow model is not logged: %s is not the tokenizer prepare used (its "
                        "files changed since); rerun prepare", folder)
            return None
        return {"tokenizer": str(folder), "max_length": meta.tokens["max_length"], "pad_id": meta.tokens["pad_id"],
                "class_names": list(meta.class_names)}

    def _job(self, params: Params, role: str, paths: TrainPaths, world: Any, run: Any) -> tuple:
        """The training job of `role` (its config, seed, ranks, precision) and where it writes."""
        from distill import training

        cfg = params.teacher if role == "teacher" else params.student
        job = training.TrainJob(cfg, params.seed, role, on_epoch=run.log_score, world=world,
                                precision=params.runtime.precision)
        return job, training.Outputs(paths.model, paths.history, {"mlflow_run_id": run.run_id})

    def evaluate(self, params: Params, paths: EvaluatePaths, run: Any) -> dict:
        from distill import device, evaluation, report
        from distill.io import write_text

        out = paths.outputs
        result = evaluation.evaluate(params.evaluate, paths.prepared, paths.checkpoints, device.resolve(params.runtime))
        evaluation.write_outputs(result, out["metrics"], out["predictions"], out["reliability"], out["curves"])
        write_text(out["compare"], report.compare_table(result.metrics))
        report.write_report(result, out["report"], out["figures"])
        self._log_evaluation(run, result, [Path(p) for p in out.values()])
        passed = evaluation.passes_gate(result.metrics["student"], params.registry)
        return result.metrics | {"run_ids": result.run_ids, "passed": passed}

    def _log_evaluation(self, run: Any, result: Any, artifacts: list[Path]) -> None:
        """One child run per model (an evaluation.Evaluation's metrics under the same keys, the accuracy's
        interval as test_accuracy_ci95_low / _high, and the model's own config as params, so MLflow's
        compare view lines up arch, widths, temperature and alpha beside the numbers), on text one for
        the reference too; on the stage run the gap closed, and the test split and paired comparisons
        flattened (student_vs_baseline.p_value, test_split.majority_rate...); the report files as artifacts."""
        for role, model_run in result.run_ids.items():
            config = dict(result.configs.get(role, {}))
            if role == "baseline":  # the student's config (min_steps: the student's steps), no distillation key
                config = {k: v for k, v in config.items() if k not in self.distillation_keys}
            run.log_child(f"evaluate {role}", {"role": role} | config, result.metrics[role],
                          {"distill.model_role": role, "distill.model_run_id": model_run})
        if "reference" in result.metrics:  # no training run of its own: fitted in this stage
            run.log_child("evaluate reference", {"role": "reference"} | result.configs.get("reference", {}),
                          result.metrics["reference"], {"distill.model_role": "reference"})
        if result.metrics.get("gap_closed") is not None:
            run.log_metrics({"gap_closed": result.metrics["gap_closed"]})
        models = {*result.run_ids, "reference"}
        noise = {f"{key}.{name}": value for key, values in result.metrics.items()
                 if key not in models and isinstance(values, dict) for name, value in values.items()}
        if noise:
            run.log_metrics(noise)  # numbers only: the majority class's name and one_class stay in metrics.json
        for path in artifacts:
            run.log_artifact(path)

    def served(self, model: Any) -> Any:
        """A classifier is served as it is: features or token ids -> logits."""
        return model
