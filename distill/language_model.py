"""The language-model task: a causal LM distilled from per-token soft labels (task: language_model).

One implementation of distill.task.Task. Documents are split whole and cut into token windows
(distill/corpus.py); teacher and student are GPT-2s built from params or a Hugging Face
causal-LM folder (distill/lm.py), the student also from the teacher's own layers
(distill/lm_start.py), trained step by step; the soft labels are the teacher's next-token
targets at every position, top-k, sampled or dense (distill/lm_soft_labels.py,
distill/sparse.py; over the student's own tokens with data.cross_tokenizer,
distill/cross_tokenizer.py), which the student reads with one of distill/lm_losses.py's
divergences; models are scored in bits per token and per byte (distill/lm_evaluation.py).

Each method imports what its stage runs in its own body, so that a stage's DVC code deps are
its own import closure (distill/task.py says why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from distill.corpus import VIEW_FILES
from distill.lm_params import LM_DISTILLATION_KEYS, LMParams
from distill.task import ROLES, EvaluatePaths, Headline, TrainPaths

STUDENT_START = "the student's start: a pretrained folder or a teacher checkpoint (data/raw when trained here)"


class LanguageModelTask:
    """Causal language models: the teacher's next-token distributions are the soft labels."""

    name: ClassVar[str] = "language_model"
    params_model: ClassVar[type] = LMParams
    distillation_keys: ClassVar[tuple[str, ...]] = LM_DISTILLATION_KEYS
    reports: ClassVar[dict[str, str]] = {
        "compare": "markdown comparison and samples to write", "report": "HTML report to write",
        "figures": "directory of the report's PNG figures", "curves": "directory of each model's val curve CSV"}
    user_files: ClassVar[dict[str, list[tuple[str, str]]]] = {
        "prepare": [("${data.path}", "your text (data/raw, the folder, for the built-in corpus)"),
                    ("${data.tokenizer}", "a tokenizer folder (data/raw when a BPE is trained here)"),
                    ("${data.student_tokenizer}", "the student's own tokenizer folder (data/raw: trained here, "
                     "or no cross_tokenizer)")],
        "train_teacher": [("${teacher.model}", "a pretrained folder (data/raw when trained here)")],
        "train_student": [("${student.model}", STUDENT_START)], "train_baseline": [("${student.model}", STUDENT_START)]}
    # the teacher's view of data/prepared, without the student's own (data/prepared/student): a
    # change of the student's tokenizer reruns prepare, and train_teacher only if these change
    teacher_prepared: ClassVar[tuple[str, ...] | None] = VIEW_FILES
    report_plots: ClassVar[dict[str, dict]] = {"figures": {}}
    pipeline_plots: ClassVar[list[dict]] = [
        {"Validation bits per token by step": {
            "x": "step", "y": {f"reports/curves/{role}.csv": "val_bits_per_token"
                               for role in ("teacher", "student", "baseline")}}}]
    headline: ClassVar[Headline] = Headline("test_bits_per_token", "bits/token", " bits/token", digits=3,
                                            lower_is_better=True)
    exp_metrics: ClassVar[tuple[str, ...]] = ("test_bits_per_byte", "params", "latency_ms_b1")
    exp_params: ClassVar[tuple[str, ...]] = ("student.temperature", "student.alpha", "student.steps", "student.tail",
                                             "student.loss", "teacher.steps", "soft_labels.targets",
                                             "soft_labels.top_k", "soft_labels.samples", "seed")

    def check(self, params: LMParams) -> None:
        from distill import corpus, lm, lm_start, text
        from distill.config import RAW_DIR

        corpus.load_documents(params.data)  # the corpus is there and has text
        given = Path(params.data.tokenizer) != Path(RAW_DIR)  # else a BPE trained by prepare, not known yet
        if given:  # as prepare_corpus tells a given tokenizer
            corpus.given_tokenizer(params.data.tokenizer)
        if params.data.cross_tokenizer and Path(params.data.student_tokenizer) != Path(RAW_DIR):
            corpus.given_tokenizer(params.data.student_tokenizer)
        for key, cfg in (("teacher.model", params.teacher), ("student.model", params.student)):
            if cfg.source != "pretrained":
                continue
            folder = text.model_folder(cfg.model, key)
            own = key == "student.model" and params.data.cross_tokenizer  # the student reads its own tokens
            tokens = params.data.student_tokenizer if own else params.data.tokenizer
            if Path(tokens) != Path(RAW_DIR):  # a given tokenizer, its files copied: the folder's must be it
                lm.same_tokenizer(folder, text.tokenizer_sha256(folder), text.tokenizer_sha256(tokens), key)
        if params.student.source == "teacher_layers":
            lm_start.check_teacher_layers(params.student, params.teacher)

    def prepare(self, params: LMParams, out: Path, run: Any) -> dict:
        from distill import corpus

        meta = corpus.prepare_corpus(params.data, out)
        run.log_metrics({f"{key}_{split}": n for split, counts in meta.splits.items() for key, n in counts.items()}
                        | {"vocab_size": meta.vocab_size})
        return {"vocab_size": meta.vocab_size, "splits": meta.splits}

    def train_teacher(self, params: LMParams, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import corpus, lm
        from distill.io import tree_sha256

        teacher = params.teacher
        meta = corpus.read_corpus_meta(paths.prepared)
        model = lm.pretrained(teacher.model, meta) if teacher.source == "pretrained" else lm.gpt2(teacher, meta,
                                                                                                 params.seed)
        job = lm.LMJob(teacher, params.seed, "teacher", world=world, precision=params.runtime.precision,
                       on_eval=run.log_score)
        from_folder = teacher.source == "pretrained" and teacher.steps and params.resume.every_steps
        start = {"model_sha256": tree_sha256(teacher.model)} if from_folder else {}
        job = lm.resumable(job, params.resume, meta, source=teacher.source, **start)
        out = self._fit(model, job, paths, meta, {"source": teacher.source}, run)
        self._log_training(run, out, paths.model)
        return out

    def soft_labels(self, params: LMParams, teacher: Path, prepared: Path, out: Path, run: Any) -> dict:
        from distill import device, lm_soft_labels

        where = device.resolve(params.runtime)
        result = lm_soft_labels.dump_targets(teacher, prepared, out, params.soft_labels, run_id=run.run_id,
                                             device=where, precision=params.runtime.precision)
        run.log_metrics({"windows": result["rows"], "bytes": result["bytes"], "shards": len(result["shards"]),
                         "bytes_per_token": result["bytes_per_token"]} | result.get("summary", {}))
        return result

    def train_student(self, params: LMParams, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import corpus, lm, lm_soft_labels, lm_start

        student = params.student
        teacher = corpus.read_corpus_meta(paths.prepared)
        meta = corpus.read_corpus_meta(corpus.student_view(paths.prepared))  # the student's own tokens
        model, start = lm_start.start(student, meta, params.seed)
        soft = lm_soft_labels.SoftLabelSet(paths.soft_labels, meta, lm.vocab_of(model), teacher)
        lineage = lm_soft_labels.lineage(soft)
        job = lm.LMJob(student, params.seed, "student", distill=student, world=world,
                       precision=params.runtime.precision, on_eval=run.log_score)
        job = lm.resumable(job, params.resume, meta, soft_labels=lineage["soft_labels_sha256"], **start)
        out = self._fit(model, job, paths, meta, {"soft_labels": lineage} | start, run, soft)
        self._log_training(run, out, paths.model, self.served(out["model"]), out["example"])
        return out | {"soft_labels": lineage}

    def train_baseline(self, params: LMParams, paths: TrainPaths, world: Any, run: Any) -> dict:
        from distill import corpus, lm, lm_start

        meta = corpus.read_corpus_meta(corpus.student_view(paths.prepared))  # the student's own tokens
        model, start = lm_start.start(params.student, meta, params.seed)  # the student's own start
        job = lm.LMJob(params.student, params.seed, "baseline", world=world, precision=params.runtime.precision,
                       on_eval=run.log_score)
        job = lm.resumable(job, params.resume, meta, **start)
        out = self._fit(model, job, paths, meta, start, run)
        self._log_training(run, out, paths.model)
        return out

    def _log_training(self, run: Any, result: dict, checkpoint: Path, model: Any = None, example: Any = None) -> None:
        """A training's final metrics and checkpoint artifact; with `model` and `example` (the student,
        which the registry serves: ids -> next-token logits) also an MLflow model."""
        run.log_metrics({k: result[k] for k in ("best_step", "best_val_bits_per_token", "parameters",
                                                "train_seconds")})
        run.log_artifact(str(checkpoint), "checkpoint")
        if model is not None:
            run.log_model(model, example, str(checkpoint))

    def _fit(self, model: Any, job: Any, paths: TrainPaths, meta: Any, info: dict, run: Any, soft: Any = None) -> dict:
        """Train `model` on the train windows (and `soft` targets), keep the best on val, save it; the
        summary carries two val windows as the logged model's input example."""
        from distill import corpus, lm

        buffer = job.distill.shuffle_buffer if soft is not None else 0
        batches = lm.WindowBatches(corpus.read_windows(meta.path, "train"), job.cfg.batch_size, job.world,
                                   soft, buffer)
        val = corpus.read_windows(meta.path, "val")
        result = lm.train(model, job, batches, val)
        info = {"mlflow_run_id": run.run_id} | info
        return lm.save_result(result, job, paths.model, paths.history, meta, info) | {"example": val[:2]}

    def evaluate(self, params: LMParams, paths: EvaluatePaths, run: Any) -> dict:
        from distill import device, lm_evaluation

        result = lm_evaluation.evaluate_lm(params.evaluate, paths.prepared, paths.checkpoints,
                                           device.resolve(params.runtime))
        lm_evaluation.write_lm_outputs(result, paths.outputs)
        gaps = {k: result.metrics[k] for k in ("gap_closed", "gap_closed_bits_per_byte")
                if result.metrics[k] is not None}  # None: the teacher is not better, so nothing to close
        run.log_metrics({f"{m}.{k}": v for m in ROLES for k, v in result.metrics[m].items()
                         if isinstance(v, (int, float))} | gaps)
        for path in paths.outputs.values():
            run.log_artifact(Path(path))
        passed = lm_evaluation.lm_passes_gate(result.metrics["student"], params.registry)
        return result.metrics | {"run_ids": result.run_ids, "passed": passed}

    def served(self, model: Any) -> Any:
        """A causal LM is served as token ids -> next-token logits."""
        from distill import lm

        return lm.NextTokenLogits(model).eval()
