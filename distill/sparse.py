"""A language-model teacher's per-token soft labels: which targets are kept, and how they are packed
into Parquet.

At every position the teacher gives a next-token distribution p over the V tokens of its
vocabulary. `soft_labels.targets` keeps one of three forms of it:

  dense    every log-prob: V float16 values per position (the reference, and the costliest)
  top_k    the k likeliest token ids (uint16 while the vocabulary fits, else uint32), their
           log-probs (float16), and the tail: the probability mass 1 - sum(top-k p) left over
           (float16), as DistillKit and Megatron-Core's offline logits store them
  sampled  random-sampling KD ("Sparse Logit Sampling", Anshumann et al., ACL 2025): n ids
           drawn from p with replacement (seeded); every draw kept, in ascending id order, each
           of weight 1 / n (an id drawn c times weighs c / n exactly). An unbiased estimate of p:
           E[weight_i] = p_i, so at temperature 1 the student's cross-entropy against it is,
           on average, its cross-entropy against p (at other temperatures the weights are
           tempered like log-probs, which is no longer unbiased); top-k targets are biased
           (the tail is gone, smeared, or kept only as a total).

A Parquet row is one window of the prepared data, over its P positions: fixed-size lists
(`positions` x k values, position-major). Sampled targets are `sample_rank_deltas`: each
position's n draws as ranks in the order of what follows the position's own token in the train
windows (distill/id_ranks.py), in ascending order, delta-coded within the position (the first
rank, then each rank minus the one before: 0 where an id was drawn again), so most values fit one
byte and the repeats cost next to nothing compressed (docs/language-models.md shows the field and
why).
In memory (`stored_columns`) every form is (N, P, width) arrays; the student gets a batch of
them as `Targets` (sampled: the distinct ids with their weights, padded with id 0 and weight 0
to width n) and reads them with one of distill/lm_losses.py's divergences (`student.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from distill.errors import UserError
from distill.id_ranks import SuccessorRanks

ID_TYPES = {"uint16": (np.uint16, pa.uint16(), 2 ** 16), "uint32": (np.uint32, pa.uint32(), 2 ** 32)}
TARGET_COLUMNS = {"dense": ["logprobs"], "top_k": ["topk_ids", "topk_logprobs", "tail_mass"],
                  "sampled": ["sample_rank_deltas"]}
HELD_PER_WINDOW = {"tail_mass": 1}  # values per position in memory, if not `width` (sampled: the draws' ids)
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


def _values(value_type: pa.DataType) -> pa.Field:
    """A list's element field, never null (Parquet then stores no definition levels for it)."""
    return pa.field("element", value_type, nullable=False)


def schema(targets: str, positions: int, width: int, id_dtype: str) -> pa.Schema:
    """One row per window: its id, then the targets' columns, fixed-size lists of `positions` x
    `width` values (the top-k tail: one per position; sampled: `width` = n draws)."""
    ids = ID_TYPES[id_dtype][1]
    fields = [pa.field("window", pa.int64())]
    if targets == "dense":
        fields.append(pa.field("logprobs", pa.list_(VALUE_TYPE, positions * width)))
    elif targets == "top_k":
        fields += [pa.field("topk_ids", pa.list_(ids, positions * width)),
                   pa.field("topk_logprobs", pa.list_(VALUE_TYPE, positions * width)),
                   pa.field("tail_mass", pa.list_(VALUE_TYPE, positions))]
    else:
        fields.append(pa.field("sample_rank_deltas", pa.list_(_values(ids), positions * width), nullable=False))
    return pa.schema(fields)


def held_bytes(sch: pa.Schema, targets: str, positions: int, width: int) -> int:
    """Bytes one window's targets take in memory as `stored_columns` gives them."""
    return sum(positions * HELD_PER_WINDOW.get(name, width) * sch.field(name).type.value_type.bit_width // 8
               for name in TARGET_COLUMNS[targets])


