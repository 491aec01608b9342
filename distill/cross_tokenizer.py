"""Soft labels across tokenizers: the teacher's next-token distributions, turned into targets over
the student's own vocabulary, position by position of the student's windows (data.cross_tokenizer).

Teacher and student read the same text through different tokenizers, so their positions differ.
Both are aligned on the bytes of the text. For a student window (its ids s_0..s_{L-1}, the bytes
each id stands for, `token_bytes`), the window's text is tokenized by the teacher and the teacher
is run over it (p_i: its distribution over the token after its token i). At student position j
the student has read up to byte x; the teacher's token k holds the last byte read, and S is the
student's pieces of it read so far (the student's tokens from where token k starts up to x).
What the student reads next is, by the teacher, either the rest of a token that begins as
token k does, or, if a teacher token ends at x (token k, or inside token k the token split as
exactly S), the first piece of the token after it:

    q(s) ∝ sum over teacher tokens t the student splits as S and more: p_{k-1}(t) * [its next piece is s]
         + [token k ends at x] * p_{k-1}(token k) * sum over teacher tokens t' of p_k(t') * [its first piece is s]
         + [x inside token k] * p_{k-1}(t_S) * sum over teacher tokens t' of p'(t') * [its first piece is s]

with t_S the teacher token the student splits as exactly S, and p' the teacher's distribution
after it in token k's place: the teacher run over that other split, in the same forward as the
window (`batch`: each such token at token k's position, seeing the tokens before k and itself,
by a 4D attention mask; about 13 % more tokens on the LM benchmark). "Splits as" is the
student's tokenizer on the teacher token's bytes read alone (`split`), so a teacher token is
counted only where the student could be reading it: one the student splits otherwise is not
(its first pieces are not what the student read). This is the teacher's own distribution over
the student's next piece when the student's tokenizer splits every teacher token the way it
splits the text around it (two byte-level BPEs trained on the same text, the smaller one's
merges a subset of the larger's, whose every teacher token starts at a student boundary), but
for splits of more than one teacher token inside token k (S read as two teacher tokens or
more), which it leaves out. Where token k does not start at a student boundary (other
pairs of tokenizers), S is replaced by the bytes read, and teacher tokens are matched on them
(and inside token k the target there is conditioned on a token going on).
The end-of-text token is one byte (0x00, which no text holds) in both, so documents align at
their boundaries. Where the teacher has nothing before x (inside its first token of the
window, a character cut at the window's edge, past the teacher's positions), the target is
the observed next token: the distillation term there is the cross-entropy.

The targets q are then kept as any dense distribution is (distill/sparse.py's select: sampled,
top_k or dense) over the student's vocabulary, so the student reads them as it reads targets in
its own tokenizer. Byte-level BPE tokenizers (GPT-2's scheme, the BPE trained here) align byte
for byte; others (WordPiece, SentencePiece) by their tokens' text, approximately.

How faithful the alignment is, is measured as it goes (`summary`): the targets' bits per byte on
the student's observed next tokens, beside the teacher's own bits per byte on its next tokens of
the same text. Targets that lost the teacher's knowledge score far worse than the teacher (one
teacher position off: several times worse); somewhat better is expected, from what the student's
own split of a teacher token tells of it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from distill.text import byte_alphabet, decoder_kinds, token_texts

EOS_BYTES = b"\x00"  # the end-of-text token, as one byte no text holds
_NONE = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # no teacher id, no piece


def token_bytes(tok) -> list[bytes]:
    """The bytes each id of `tok` stands for (distill/text.py's token_texts), for aligning: the
    end-of-text token is EOS_BYTES, and a token holding the byte 0x00 (which no text holds) none."""
    out = [b"" if 0 in b else b for b in token_texts(tok)]
    out[tok.eos_token_id] = EOS_BYTES
    return out


class Aligner:
    """Turns the teacher's next-token distributions into targets over the student's vocabulary."""

    def __init__(self, teacher_tok, student_tok, teacher_positions: int):
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.teacher_bytes, self.student_bytes = token_bytes(teacher_tok), token_bytes(student_tok)
        self.teacher_lengths, self.student_lengths = (np.array([len(b) for b in table], dtype=np.int64)
                                                      for table in (self.teacher_bytes, self.student_bytes))
        self.positions = teacher_positions
        self.student_vocab = len(student_tok)
        self._student_byte_level = "ByteLevel" in decoder_kinds(student_tok)
        self.candidates = lru_cache(maxsize=None)(self._first_pieces)
        self.following, self.ending = self._following()
        self.fallback = self.seen = 0  # positions whose target is the observed next token, of all made
        self.bits = {"targets": 0.0, "teacher": 0.0}  # -log2 of the observed next token: aligned targets, teacher
        self.bytes = {"targets": 0, "teacher": 0}  # the bytes those next tokens stand for

    # ------------------------------------------------------------ what a teacher token begins with

    def split(self, rest: bytes) -> tuple[int, ...]:
        """The student's tokens of `rest` (bytes read on their own)."""
        if rest.startswith(EOS_BYTES):
            return (self.student_tok.eos_token_id,)
        if self._student_byte_level:
            alphabet = byte_alphabet()
            tokens = self.student_tok.backend_tokenizer.model.tokenize("".join(alphabet[b] for b in rest))
            return tuple(token.id for token in tokens)
        return tuple(self.student_tok(rest.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])

    def _following(self) -> tuple[dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]], dict[tuple[int, ...], int]]:
        """For each run of student pieces S that begins a teacher token's split: the teacher ids
        split as S and more, and for each the piece after S (S empty: every teacher id and its
        first piece); and the teacher id split as exactly S, where there is one."""
        index: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        ending: dict[tuple[int, ...], int] = {}
        for t, whole in enumerate(self.teacher_bytes):
            pieces = self.split(whole) if whole else ()
            if pieces:
                ending.setdefault(pieces, t)
            for n in range(len(pieces)):
                teacher, student = index.setdefault(pieces[:n], ([], []))
                teacher.append(t)
                student.append(pieces[n])
        return ({key: (torch.tensor(t, dtype=torch.long), torch.tensor(s, dtype=torch.long))
                 for key, (t, s) in index.items()}, ending)

    def _first_pieces(self, read: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher ids whose bytes start with `read` and go on past it, and for each the
        student's first token of the rest: the match on bytes, where the student's pieces of a
        teacher token do not start where it does."""
        teacher, student = [], []
        for t, whole in enumerate(self.teacher_bytes):
            if len(whole) > len(read) and whole.startswith(read):
                pieces = self.split(whole[len(read):])
                if pieces:
                    teacher.append(t)
                    student.append(pieces[0])
        return torch.tensor(teacher, dtype=torch.long), torch.tensor(student, dtype=torch.long)

    # ------------------------------------------------------------ windows

    def teacher_ids(self, window: np.ndarray) -> tuple[list[int], np.ndarray, bytes]:
        """The teacher's ids for a student window's text, each teacher token's start byte, and the
        window's bytes. Documents are tokenized apart and joined by the teacher's end-of-text, as
        prepare does; a character cut at the window's edges is left out (no teacher token covers it)."""
        stream = b"".join(self.student_bytes[i] for i in window)
        ids, starts, at = [], [], 0
        for k, segment in enumerate(stream.split(EOS_BYTES)):
            if k:  # the end-of-text between two documents
                ids.append(self.teacher_tok.eos_token_id)
                starts.append(at)
                at += len(EOS_BYTES)
            lead = next((n for n, b in enumerate(segment[:4]) if b & 0xC0 != 0x80), len(segment)) if k == 0 else 0
            text = segment[lead:].decode("utf-8", errors="ignore")  # a character cut at the end is dropped
            offset = at + lead
            for t in self.teacher_tok(text, add_special_tokens=False)["input_ids"] if text else []:
                ids.append(t)
                starts.append(offset)
                offset += len(self.teacher_bytes[t])
            at += len(segment)
        return ids[:self.positions], np.asarray(starts[:self.positions], dtype=np.int64), stream

    def _positions(self, window: np.ndarray, teacher_ids: list[int], starts: np.ndarray):
        """For each student position j that the teacher's tokens cover: (j, x the bytes read, k the
        teacher token holding the last of them, first the student token where token k starts,
        whether token k starts at a student boundary, whether it ends at x)."""
        bounds = np.concatenate([[0], np.cumsum(self.student_lengths[window])])  # where each student token starts
        ends = starts + self.teacher_lengths[np.asarray(teacher_ids, dtype=np.int64)]
        for j, x in enumerate(bounds[1:-1]):  # position j has read up to byte x
            k = int(np.searchsorted(starts, x - 1, side="right")) - 1  # the teacher token holding the last byte read
            if k < 0 or x > ends[k]:
                continue  # a byte no teacher token covers: the observed next token
            first = int(np.searchsorted(bounds, starts[k]))
            yield j, int(x), k, first, bool(bounds[first] == starts[k]), bool(x == ends[k])

    def endings(self, window: np.ndarray, teacher_ids: list[int], starts: np.ndarray) -> dict[int, tuple[int, int]]:
        """The positions j inside a teacher token k (after its first) where the student's pieces read
        of it, S, are a teacher token themselves: j -> (k, that token). There the text may as well
        have a teacher token end; what follows it needs the teacher run over that other split."""
        out = {}
        for j, _, k, first, on_pieces, at_end in self._positions(window, teacher_ids, starts):
            if k >= 1 and on_pieces and not at_end:
                t = self.ending.get(tuple(window[first:j + 1].tolist()))
                if t is not None:
                    out[j] = (k, t)
        return out

    def targets(self, window: np.ndarray, teacher_ids: list[int], starts: np.ndarray, stream: bytes,
                teacher_probs: torch.Tensor, ended: dict[int, tuple[int, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L - 1, V_s) target distributions at a student window's positions, from the teacher's
        (N_t, V_t) next-token probabilities over its tokens of the window (`teacher_ids` from `starts` on, of the
        window's bytes `stream`); also which positions (L - 1,) fell back to the observed next token.
        `ended`: for positions of `endings`, j -> (the teacher token S, the teacher's (V_t,) next-token
        probabilities after it in place of token k); without it such a position is conditioned on token k
        going on."""
        rows, cols, values = [], [], []  # q[row, col] += value
        for j, x, k, first, on_pieces, at_end in self._positions(window, teacher_ids, starts):
            if k >= 1:  # the teacher tokens token k could have been, going on past x
                teacher, student = (self.following.get(tuple(window[first:j + 1].tolist()), _NONE) if on_pieces
                                    else self.candidates(stream[starts[k]:x]))
                rows.append(torch.full((len(teacher),), j))
                cols.append(student)
                values.append(teacher_probs[k - 1, teacher])
            if at_end:  # token k ends here: the first piece of the token after it
                teacher, student = self.following[()]
                end = teacher_probs[k - 1, teacher_ids[k]] if k >= 1 else 1.0
                rows.append(torch.full((len(teacher),), j))
                cols.append(student)
                values.append(end * teacher_probs[k, teacher])
            elif ended and j in ended:  # a teacher token S ends here instead: the first piece after it
                t, after = ended[j]
                teacher, student = self.following[()]
                rows.append(torch.full((len(teacher),), j))
                cols.append(student)
                values.append(teacher_probs[k - 1, t] * after[teacher])
        q = torch.zeros(len(window) - 1, self.student_vocab)
        if rows:
            q.index_put_((torch.cat(rows), torch.cat(cols)), torch.cat(values).float(), accumulate=True)
        mass = q.sum(-1, keepdim=True)  # (L-1, 1)
        empty = mass[:, 0] <= 0
        q = torch.where(empty.unsqueeze(-1), 0.0, q / mass.clamp(min=1e-30))
        q[empty, torch.from_numpy(window[1:])[empty]] = 1.0  # no teacher: the observed next token
        return q, empty

    def tally(self, window: np.ndarray, q: torch.Tensor, empty: torch.Tensor, teacher_ids: list[int],
              teacher_probs: torch.Tensor) -> None:
        """Adds a window to `summary`'s measures: the aligned targets `q` scored on the student's
        observed next tokens (where they came from the teacher), the teacher's (N_t, V_t)
        probabilities on its own next tokens of the same text."""
        nxt = torch.from_numpy(window[1:].astype(np.int64))
        aligned = ~empty
        picked = q[torch.arange(len(nxt)), nxt][aligned]
        self.bits["targets"] += float(-torch.log2(picked.clamp(min=1e-30)).sum())
        self.bytes["targets"] += int(self.student_lengths[window[1:]][aligned.numpy()].sum())
        own = torch.tensor(teacher_ids[1:], dtype=torch.long)
        picked = teacher_probs[torch.arange(len(own)), own]
        self.bits["teacher"] += float(-torch.log2(picked.clamp(min=1e-30)).sum())
        self.bytes["teacher"] += int(self.teacher_lengths[own.numpy()].sum())

    def summary(self) -> dict:
        """What the alignment made of the windows seen: the share of positions with no teacher
        target, and the targets' bits per byte on the observed text beside the teacher's own."""
        per_byte = {f"{who}_bits_per_byte": self.bits[who] / self.bytes[who] if self.bytes[who] else None
                    for who in self.bits}
        return {"unaligned_fraction": self.fallback / max(self.seen, 1)} | per_byte

    def batch(self, model: torch.nn.Module, windows: np.ndarray, autocast) -> torch.Tensor:
        """(B, L - 1, V_s) targets for B student windows: the teacher run over its tokens of each
        window's text, and in the same forward over each of the window's `endings` (the token S at
        token k's position, seeing the tokens before k and itself: a 4D attention mask), right-padded."""
        read = [self.teacher_ids(w) for w in windows]
        alts = [self.endings(w, own, starts) for w, (own, starts, _) in zip(windows, read)]
        longest = max(max(len(own) + len(alt), 1) for (own, _, _), alt in zip(read, alts))
        ids = torch.full((len(windows), longest), self.teacher_tok.eos_token_id, dtype=torch.long)
        positions = torch.zeros((len(windows), longest), dtype=torch.long)
        allow = torch.eye(longest, dtype=torch.bool).repeat(len(windows), 1, 1)  # padding sees itself alone
        for row, ((own, _, _), alt) in enumerate(zip(read, alts)):
            n = len(own)
            ids[row, :n] = torch.tensor(own, dtype=torch.long)
            positions[row, :n] = torch.arange(n)
            allow[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            for a, (k, t) in enumerate(alt.values()):
                ids[row, n + a], positions[row, n + a] = t, k
                allow[row, n + a, :k] = True
        mask = torch.zeros(allow.shape).masked_fill_(~allow, torch.finfo(torch.float32).min)[:, None]
        device = next(model.parameters()).device
        with torch.inference_mode(), autocast:
            logits = model(input_ids=ids.to(device), position_ids=positions.to(device),
                           attention_mask=mask.to(device)).logits[..., :len(self.teacher_bytes)]
        probs = torch.softmax(logits.float(), dim=-1).cpu()  # (B, N_t + A, V_t)
        out = []
        for row, ((own, starts, stream), alt) in enumerate(zip(read, alts)):
            n = len(own)
            ended = {j: (t, probs[row, n + a]) for a, (j, (_, t)) in enumerate(alt.items())}
            q, empty = self.targets(windows[row], own, starts, stream, probs[row, :n], ended)
            self.tally(windows[row], q, empty, own, probs[row, :n])
            self.fallback += int(empty.sum())
            out.append(q)
        self.seen += len(windows) * (windows.shape[1] - 1)
        return torch.stack(out)
