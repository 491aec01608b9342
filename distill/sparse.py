"""A language-model teacher's per-token soft labels: which targets are kept, and how they are packed
into Parquet.

At every position the teacher gives a next-token distribution p over the V tokens of its
vocabulary. `soft_labels.targets` keeps one of three forms of it:

  dense    every log-prob: V float16 values per position (the reference, and the costliest)
  top_k    the k likeliest token ids (uint16 while the vocabulary fits, else uint32), their
           log-probs (float16), and the tail: the probability mass 1 - sum(top-k p) left over
           (float16), as DistillKit and Megatron-Core's offline logits store them
  sampled  random-sampling KD ("Sparse Logit Sampling", Anshumann et al., ACL 2025): n ids
           drawn from p with replacement (seeded); the distinct ones kept, each with weight
           count / n (float16), padded to n with weight 0. An unbiased estimate of p:
           E[weight_i] = p_i, so at temperature 1 the student's cross-entropy against it is,
           on average, its cross-entropy against p (at other temperatures the weights are
           tempered like log-probs, which is no longer unbiased); top-k targets are biased
           (the tail is gone, smeared, or kept only as a total).

A Parquet row is one window of the prepared data; each column is a fixed-size list over its
P positions (`positions` x k values, position-major). `Targets` is what a batch unpacks to.
The student reads them with one of distill/lm_losses.py's divergences (`student.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from distill.errors import UserError

ID_TYPES = {"uint16": (np.uint16, pa.uint16(), 2 ** 16), "uint32": (np.uint32, pa.uint32(), 2 ** 32)}
TARGET_COLUMNS = {"dense": ["logprobs"], "top_k": ["topk_ids", "topk_logprobs", "tail_mass"],
                  "sampled": ["sample_ids", "sample_weights"]}
VALUE_TYPE = pa.float16()


def check_id_type(vocab_size: int, id_dtype: str) -> None:
    """Refuse a vocabulary whose ids do not fit the stored id type, by name."""
    limit = ID_TYPES[id_dtype][2]
    if vocab_size > limit:
        raise UserError(f"the vocabulary has {vocab_size:,} tokens, more than soft_labels.id_dtype {id_dtype} "
                        f"holds ({limit:,}); set soft_labels.id_dtype: uint32")


def per_position(targets: str, vocab_size: int, k: int, samples: int) -> int:
    """Values stored per position: V (dense), k (top_k) or n (sampled)."""
    return {"dense": vocab_size, "top_k": k, "sampled": samples}[targets]


def schema(targets: str, positions: int, width: int, id_dtype: str) -> pa.Schema:
    """One row per window: its id, then the targets' columns as fixed-size lists."""
    ids = ID_TYPES[id_dtype][1]
    fields = [pa.field("window", pa.int64())]
    if targets == "dense":
        fields.append(pa.field("logprobs", pa.list_(VALUE_TYPE, positions * width)))
    elif targets == "top_k":
        fields += [pa.field("topk_ids", pa.list_(ids, positions * width)),
                   pa.field("topk_logprobs", pa.list_(VALUE_TYPE, positions * width)),
                   pa.field("tail_mass", pa.list_(VALUE_TYPE, positions))]
    else:
        fields += [pa.field("sample_ids", pa.list_(ids, positions * width)),
                   pa.field("sample_weights", pa.list_(VALUE_TYPE, positions * width))]
    return pa.schema(fields)


def select(logits: torch.Tensor, targets: str, width: int, generator: torch.Generator | None = None
           ) -> dict[str, torch.Tensor]:
    """The kept targets of (..., V) teacher logits, as float32 / int64 tensors of shape (..., width)
    (tail: (...)): dense {logprobs}; top_k {ids, logprobs, tail}; sampled {ids, weights}."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if targets == "dense":
        return {"logprobs": logp}
    if targets == "top_k":
        values, ids = logp.topk(width, dim=-1)
        tail = (1.0 - values.exp().sum(-1)).clamp(min=0.0)
        return {"ids": ids, "logprobs": values, "tail": tail}
    return sample(logp, width, generator)


def sample(logp: torch.Tensor, draws: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random-sampling KD targets: `draws` ids from exp(logp) per position, with replacement;
    the distinct ids, each weighted count / draws, largest weight first, padded with id 0 and
    weight 0. Drawn on the CPU (with a CPU `generator`), so a GPU teacher's draws are the CPU's."""
    shape, vocab = logp.shape[:-1], logp.shape[-1]
    flat = logp.reshape(-1, vocab).exp().cpu()
    drawn = torch.multinomial(flat, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(flat).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=flat.dtype))
    weights, ids = counts.topk(min(draws, vocab), dim=-1)
    if draws > vocab:  # fewer distinct ids than draws can exist only up to the vocabulary
        weights = F.pad(weights, (0, draws - vocab))
        ids = F.pad(ids, (0, draws - vocab))
    ids = torch.where(weights > 0, ids, torch.zeros_like(ids))  # padding: the same bytes every run
    return {"ids": ids.reshape(*shape, draws), "weights": (weights / draws).reshape(*shape, draws)}


