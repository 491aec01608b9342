"""Teachers that are not trained from scratch: a pretrained Hugging Face encoder fine-tuned
with a classification head (`teacher.source: pretrained`), or the user's own trained model
used as it is (`teacher.source: checkpoint`).

`TransformerClassifier` is an encoder (any `transformers.AutoModel`: BERT, MiniLM, ...)
whose last hidden states are pooled (the mean over the real tokens, or the first token's vector:
`teacher.pooling`) and fed to a linear head. Its
checkpoint stores the encoder's config with the weights, so it rebuilds without the
original folder (`models.build_model`, arch `transformer`, which this module registers
with `torchscript`: importing it is what lets a checkpoint of either load). Loading is
local only: a folder on disk, never a download.

A `checkpoint` teacher is a file: this pipeline's checkpoint (models/teacher.pt of
another run; an import-path arch in its model_args works), a dict with `arch`
(package.module:factory), `arch_kwargs` and `state_dict`, or a TorchScript file. It is
checked on a dummy batch and stored self-contained in models/teacher.pt (TorchScript as
its bytes), with the file's sha256. It reads the prepared features, standardised when
data.standardize is true; scored near chance on val, the log says so (`chance_warning`).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill import text
from distill.errors import UserError
from distill.io import file_sha256
from distill.checkpoint import build_model, register_arch, upgraded
from distill.models import check_model, padding_mask

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"  # a Hugging Face encoder with a head; made by teacher.source pretrained
TORCHSCRIPT = "torchscript"  # a user's TorchScript teacher, its bytes in model_args["script"]


class TransformerClassifier(nn.Module):
    """A Hugging Face encoder, pooling (the mean over the real tokens, or the first token's vector),
    dropout, a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int, pooling: str = "mean"):
        super().__init__()
        self.encoder, self.pad_id, self.pooling = encoder, pad_id, pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(hidden, num_classes)
        for name, p in self.encoder.named_parameters():
            if name.startswith("pooler."):  # the encoder's own pooler (BERT's tanh over [CLS]) is not used
                p.requires_grad_(False)

    @staticmethod
    @register_arch(TRANSFORMER)
    def from_args(args: dict[str, Any]) -> TransformerClassifier:
        """An untrained model of a checkpoint's model_args (the encoder built from its stored config)."""
        from transformers import AutoConfig, AutoModel

        config = dict(args["config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        return TransformerClassifier(AutoModel.from_config(config), args["num_classes"], args["pad_id"],
                                     args.get("pooling", "mean"))  # checkpoints before teacher.pooling: mean

    def param_groups(self, lr: float, decay: float) -> list[dict]:
        """AdamW's parameter groups under layer-wise learning-rate decay: the head at `lr`, the encoder's
        top layer at lr x decay, each layer below at the one above's x decay, and whatever of the encoder
        is outside its layers (the embeddings; a relative-position table, say) at the bottom layer's x
        decay. Frozen parameters are left out."""
        layers = list(_layer_list(self.encoder, "teacher.layer_decay"))
        depth = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
        top = len(layers) + 1
        groups: dict[int, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                d = top if name.startswith("head.") else depth.get(id(p), 0)
                groups.setdefault(d, []).append(p)
        rates = [(d, lr * decay ** (top - d)) for d in sorted(groups)]
        log.info("teacher: layer-wise lr decay %g: %s", decay, ", ".join(
            f"{'the head' if d == top else 'the embeddings' if d == 0 else f'layer {d}'} {r:.3g}" for d, r in rates))
        return [{"params": groups[d], "lr": r} for d, r in rates]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mask = padding_mask(ids, self.pad_id)
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, L, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # the tokenizer's first token: [CLS] for BERT-like encoders
        else:
            weights = mask.unsqueeze(2).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))  # (N, H) -> (N, C)


def load_encoder(folder: Path, part: str = "model"):
    """The Hugging Face encoder in `folder` (AutoModel; `part` "config": its AutoConfig), local files
    only, or one sentence saying why it does not load."""
    from transformers import AutoConfig, AutoModel

    try:
        return (AutoConfig if part == "config" else AutoModel).from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UserError(f"{folder}: the model does not load ({type(exc).__name__}: {exc})") from None


