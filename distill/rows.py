"""Training rows, read block by block, and the shuffled batches `fit` draws from them.

A `Rows` source splits its rows into blocks (a Parquet row group, say) and reads
one block at a time. `Batches` turns a source into mini-batches for each epoch:

- rows that fit in the shuffle buffer are read once, kept in memory, and shuffled
  as a whole every epoch (a plain permutation, as with in-memory tensors);
- more rows than that are streamed: each epoch visits the blocks in a seeded random
  order, fills the buffer with whole blocks, shuffles the buffer and yields its
  batches, while a background thread reads the next buffer (Parquet decoding
  releases the GIL). Memory then stays flat in the number of rows.

On token ids (`pad_id` given) rows of similar length share a batch, as a Transformer's
fine-tuning recipes do: each run of BUCKET_BATCHES batches of the shuffled order is sorted
by length and cut into batches, and the epoch's batches are shuffled, so a batch is padded
to little more than its rows' own length (the models cut each batch after its longest row)
while its rows still come from anywhere in the epoch.

Batches never mix the random generator with anything else, so the same seed gives
the same batches. Each epoch has exactly ceil(rows / batch_size) batches (rows left
over from one buffer start the next), which learning-rate schedules rely on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.errors import UserError

BUCKET_BATCHES = 50  # on token ids: batches whose rows are sorted by length together


@dataclass(frozen=True)
class Block:
    """Rows in memory: features, labels (-1 = unlabelled) and, for a student, teacher logits."""

    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64
    logits: np.ndarray | None = None  # (N, C) float32


class Rows(Protocol):
    @property
    def block_sizes(self) -> Sequence[int]: ...

    def read_block(self, i: int) -> Block: ...


class InMemoryRows:
    """Arrays already in memory, as one block."""

    def __init__(self, x: np.ndarray, y: np.ndarray, logits: np.ndarray | None = None):
        x = np.asarray(x)  # token ids stay integers; features are float32
        self.block = Block(x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32, copy=False),
                           np.asarray(y, dtype=np.int64), logits)

    @property
    def block_sizes(self) -> list[int]:
        return [len(self.block.y)]

    def read_block(self, i: int) -> Block:
        return self.block


class ParquetRows:
    """Row ranges of one or more Parquet files, taken as one table in file order.

    `read(start, stop)` decodes only the row groups that overlap the range.
    """

    def __init__(self, paths: Sequence[str | Path], columns: list[str]):
        self.columns = columns
        self.files: list[pq.ParquetFile] = []
        starts, file_index, groups = [], [], []
        offset = 0
        for path in paths:
            pf = _open(Path(path))
            self.files.append(pf)
            for g in range(pf.metadata.num_row_groups):
                starts.append(offset)
                file_index.append(len(self.files) - 1)
                groups.append(g)
                offset += pf.metadata.row_group(g).num_rows
        self.num_rows = offset
        self.paths = [Path(p) for p in paths]
        self._starts = np.array(starts + [offset], dtype=np.int64)
        self._where = list(zip(file_index, groups))

    @property
    def group_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of every row group, in order."""
        return list(zip(self._starts[:-1].tolist(), self._starts[1:].tolist()))

    def read(self, start: int, stop: int) -> pa.Table:
        stop = min(stop, self.num_rows)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left"))
        parts = []
        for g in range(first, last):
            f, group = self._where[g]
            try:
                table = self.files[f].read_row_group(group, columns=self.columns)
            except (pa.ArrowInvalid, OSError) as exc:
                raise UserError(f"{self.paths[f]}: unreadable or truncated Parquet ({exc}); rerun its stage") from None
            lo, hi = max(start, self._starts[g]), min(stop, self._starts[g + 1])
            parts.append(table.slice(lo - self._starts[g], hi - lo))
        return pa.concat_tables(parts) if parts else pa.table({c: [] for c in self.columns})


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise UserError(f"{path}: not found; run the stage that makes it (dvc repro)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: unreadable or truncated Parquet ({exc}); rerun its stage") from None


@dataclass
class EpochTiming:
    """Where an epoch's time went: `data_wait_s` is time the loop waited for batches."""

    seconds: float = 0.0
    data_wait_s: float = 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds else 0.0