def select(logits: torch.Tensor, targets: str, width: int, generator: torch.Generator | None = None,
           sampling: str = "multinomial") -> dict[str, torch.Tensor]:
    """The kept targets of (..., V) teacher logits, as float32 / int64 tensors of shape (..., width)
    (tail: (...)): dense {logprobs}; top_k {ids, logprobs, tail}; sampled {draws, ids, counts,
    weights}, drawn as `sampling` says (`sample`)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if targets == "dense":
        return {"logprobs": logp}
    if targets == "top_k":
        values, ids = logp.topk(width, dim=-1)
        tail = (1.0 - values.exp().sum(-1)).clamp(min=0.0)
        return {"ids": ids, "logprobs": values, "tail": tail}
    return sample(logp, width, generator, sampling)


def sample(logp: torch.Tensor, draws: int, generator: torch.Generator | None = None, sampling: str = "multinomial"
           ) -> dict[str, torch.Tensor]:
    """Random-sampling KD targets: `draws` ids from exp(logp) per position, in ascending order
    (`draws`), and as `distinct` gives them (ids, counts, weights). Either way E[count / draws] = p
    for every id (unbiased):

      multinomial  `draws` independent draws with replacement (Anshumann et al., ACL 2025)
      systematic   `draws` evenly spaced points on the teacher's cumulative distribution, one
                   uniform offset per position (systematic resampling): an id of probability p
                   gets floor(n p) or ceil(n p) draws, the least variance n draws can have, so
                   likely ids are kept at their weight and fewer distinct ids remain.

    Drawn on the CPU (with a CPU `generator`), so a GPU teacher's draws are the CPU's."""
    shape, vocab = logp.shape[:-1], logp.shape[-1]
    flat = logp.reshape(-1, vocab).exp().cpu()
    if sampling == "systematic":
        cdf = flat.cumsum(-1)
        cdf = cdf / cdf[:, -1:]  # (M, V), ending at 1 whatever the float sum
        points = (torch.rand(len(flat), 1, generator=generator) + torch.arange(draws)) / draws  # (M, n), ascending
        drawn = torch.searchsorted(cdf, points, right=True).clamp(max=vocab - 1)  # (M, n), sorted
    else:
        drawn = torch.multinomial(flat, draws, replacement=True, generator=generator).sort(-1).values  # (M, n)
    return {"draws": drawn.reshape(*shape, draws)} | distinct(drawn.reshape(*shape, draws))


def distinct(drawn: torch.Tensor) -> dict[str, torch.Tensor]:
    """(..., n) draws in ascending order per position -> its distinct ids in ascending order, with
    their counts and weights count / n, padded after them with id 0 and count 0 (int64 ids and
    counts, float32 weights; each (..., n))."""
    shape, draws = drawn.shape, drawn.shape[-1]
    drawn = drawn.reshape(-1, draws).long()
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]  # (M, n): the first draw of each distinct id
    slot = first.long().cumsum(-1) - 1  # (M, n): the place of each draw's id among the distinct ones
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)  # a run's draws all write the same id
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    return {"ids": ids.reshape(shape), "counts": counts.reshape(shape), "weights": (counts / draws).reshape(shape)}


def pack(kept: dict[str, torch.Tensor], windows: np.ndarray, sch: pa.Schema, ranks: SuccessorRanks | None = None
         ) -> pa.RecordBatch:
    """A record batch of `sch` from `select`'s tensors over (B, P, ...) positions of train windows
    `windows` (sampled targets: stored as `ranks` ranks them)."""
    if "sample_rank_deltas" in sch.names:
        return _pack_sampled(kept, windows, sch, _needed(ranks))
    columns = [pa.array(windows, pa.int64())]
    for field in sch.names[1:]:
        source = {"logprobs": "logprobs", "topk_ids": "ids", "topk_logprobs": "logprobs", "tail_mass": "tail"}[field]
        value_type = sch.field(field).type.value_type
        array = kept[source].detach().cpu().numpy().reshape(len(windows), -1)
        flat = pa.array(np.ascontiguousarray(array, dtype=value_type.to_pandas_dtype()).reshape(-1), value_type)
        columns.append(pa.FixedSizeListArray.from_arrays(flat, array.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=sch)


def _needed(ranks: SuccessorRanks | None) -> SuccessorRanks:
    if ranks is None:
        raise ValueError("sampled targets are stored as ranks: pass the train windows' SuccessorRanks")
    return ranks


def _pack_sampled(kept: dict[str, torch.Tensor], windows: np.ndarray, sch: pa.Schema, ranks: SuccessorRanks
                  ) -> pa.RecordBatch:
    drawn = kept["draws"].cpu().numpy().reshape(len(windows), -1, kept["draws"].shape[-1])  # (B, P, n)
    ranked = np.sort(ranks.encode(windows, drawn), axis=-1)
    deltas = ranked.copy()
    deltas[..., 1:] -= ranked[..., :-1]  # >= 0: the first rank, then the steps (0 for a repeat)
    kind = sch.field("sample_rank_deltas").type
    flat = pa.array(deltas.reshape(-1).astype(kind.value_type.to_pandas_dtype()), kind.value_type)  # (B * P * n,)
    return pa.RecordBatch.from_arrays([pa.array(windows, pa.int64()), pa.FixedSizeListArray.from_arrays(flat, type=kind)],
                                      schema=sch)


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


def unpack(table: pa.Table | pa.RecordBatch, targets: str, positions: int, ranks: SuccessorRanks | None = None
           ) -> Targets:
    """`Targets` from rows written by `pack` (the inverse up to float16 rounding)."""
    return as_targets(targets, stored_columns(table, targets, positions, ranks))


def stored_columns(table: pa.Table | pa.RecordBatch, targets: str, positions: int,
                   ranks: SuccessorRanks | None = None) -> dict[str, np.ndarray]:
    """The targets' columns of rows written by `pack`, as (N, P, width) arrays in their stored
    dtypes (uint16 / uint32 ids, float16 values, integer counts): compact, for holding many rows
    in memory. Sampled targets come back as the draws' ids ("sample_draws"), in ascending order
    as `sample` drew them (their ranks read back by `ranks`)."""
    if targets == "sampled":
        draws = table.schema.field("sample_rank_deltas").type.list_size // positions
        deltas = _list_values(table, "sample_rank_deltas").reshape(len(table), positions, draws)
        windows = table.column("window").to_numpy()
        ids = _needed(ranks).decode(windows, np.cumsum(deltas, axis=-1, dtype=np.int64))
        return {"sample_draws": np.sort(ids, axis=-1).astype(deltas.dtype)}
    out = {}
    for name in TARGET_COLUMNS[targets]:
        out[name] = _list_values(table, name).reshape(len(table), positions, -1)
    return out


def _list_values(table: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """A list column's values, every row's in turn."""
    values = table.column(name)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return values.flatten().to_numpy(zero_copy_only=False)


def as_targets(targets: str, columns: dict[str, np.ndarray]) -> Targets:
    """`Targets` (int64 ids, float32 values) from `stored_columns`' arrays, or some rows of them.
    Sampled targets are the distinct drawn ids and their weights, exactly as `sample` gives them."""
    if targets == "dense":
        return Targets(None, torch.from_numpy(columns["logprobs"].astype(np.float32)))
    if targets == "top_k":
        return Targets(torch.from_numpy(columns["topk_ids"].astype(np.int64)),
                       torch.from_numpy(columns["topk_logprobs"].astype(np.float32)),
                       torch.from_numpy(columns["tail_mass"].astype(np.float32)[..., 0]))
    held = distinct(torch.from_numpy(columns["sample_draws"].astype(np.int64)))  # (N, P, n) each
    return Targets(held["ids"], held["weights"].log())  # log 0 = -inf on the padding
