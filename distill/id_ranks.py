"""The order sampled soft labels store token ids in: ranked by what follows the position's own token.

A language model's teacher mostly draws the tokens that often follow the token at that position.
Stored as ids, a position's draws spread over the whole vocabulary; stored as ranks in the order of
what follows its token in the train split, they crowd near 0, and their deltas (distill/sparse.py)
compress far better: on seed 0's teacher of the LM benchmark, 17 draws take 13.8 bytes a token as
ranks against 16.1 as ids (docs/language-models.md, "How sampled targets are stored").

The order is rebuilt from the train windows themselves, which every reader of the soft labels has
(the set's provenance names their fingerprint), so it costs no byte on disk. For the token a at a
position, the rank of id t is:

  - t's place among the ids that follow a somewhere in the train windows, ordered by how often they
    follow it (most often first), then by how often they occur at all (most often first), then by id;
  - otherwise s(a) + t's place, by how often they occur (most often first), then by id, among the ids
    that do not follow a, where s(a) is the number of distinct ids that do.

At each position the ranks are 0 to V - 1, one for each id (like ids, they fit the stored id type), so
they read back to exactly the ids drawn.
"""

from __future__ import annotations

import numpy as np


class SuccessorRanks:
    """Ids <-> ranks at each position of the train windows, in the order the module docstring gives."""

    def __init__(self, windows: np.ndarray, vocab_size: int):
        windows = np.asarray(windows, dtype=np.int64)
        self.windows, self.vocab_size = windows, vocab_size
        v = vocab_size
        occurs = np.bincount(windows.reshape(-1), minlength=v)[:v]
        self.by_frequency = np.lexsort((np.arange(v), -occurs))  # place -> id over the whole vocabulary
        self.place = np.empty(v, np.int64)  # id -> its place by frequency
        self.place[self.by_frequency] = np.arange(v)
        pairs, follows = np.unique(windows[:, :-1] * v + windows[:, 1:], return_counts=True)  # sorted by (a, t)
        before, after = pairs // v, pairs % v
        self.starts = np.searchsorted(before, np.arange(v + 1))  # token a's successors: [starts[a], starts[a + 1])
        self.count = np.diff(self.starts)  # s(a): the distinct ids that follow token a
        order = np.lexsort((self.place[after], -follows, before))  # by a, then most often first, then by frequency
        self.successors = after[order]  # each token's successors in rank order, token after token
        self.pairs = pairs
        self.pair_rank = np.empty(len(pairs), np.int64)
        self.pair_rank[order] = np.arange(len(pairs)) - self.starts[before[order]]
        # each token's successors' places by frequency, ascending, as keys a * V + place (sorted throughout),
        # and the same less the successor's index among them: how many non-successors come before it
        places = np.sort(self.place[after].reshape(-1) + before * v)  # sorted: a first, then the place
        self.successor_places = places
        self.gaps = places - (np.arange(len(places)) - self.starts[before])

    def _tokens(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The (B, P, 1) tokens at the P positions of windows `rows`, for (B, P, n) values."""
        return self.windows[np.asarray(rows, dtype=np.int64)][:, :shape[1], None]

    def encode(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(B, P, n) ids at the positions of train windows `rows` -> their int64 ranks, below V."""
        ids = np.asarray(ids, dtype=np.int64)
        token = self._tokens(rows, ids.shape)
        key = token * self.vocab_size + ids
        at = np.minimum(np.searchsorted(self.pairs, key), max(len(self.pairs) - 1, 0))
        found = self.pairs[at] == key if len(self.pairs) else np.zeros(key.shape, bool)
        place = self.place[ids]
        ahead = np.searchsorted(self.successor_places, token * self.vocab_size + place) - self.starts[token]
        return np.where(found, self.pair_rank[at] if len(self.pairs) else 0, self.count[token] + place - ahead)

    def decode(self, rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """The inverse of `encode`: (B, P, n) ranks below V -> int64 ids."""
        ranks = np.asarray(ranks, dtype=np.int64)
        token = self._tokens(rows, ranks.shape)
        count, start = self.count[token], self.starts[token]
        follower = self.successors[np.clip(start + ranks, 0, max(len(self.successors) - 1, 0))] \
            if len(self.successors) else 0
        # the q-th id by frequency that does not follow the token: q plus the successors placed before it
        q = np.maximum(ranks - count, 0)
        place = q + np.searchsorted(self.gaps, token * self.vocab_size + q, side="right") - start
        return np.where(ranks < count, follower, self.by_frequency[np.clip(place, 0, self.vocab_size - 1)])