def load_pretrained(name: str, num_classes: int, tokens: dict, max_length: int,
                    trainable_layers: int | None = None, pooling: str = "mean") -> tuple[nn.Module, dict]:
    """The folder's encoder with a new head for `num_classes`, and its model_args. Refuses a folder
    without config or weights, a tokenizer other than the one that made the data, and a folder
    that is already a classifier of another number of labels. `trainable_layers`: only the top N
    layers (and the head) learn; embeddings and lower layers are frozen. `pooling`: mean or cls (teacher.pooling)."""
    folder = text.model_folder(name, "teacher.model")
    if text.tokenizer_sha256(folder) != tokens["tokenizer_sha256"]:
        raise UserError(f"{folder}: its tokenizer (sha256 {text.tokenizer_sha256(folder)[:12]}) is not the one that "
                        f"made the prepared data ({tokens['tokenizer_sha256'][:12]}); set data.text.tokenizer to "
                        "the teacher's folder")
    config = load_encoder(folder, "config")
    labels = getattr(config, "num_labels", None)
    classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if classifier and labels != num_classes:
        raise UserError(f"{folder}: a classifier of {labels} labels; the data has {num_classes} classes. Use "
                        "its encoder folder, or data with as many classes")
    encoder = load_encoder(folder)
    if encoder.config.vocab_size < tokens["vocab_size"]:
        raise UserError(f"{folder}: the model knows {encoder.config.vocab_size} tokens, the tokenizer "
                        f"{tokens['vocab_size']}; they are not a pair")
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UserError(f"data.text.max_length = {max_length} is not allowed: {folder} reads at most {positions} "
                        "tokens; use a smaller max_length")
    model = TransformerClassifier(encoder, num_classes, tokens["pad_id"], pooling)
    if trainable_layers is not None:
        freeze_below(model, trainable_layers)
    config = encoder.config.to_dict()
    config.pop("architectures", None)
    args = {"arch": TRANSFORMER, "num_features": max_length, "num_classes": num_classes, "config": config,
            "pad_id": tokens["pad_id"], "vocab_size": tokens["vocab_size"], "pooling": pooling}
    check_model(model, max_length, num_classes, str(folder), tokens)
    return model, args


def freeze_below(model: TransformerClassifier, trainable: int) -> None:
    """Freeze the encoder except its top `trainable` layers (the head always learns)."""
    layers = _layer_list(model.encoder)
    if trainable > len(layers):
        raise UserError(f"teacher.trainable_layers = {trainable} is not allowed: the model has {len(layers)} layers; "
                        "use at most that many, or null for every layer and the embeddings")
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - trainable:] if trainable else []:
        for p in layer.parameters():
            p.requires_grad_(True)
    learning = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("teacher: top %d of %d layers and the head fine-tuned (%d parameters learn)", trainable, len(layers),
             learning)


def _layer_list(encoder: nn.Module, key: str = "teacher.trainable_layers") -> nn.ModuleList:
    """The encoder's stack of transformer layers (the ModuleList as long as config.num_hidden_layers);
    `key`, the setting that needs them, is named in the refusal of an encoder without such a stack
    (ALBERT, whose layers share their weights, say)."""
    count = encoder.config.num_hidden_layers
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"{key} needs the teacher's {count} layers apart, and this {type(encoder).__name__} has no "
                    f"stack of {count} (its layers may share weights): set {key}: null")


# ---------------------------------------------------------------- a checkpoint teacher


def user_checkpoint(path: str | Path) -> Path:
    """The user's teacher file (teacher.model), refused in one sentence when it is not there."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: teacher checkpoint not found; set teacher.model to your model file")
    return path


def load_user_checkpoint(path: str | Path, num_features: int, num_classes: int, tokens: dict | None = None,
                         class_names: list[str] | None = None) -> tuple[nn.Module, dict, dict]:
    """The user's trained model: (model in eval mode, model_args that rebuild it, what the file
    says of itself), checked on a dummy batch of the prepared data's shape."""
    path = user_checkpoint(path)
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not TorchScript: a state dict checkpoint
        scripted = None
    if scripted is not None:
        args = {"arch": TORCHSCRIPT, "num_features": num_features, "num_classes": num_classes,
                "script": path.read_bytes()}
        model, info = scripted, {}
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a foreign file
            raise UserError(f"{path}: neither TorchScript nor a readable checkpoint ({type(exc).__name__})") from None
        args, state, info = _checkpoint_parts(path, ckpt, num_features, num_classes, tokens)
        model = build_model(args)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"{path}: its weights do not fit its arch {args['arch']} ({first})") from None
    check_model(model, num_features, num_classes, str(path), tokens)
    if class_names and info.get("class_names") not in (None, class_names):
        raise UserError(f"{path}: the teacher's classes are {info['class_names']}, the data's {class_names}; "
                        "its outputs would be read as the wrong classes")
    return model.eval(), args, info


