"""The ranks sampled soft labels store ids as (distill/id_ranks.py): what follows a position's token
in the train windows first, by how often, then every id by how often it occurs."""

import numpy as np

from distill.id_ranks import SuccessorRanks


def test_ranks_follow_the_successors_of_the_positions_token_then_the_overall_frequency():
    # occurrences: 0 three times, 1 and 3 twice, 2 once -> by frequency 0, 1, 3, 2 (ties by id)
    # what follows: 0 -> 1 (twice), 2 (once); 1 -> 0; 2 -> 3; 3 -> 3
    ranks = SuccessorRanks(np.array([[0, 1, 0, 1], [0, 2, 3, 3]]), vocab_size=4)
    ids = np.array([[[0, 1, 2, 3], [0, 1, 2, 3]]])  # window 0's positions 0 and 1: tokens 0 and 1
    expected = np.array([[[2, 0, 1, 3],   # token 0: 1 and 2 follow it; then 0 and 3, the others by frequency
                          [0, 1, 3, 2]]])  # token 1: 0 follows it; then 1, 3 and 2 by frequency
    assert np.array_equal(ranks.encode(np.array([0]), ids), expected)
    assert np.array_equal(ranks.decode(np.array([0]), expected), ids)


def test_successors_that_follow_as_often_rank_by_how_often_they_occur():
    # 0 is followed by 1 once and by 2 once; 2 occurs three times, 1 once: 2 ranks first
    ranks = SuccessorRanks(np.array([[0, 1, 5, 5], [0, 2, 2, 2]]), vocab_size=6)
    assert ranks.encode(np.array([0]), np.array([[[2, 1]]])).tolist() == [[[0, 1]]]


def test_every_id_at_every_position_reads_back_from_its_rank_and_ranks_are_distinct():
    gen = np.random.default_rng(0)
    v = 40
    windows = gen.integers(0, v, (30, 9))
    for j in range(1, 9, 2):
        windows[:, j] = (windows[:, j - 1] * 7 + 3) % v  # at even positions, a token followed by the same one
    ranks = SuccessorRanks(windows, v)
    rows = np.arange(30)
    every = np.broadcast_to(np.arange(v), (30, 8, v))  # every id at each of the 8 positions
    got = ranks.encode(rows, every)
    assert np.array_equal(ranks.decode(rows, got), every)
    assert all(sorted(r) == list(range(v)) for r in got.reshape(-1, v).tolist())  # 0 to V - 1, one per id
    # what follows a token most often ranks first: the successor set at the even positions, at most of them
    follower = (windows[:, :8:2] * 7 + 3) % v
    assert (got[:, ::2][np.arange(30)[:, None], np.arange(4), follower] == 0).mean() > 0.8