def pack(kept: dict[str, torch.Tensor], windows: np.ndarray, sch: pa.Schema) -> pa.RecordBatch:
    """A record batch of `sch` from `select`'s tensors over (B, P, ...) positions of B windows."""
    columns = [pa.array(windows, pa.int64())]
    for field in sch.names[1:]:
        source = {"logprobs": "logprobs", "topk_ids": "ids", "topk_logprobs": "logprobs", "tail_mass": "tail",
                  "sample_ids": "ids", "sample_weights": "weights"}[field]
        value_type = sch.field(field).type.value_type
        array = kept[source].detach().cpu().numpy().reshape(len(windows), -1)
        flat = pa.array(np.ascontiguousarray(array, dtype=value_type.to_pandas_dtype()).reshape(-1), value_type)
        columns.append(pa.FixedSizeListArray.from_arrays(flat, array.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=sch)


@dataclass(frozen=True)
class Targets:
    """A batch of stored targets over (B, P) positions. `ids` (B, P, w) int64, None when dense;
    `logp` (B, P, w) float32: log-probs (dense, top_k) or log-weights (sampled, -inf on padding);
    `tail` (B, P) float32: the top-k tail mass, None otherwise."""

    ids: torch.Tensor | None
    logp: torch.Tensor
    tail: torch.Tensor | None = None

    def to(self, device: torch.device) -> Targets:
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Targets(move(self.ids), move(self.logp), move(self.tail))

    def dense_probs(self, vocab_size: int, tail: str = "zero") -> torch.Tensor:
        """The (B, P, V) distribution the targets stand for at temperature 1, on the CPU (tests):
        a top-k tail spread evenly (uniform) or dropped (zero; bucket keeps no shape to show)."""
        if self.ids is None:
            return self.logp.exp()
        probs = torch.zeros(*self.logp.shape[:-1], vocab_size).scatter_add_(-1, self.ids, self.logp.exp())
        if self.tail is not None:
            rest = vocab_size - self.ids.shape[-1]
            if tail == "uniform" and rest:
                spread = (self.tail / rest).unsqueeze(-1).expand_as(probs).clone()
                spread.scatter_(-1, self.ids, 0.0)
                probs = probs + spread
            else:
                probs = probs / probs.sum(-1, keepdim=True)
        return probs


def unpack(table: pa.Table | pa.RecordBatch, targets: str, positions: int) -> Targets:
    """`Targets` from rows written by `pack` (the inverse up to float16 rounding)."""
    return as_targets(targets, stored_columns(table, targets, positions))


def stored_columns(table: pa.Table | pa.RecordBatch, targets: str, positions: int) -> dict[str, np.ndarray]:
    """The targets' columns of rows written by `pack`, as (N, P, width) arrays in their stored
    dtypes (uint16 / uint32 ids, float16 values): compact, for holding many rows in memory."""
    out = {}
    for name in TARGET_COLUMNS[targets]:
        values = table.column(name)
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        out[name] = values.flatten().to_numpy(zero_copy_only=False).reshape(len(table), positions, -1)
    return out


def as_targets(targets: str, columns: dict[str, np.ndarray]) -> Targets:
    """`Targets` (int64 ids, float32 values) from `stored_columns`' arrays, or some rows of them."""
    if targets == "dense":
        return Targets(None, torch.from_numpy(columns["logprobs"].astype(np.float32)))
    if targets == "top_k":
        return Targets(torch.from_numpy(columns["topk_ids"].astype(np.int64)),
                       torch.from_numpy(columns["topk_logprobs"].astype(np.float32)),
                       torch.from_numpy(columns["tail_mass"].astype(np.float32)[..., 0]))
    return Targets(torch.from_numpy(columns["sample_ids"].astype(np.int64)),
                   torch.from_numpy(columns["sample_weights"].astype(np.float32)).log())