def _checkpoint_parts(path: Path, ckpt: Any, num_features: int, num_classes: int,
                      tokens: dict | None) -> tuple[dict, dict, dict]:
    ours = upgraded(ckpt)  # a checkpoint of this pipeline's (another project's classifier, say)
    if ours is not None and ours["task"] == "classify":
        ckpt, args = ours, ours["model_args"]
        for key in ("vocab_size", "pad_id"):  # token ids from another tokenizer would be read as these
            if tokens and key in args and args[key] != tokens[key]:
                raise UserError(f"{path}: the teacher was made for {key} {args[key]}, the prepared data has "
                                f"{tokens[key]}: another tokenizer; prepare the data with the teacher's")
        info = {k: ckpt[k] for k in ("mlflow_run_id", "val_accuracy", "history", "config", "class_names") if k in ckpt}
        return args, ckpt["state_dict"], info
    if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), str) and "state_dict" in ckpt:
        args = {"arch": ckpt["arch"], "num_features": num_features, "num_classes": num_classes,
                "kwargs": dict(ckpt.get("arch_kwargs") or {})}
        if tokens:
            args |= {"vocab_size": tokens["vocab_size"], "pad_id": tokens["pad_id"]}
        return args, ckpt["state_dict"], {}
    raise UserError(f"{path}: not a model this pipeline can rebuild; save TorchScript (torch.jit.save), or a dict "
                    "with 'arch' (package.module:factory), 'arch_kwargs' and 'state_dict'")


@register_arch(TORCHSCRIPT)
def build_torchscript(args: dict[str, Any]) -> nn.Module:
    """A TorchScript teacher from the bytes stored in its model_args."""
    return torch.jit.load(io.BytesIO(args["script"]), map_location="cpu")


def chance_warning(accuracy: float, y: np.ndarray, class_names: list[str], standardized: bool | None) -> str | None:
    """A sentence for the log when a brought teacher scores on val as a model that learned nothing
    would, naming the likely cause; None when it does better.

    A model without skill scores at best p, the majority-class rate of the val labels `y` (p >=
    1/C), by predicting the commonest class. On n val rows an accuracy spreads around its rate with
    standard deviation sqrt(p(1-p)/n), so "near chance" is below p + 2 sqrt(p(1-p)/n), what chance
    alone exceeds about 2 % of the time, with a floor of 0.02: on a large val split a teacher 1
    point above p is still no teacher. A teacher that reads its inputs as it was trained to is far
    above the line; one fed inputs on another scale (`standardized`: data.standardize as prepare
    applied it; None on text) or reading the classes in another order falls to it.
    """
    n = len(y)
    if n == 0:
        return None
    counts = np.bincount(y, minlength=len(class_names))
    p = counts.max() / n
    if accuracy >= p + max(2 * math.sqrt(p * (1 - p) / n), 0.02):
        return None
    cause = {True: "it was given standardised features (data.standardize: true); if it was trained on raw ones "
                   "set data.standardize: false",
             False: "it was given raw features (data.standardize: false); if it was trained on standardised ones "
                    "set data.standardize: true",
             None: "check that it was trained on the token ids of data.text.tokenizer"}[standardized]
    names = ", ".join(f"'{c}'" for c in class_names[:6]) + (", ..." if len(class_names) > 6 else "")
    return (f"teacher: the brought teacher (teacher.source: checkpoint) scores {accuracy:.3f} on val, near chance "
            f"(always '{class_names[int(counts.argmax())]}' scores {p:.3f} on these {n} rows): {cause}; check too "
            f"that its outputs are the classes in the order {names}")


def source_record(path: str | Path) -> dict:
    """How the teacher file is recorded: its name and sha256."""
    return {"teacher_source_file": str(path), "teacher_source_sha256": file_sha256(path)}
