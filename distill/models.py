"""Networks and self-describing checkpoints.

Models map a batch of feature vectors (N, D), or of token ids (N, L) on text, to
logits (N, C); losses live in distill.losses. Besides the built-in `mlp`, `cnn1d`
and `textcnn` (and `transformer`, a pretrained Hugging Face encoder with a head:
distill.pretrained), `arch` may be an import path `package.module:factory` to the
user's own model: the factory is called as `factory(num_features=D, num_classes=C,
**arch_kwargs)` (on text also `vocab_size=` and `pad_id=`), must return an
`nn.Module`, and is checked on a dummy batch before training (`check_model`).

This module registers the built-in three and the import-path factory in the architecture
registry (distill/checkpoint.py, which also holds the one checkpoint format);
distill.pretrained registers `transformer` and `torchscript` when it is imported (this
module never imports it), so code that loads a teacher's checkpoint imports it too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.checkpoint import IMPORTED, register_arch
from distill.classification_params import AUTO_ARCH, BUILTIN_ARCHS, ModelTrainConfig
from distill.errors import UserError
from distill.registry import imported


class MLP(nn.Module):
    """Fully connected ReLU network."""

    def __init__(self, num_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, D) -> (N, C)


class CNN1d(nn.Module):
    """1-D convolutions over the feature axis, then a fully connected head.

    Each conv block is conv (stride 1) -> batch norm -> ReLU, and every block after
    the first halves the length with stride 2, so the head sees a short sequence.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        channels: list[int],
        hidden: list[int],
        kernel_size: int = 5,
        dropout: float = 0.0,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch, length = 1, num_features
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            blocks += [
                nn.Conv1d(in_ch, ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(ch),
                nn.ReLU(),
            ]
            in_ch, length = ch, (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1
        self.features = nn.Sequential(*blocks)
        self.head = MLP(in_ch * length, num_classes, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # (N, D) -> (N, 1, D) -> (N, C_last, L)
        return self.head(h.flatten(1))  # (N, C_last * L) -> (N, classes)


def padding_mask(ids: torch.Tensor, pad_id: int, min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids cut to the batch's longest row (at least `min_length`: dynamic padding) and their
    mask (True on real tokens)."""
    mask = ids != pad_id
    length = max(int(mask.sum(1).max()) if len(ids) else 1, min_length)
    return ids[:, :length].long(), mask[:, :length]


class TextCNN(nn.Module):
    """A convolutional sentence classifier (Kim 2014, "Convolutional Neural Networks for Sentence
    Classification", CNN-rand): token embeddings, one convolution per filter width, ReLU, the
    maximum over the text of each filter, dropout, a fully connected head. Input: (N, L) token
    ids, padded with `pad_id` (ignored by the pooling).

    A table cut to fewer rows than the tokenizer has ids (`map_ids`) reads each id through the
    buffer `rows` (saved with the weights), row 0 being the padding's and row 1 the one every
    id unseen in training shares (distill.vocabulary fills both)."""

    def __init__(self, num_classes: int, vocab_size: int, pad_id: int, embedding_dim: int, channels: list[int],
                 kernel_sizes: list[int], hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.pad_id, self.min_length, self.rows = pad_id, max(kernel_sizes), None
        self.embed = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, ch, k) for ch, k in zip(channels, kernel_sizes))
        self.dropout = nn.Dropout(dropout)
        self.head = MLP(sum(channels), num_classes, hidden, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mask = padding_mask(ids, self.pad_id, self.min_length)
        if self.rows is not None:
            ids = self.rows[ids]  # token ids -> rows of the student's own table
        h = self.embed(ids).transpose(1, 2)  # (N, L) -> (N, E, L)
        pooled = []
        for conv in self.convs:
            a = torch.relu(conv(h))  # (N, channels, L - k + 1)
            # only windows inside the text count (the first always: a text shorter than the filter),
            # so a row scores the same whatever the batch it is padded with
            k = conv.kernel_size[0]
            valid = mask[:, k - 1 : k - 1 + a.shape[2]].unsqueeze(1) | (torch.arange(a.shape[2], device=a.device) == 0)
            pooled.append(a.masked_fill(~valid, 0.0).amax(dim=2))
        return self.head(self.dropout(torch.cat(pooled, dim=1)))  # (N, sum(channels)) -> (N, C)

    def map_ids(self, vocab_size: int, pad_id: int) -> None:
        """Read the ids of a tokenizer of `vocab_size` ids padded with `pad_id` through `rows` (all row
        1 until filled), this model's table being a cut one whose padding row is 0."""
        del self.rows  # a plain attribute until here
        self.register_buffer("rows", torch.full((vocab_size,), 1, dtype=torch.long))
        self.rows[pad_id] = 0
        self.pad_id = pad_id


# ---------------------------------------------------------------- the architecture registry

@register_arch("mlp")
def _mlp(kwargs: dict[str, Any]) -> nn.Module:
    return MLP(**kwargs)


@register_arch("cnn1d")
def _cnn1d(kwargs: dict[str, Any]) -> nn.Module:
    return CNN1d(**kwargs)


@register_arch("textcnn")
def _textcnn(kwargs: dict[str, Any]) -> nn.Module:
    # reads texts of any length: num_features (the longest) is not its business
    kwargs = {k: v for k, v in kwargs.items() if k != "num_features"}
    rows = kwargs.pop("vocab_rows", None)
    if rows is None:
        return TextCNN(**kwargs)
    model = TextCNN(**kwargs | {"vocab_size": rows, "pad_id": 0})  # a cut table (distill.vocabulary)
    model.map_ids(kwargs["vocab_size"], kwargs["pad_id"])
    return model


TOKEN_BATCH = 64  # rows per forward pass over token ids (sorted by length, so each pass pads little)


def model_args(cfg: ModelTrainConfig, num_features: int, num_classes: int, signal: bool = False,
               tokens: dict | None = None) -> dict[str, Any]:
    """The keyword arguments that rebuild a model, as stored in its checkpoint. `signal`: the
    features are an ordered signal (arch auto takes cnn1d), not the columns of a table (mlp);
    `tokens` (meta.json's, on text): the inputs are token ids (arch auto takes textcnn)."""
    auto = "textcnn" if tokens else "cnn1d" if signal else "mlp"
    arch = auto if cfg.arch == AUTO_ARCH else cfg.arch
    if (arch == "textcnn") != bool(tokens) and arch in BUILTIN_ARCHS:
        raise UserError(f"arch {arch} is for {'feature vectors' if tokens else 'text'}; this data is "
                        f"{'text' if tokens else 'feature vectors'}: use auto, " + ("textcnn" if tokens else "mlp or cnn1d"))
    args: dict[str, Any] = {"arch": arch, "num_features": num_features, "num_classes": num_classes}
    if tokens:
        args |= {"vocab_size": tokens["vocab_size"], "pad_id": tokens["pad_id"]}
    if arch not in BUILTIN_ARCHS:
        return args | {"kwargs": dict(cfg.arch_kwargs)}
    args |= {"hidden": list(cfg.hidden), "dropout": cfg.dropout}
    if arch == "cnn1d":
        args |= {"channels": list(cfg.channels), "kernel_size": cfg.kernel_size}
    if arch == "textcnn":
        args |= {"channels": list(cfg.channels), "kernel_sizes": list(cfg.kernel_sizes),
                 "embedding_dim": cfg.embedding_dim}
    return args


@register_arch(IMPORTED)
def _build_imported(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """The user's model: `factory(num_features=, num_classes=, [vocab_size=, pad_id=,] **arch_kwargs)`."""
    factory = imported(arch, f"arch {arch}")
    text = {k: kwargs[k] for k in ("vocab_size", "pad_id") if k in kwargs}
    try:
        model = factory(num_features=kwargs["num_features"], num_classes=kwargs["num_classes"], **text,
                        **kwargs["kwargs"])
    except TypeError as exc:
        raise UserError(f"arch {arch}: the factory refused its arguments ({exc}); it is called as "
                        "factory(num_features=..., num_classes=..., **arch_kwargs)"
                        + (" with vocab_size= and pad_id= on text" if text else "")) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"arch {arch}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def dummy_batch(num_features: int, tokens: dict | None = None) -> torch.Tensor:
    """Two rows of zeros, or on text two rows of token ids (a few real tokens, then padding)."""
    if tokens is None:
        return torch.zeros(2, num_features)
    ids = torch.full((2, num_features), tokens["pad_id"], dtype=torch.int32)
    ids[:, : min(5, num_features)] = (tokens["pad_id"] + 1) % tokens["vocab_size"]
    return ids


def check_model(model: nn.Module, num_features: int, num_classes: int, arch: str, tokens: dict | None = None) -> None:
    """Run a dummy batch through `model`: (2, num_features) in, (2, num_classes) logits out."""
    was_training = model.training
    model.eval()
    what = "token ids" if tokens else "features"
    try:
        with torch.no_grad():
            out = model(dummy_batch(num_features, tokens))
    except Exception as exc:  # the user's forward can raise anything
        raise UserError(f"arch {arch}: a batch of shape (2, {num_features}) fails in forward "
                        f"({type(exc).__name__}: {exc}); it must accept (batch, {num_features}) {what}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"arch {arch}: returns {shape} for a batch of shape (2, {num_features}); "
                        f"it must return (batch, {num_classes}) logits")


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096, pad_id: int | None = None
                   ) -> torch.Tensor:
    """(N, D) -> (N, C) logits in eval mode. On token ids (an integer `x`) the rows go through
    in passes of at most TOKEN_BATCH, sorted by length (`pad_id`: the padding; each pass is cut
    to its longest row by the model) and put back in order."""
    model.eval()
    if not len(x):
        return model(x)
    if x.is_floating_point():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    lengths = (x != (pad_id if pad_id is not None else getattr(model, "pad_id", 0))).sum(1)
    order = torch.argsort(lengths, stable=True)
    step = min(batch_size, TOKEN_BATCH)
    out = torch.cat([model(x[order[i : i + step]]) for i in range(0, len(x), step)])
    return out[torch.argsort(order)]