class Batches:
    """Shuffled mini-batches of a `Rows` source (see the module docstring)."""

    def __init__(self, rows: Rows, batch_size: int, buffer_rows: int | None = None, rank: int = 0, ranks: int = 1,
                 pad_id: int | None = None):
        """`rank` of `ranks` processes (distributed training): every rank draws the same
        global batches and yields its share of each, rows rank, rank + ranks, ... `pad_id`:
        the rows are token ids padded with it, batched by length."""
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rank, self.ranks = rank, ranks
        self.sizes = list(rows.block_sizes)
        self.num_rows = sum(self.sizes)
        self.buffer_rows = buffer_rows or self.num_rows
        self.streamed = self.num_rows > self.buffer_rows
        self._resident: _Tensors | None = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One epoch of (x, y, logits-or-None) batches in an order fixed by `gen`."""
        if not self.streamed:
            if self._resident is None:
                self._resident = _Tensors.cat([self.rows.read_block(i) for i in range(len(self.sizes))])
            yield from self._resident.batches(self._order(self._resident, torch.randperm(self.num_rows, generator=gen),
                                                          gen), self.rank, self.ranks)
            return
        yield from self._streamed_epoch(gen)

    def _streamed_epoch(self, gen: torch.Generator) -> Iterator:
        order = torch.randperm(len(self.sizes), generator=gen).tolist()
        groups, current, filled = [], [], 0
        for i in order:
            if current and filled + self.sizes[i] > self.buffer_rows:
                groups.append(current)
                current, filled = [], 0
            current.append(i)
            filled += self.sizes[i]
        groups.append(current)

        def load(blocks: list[int]) -> _Tensors:
            return _Tensors.cat([self.rows.read_block(i) for i in blocks])

        carry: _Tensors | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows") as pool:
            pending = pool.submit(load, groups[0])
            for n, _ in enumerate(groups):
                buffer = pending.result()
                if n + 1 < len(groups):
                    pending = pool.submit(load, groups[n + 1])
                if carry is not None:
                    buffer = _Tensors.cat_tensors([carry, buffer])
                perm = torch.randperm(len(buffer.y), generator=gen)
                full = len(perm) if n + 1 == len(groups) else len(perm) // self.batch_size * self.batch_size
                yield from buffer.batches(self._order(buffer, perm[:full], gen), self.rank, self.ranks)
                carry = buffer.take(perm[full:])

    def _order(self, rows: _Tensors, perm: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The batches (row indices) of `perm`: its consecutive pieces, or on token ids by length."""
        if not len(perm):
            return []  # (an empty tensor still splits into one empty piece)
        if self.pad_id is None:
            return list(perm.split(self.batch_size))
        lengths = (rows.x[perm] != self.pad_id).sum(1)
        window = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, len(perm), window):
            piece = perm[start:start + window]
            batches += piece[torch.argsort(lengths[start:start + window], stable=True)].split(self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def timed(batches: Iterator, timing: EpochTiming) -> Iterator:
    """Pass batches through, adding the time spent waiting for each to `timing.data_wait_s`."""
    while True:
        start = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        finally:
            timing.data_wait_s += time.perf_counter() - start
        yield item


@dataclass(frozen=True)
class _Tensors:
    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor | None

    @staticmethod
    def cat(blocks: list[Block]) -> _Tensors:
        x = torch.from_numpy(np.concatenate([b.x for b in blocks]) if len(blocks) > 1 else blocks[0].x)
        y = torch.from_numpy(np.concatenate([b.y for b in blocks]) if len(blocks) > 1 else blocks[0].y)
        logits = None
        if blocks[0].logits is not None:
            logits = torch.from_numpy(np.concatenate([b.logits for b in blocks]) if len(blocks) > 1
                                      else blocks[0].logits)
        return _Tensors(x, y, logits)

    @staticmethod
    def cat_tensors(parts: list[_Tensors]) -> _Tensors:
        logits = None if parts[0].logits is None else torch.cat([p.logits for p in parts])
        return _Tensors(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), logits)

    def take(self, idx: torch.Tensor) -> _Tensors:
        return _Tensors(self.x[idx], self.y[idx], None if self.logits is None else self.logits[idx])

    def batches(self, order: list[torch.Tensor], rank: int = 0, ranks: int = 1) -> Iterator:
        for idx in order:
            idx = idx[rank::ranks] if ranks > 1 else idx
            yield self.x[idx], self.y[idx], None if self.logits is None else self.logits[idx]
