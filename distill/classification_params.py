"""The classifier's params.yaml schema (task: classify): one typed, frozen section per key.

The sections a classifier's pipeline reads (data, teacher, soft_labels, student, evaluate,
resume, registry) and `Params`, its whole params.yaml, with the constants only a classifier
uses. The loader, the `Section` base and the sections every task shares (distributed,
runtime, tracking, the registry's shared keys) are distill/config.py's. Plumbing, like
config.py: params.yaml spells out every key, so no default here changes a result behind
DVC's back, and no stage lists this file in its code deps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distill.config import RAW_DIR, BaseRegistryConfig, DistributedConfig, RuntimeConfig, Section, TrackingConfig
from distill.registry import IMPORT_PATH

BUILTIN_ARCHS = ("mlp", "cnn1d", "textcnn")
AUTO_ARCH = "auto"  # the built-in arch that suits the data: cnn1d on a signal, mlp on a table, textcnn on text
Source = Literal["mnist1d", "digits", "synthetic", "parquet", "csv", "rotten_tomatoes"]


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
    splice_prob: float = Field(
        0.0, ge=0, le=1, description="augment: the copy is instead the start of its text joined to the end of "
        "another train text, each cut at a random word (neither masked nor cut to an n-gram)"
    )


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
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="pretrained: layer-wise learning-rate decay: the head learns at lr, the top "
        "layer at lr x layer_decay, each layer below at the one above's x layer_decay, the embeddings last; "
        "null = one lr for every layer"
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="pretrained: a text's vector for the head: mean = the mean of its token vectors "
        "(as sentence-transformers models were trained), cls = the first token's ([CLS], as BERT was)"
    )

    @model_validator(mode="after")
    def _model_for_source(self) -> TeacherConfig:
        if self.source != "train" and Path(self.model) == Path(RAW_DIR):
            raise ValueError(f"teacher.model is required when teacher.source is '{self.source}': set it to your "
                             + ("model folder (or minilm)" if self.source == "pretrained" else "checkpoint file"))
        if self.layer_decay is not None and self.source != "pretrained":
            raise ValueError(f"teacher.layer_decay is for teacher.source: pretrained (a transformer's layers); "
                             f"the source is '{self.source}': set it to null")
        if self.pooling != "mean" and self.source != "pretrained":
            raise ValueError(f"teacher.pooling is for teacher.source: pretrained (a transformer's token vectors); "
                             f"the source is '{self.source}': leave it at mean")
        return self


class StudentConfig(ModelTrainConfig):
    """The small model; the distillation keys (DISTILLATION_KEYS) are read by train_student only."""

    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    loss: Literal["kd", "dkd", "mse"] = Field(
        "kd", description="kd = Hinton et al. 2015; dkd = Zhao et al. 2022; mse = logit matching, Ba and Caruana 2014")
    dkd_target_weight: float = Field(1.0, ge=0, description="dkd: weight of the target-class term (TCKD)")
    dkd_nontarget_weight: float = Field(8.0, ge=0, description="dkd: weight of the non-target term (NCKD)")
    shuffle_buffer: int = Field(
        131072, gt=0, description="rows shuffled together when the training rows do not fit at once"
    )
    vocabulary: Literal["all", "used"] = Field(
        "all", description="textcnn: all = an embedding row per id of the tokenizer; used = a row per id that "
        "occurs in train and transfer, and one that every other id shares (distill/vocabulary.py)"
    )
    embedding_init: Literal["random", "teacher"] = Field(
        "random", description="textcnn: teacher = the rows start as the input embeddings of teacher.model (a "
        "Hugging Face folder), projected to embedding_dim by PCA; the baseline starts from the same"
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


class RegistryConfig(BaseRegistryConfig):
    """The quality gate a distilled student must pass to get the registry alias."""

    model_name: str = Field("distill-student", min_length=1)
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
