"""Batches: full permutation in memory, bounded buffers when streamed, exact epochs, repeatable order."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.rows import Batches, Block, InMemoryRows, ParquetRows


class CountingRows:
    """Blocks of consecutive integers (x = row number), recording which blocks were read."""

    def __init__(self, sizes: list[int]):
        self.block_sizes = sizes
        self.starts = np.cumsum([0, *sizes])
        self.reads: list[int] = []

    def read_block(self, i: int) -> Block:
        self.reads.append(i)
        rows = np.arange(self.starts[i], self.starts[i + 1])
        return Block(rows[:, None].astype(np.float32), rows.astype(np.int64), (rows[:, None] * 2).astype(np.float32))


def epoch_rows(batches: Batches, seed: int) -> list[np.ndarray]:
    return [y.numpy() for _, y, _ in batches.epoch(torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("buffer_rows", [None, 1000, 64, 10])
def test_every_row_once_per_epoch_in_exactly_ceil_n_over_b_batches(buffer_rows):
    rows = CountingRows([37, 50, 13, 50, 50, 7])  # 207 rows
    batches = Batches(rows, batch_size=16, buffer_rows=buffer_rows)
    for seed in (0, 1):
        got = epoch_rows(batches, seed)
        assert len(got) == batches.steps_per_epoch == 13
        assert all(len(b) == 16 for b in got[:-1]) and len(got[-1]) == 207 - 12 * 16
        assert sorted(np.concatenate(got).tolist()) == list(range(207))


def test_batches_keep_x_y_and_logits_aligned():
    batches = Batches(CountingRows([30, 30, 30]), batch_size=8, buffer_rows=40)
    for x, y, logits in batches.epoch(torch.Generator().manual_seed(3)):
        assert torch.equal(x[:, 0].long(), y) and torch.equal(logits[:, 0], 2 * x[:, 0])


def test_the_same_seed_gives_the_same_batches_and_another_seed_other_batches():
    batches = Batches(CountingRows([30, 30, 30]), batch_size=8, buffer_rows=40)
    a, b, c = epoch_rows(batches, 5), epoch_rows(batches, 5), epoch_rows(batches, 6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_rows_that_fit_the_buffer_are_read_once_and_shuffled_as_a_whole():
    rows = CountingRows([30, 30, 30])
    batches = Batches(rows, batch_size=90)
    first, second = epoch_rows(batches, 0), epoch_rows(batches, 1)
    assert rows.reads == [0, 1, 2]  # read once, kept for later epochs
    assert not batches.streamed
    # one batch of all rows: a full permutation, the same one torch.randperm gives
    np.testing.assert_array_equal(first[0], torch.randperm(90, generator=torch.Generator().manual_seed(0)).numpy())
    assert not np.array_equal(first[0], second[0])


def test_streamed_epochs_hold_at_most_one_buffer_of_blocks_at_a_time():
    rows = CountingRows([25] * 40)  # 1000 rows, buffer 100 = 4 blocks
    batches = Batches(rows, batch_size=32, buffer_rows=100)
    assert batches.streamed
    epoch_rows(batches, 0)
    epoch_rows(batches, 1)
    assert len(rows.reads) == 80  # every block read once per epoch
    assert rows.reads[:40] != list(range(40))  # in a shuffled order
    assert sorted(rows.reads[:40]) == list(range(40))


def test_in_memory_rows_are_one_block():
    rows = InMemoryRows(np.zeros((5, 2)), np.arange(5))
    assert rows.block_sizes == [5] and rows.read_block(0).x.dtype == np.float32


def test_parquet_rows_read_any_range_across_row_groups_and_files(tmp_path):
    paths = []
    for f, n in enumerate((23, 40)):
        table = pa.table({"v": pa.array(np.arange(n) + 100 * f)})
        paths.append(tmp_path / f"{f}.parquet")
        pq.write_table(table, paths[-1], row_group_size=10)
    rows = ParquetRows(paths, ["v"])
    every = list(range(23)) + list(range(100, 140))
    assert rows.num_rows == 63
    assert rows.group_bounds[:4] == [(0, 10), (10, 20), (20, 23), (23, 33)]
    for start, stop in [(0, 63), (5, 27), (20, 23), (22, 24), (60, 70), (7, 7)]:
        assert rows.read(start, stop).column("v").to_pylist() == every[start:stop]


@pytest.mark.parametrize("buffer_rows", [None, 300])
def test_token_rows_are_batched_by_length_each_row_once_in_exactly_ceil_n_over_b_batches(buffer_rows):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1000)
    x = np.zeros((1000, 64), dtype=np.int32)  # pad id 0
    for i, n in enumerate(lengths):
        x[i, :n] = rng.integers(1, 100, size=n)
    rows = InMemoryRows(x, np.arange(1000))
    bucketed = Batches(rows, batch_size=16, buffer_rows=buffer_rows, pad_id=0)
    plain = Batches(rows, batch_size=16, buffer_rows=buffer_rows)
    got = epoch_rows(bucketed, 0)
    assert len(got) == bucketed.steps_per_epoch == 63
    assert sorted(np.concatenate(got).tolist()) == list(range(1000))
    assert [len(b) for b in got].count(16) >= 62
    assert all(np.array_equal(a, b) for a, b in zip(got, epoch_rows(bucketed, 0)))  # the seed fixes them

    def padding(batches):  # tokens of padding a batch cut after its longest row carries
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)

    assert padding(got) < padding(epoch_rows(plain, 0)) / 3
