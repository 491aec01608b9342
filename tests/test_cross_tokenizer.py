"""Soft labels across tokenizers (distill/cross_tokenizer.py): the bytes each id stands for, the
alignment of a student window to the teacher's tokens of the same text, and the targets it makes:
exact where the teacher is certain, the teacher's own distribution when both tokenizers are one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import corpus
from distill.cross_tokenizer import EOS_BYTES, Aligner, token_bytes
from tiny_lm import WORDS

TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) + " café naïve" for i in range(0, 40, 3)]


@pytest.fixture(scope="module")
def tokenizers():
    return corpus.train_tokenizer(TEXTS, 320), corpus.train_tokenizer(TEXTS, 270)


def test_a_byte_level_bpes_ids_stand_for_the_texts_bytes_and_end_of_text_is_one_byte(tokenizers):
    teacher, _ = tokenizers
    table = token_bytes(teacher)
    ids = teacher(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == TEXTS[0].encode("utf-8")  # é and ï are two bytes each
    assert table[teacher.eos_token_id] == EOS_BYTES and len(table) == len(teacher)


def oracle(aligner: Aligner, window: np.ndarray) -> tuple[torch.Tensor, int]:
    """Targets from a teacher certain of its own next token at every position."""
    ids, starts, stream = aligner.teacher_ids(window)
    probs = torch.zeros(len(ids), len(aligner.teacher_bytes))
    probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] = 1.0
    return aligner.targets(window, ids, starts, stream, probs)


def test_a_certain_teacher_gives_the_students_own_next_token_at_every_aligned_position(tokenizers):
    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    windows, _ = corpus.windows(TEXTS, student, 24)
    assert len(windows) > 5
    for window in windows:
        q, fallback = oracle(aligner, window)
        assert torch.allclose(q.sum(-1), torch.ones(len(window) - 1))
        assert (q.argmax(-1).numpy() == window[1:]).all()  # the fallback is the next token too
        ids, starts, _ = aligner.teacher_ids(window)
        after = np.cumsum([len(aligner.student_bytes[i]) for i in window])[:-1]
        inside_first = int((after < starts[0] + len(aligner.teacher_bytes[ids[0]])).sum())
        assert fallback == inside_first  # only inside the first teacher token, which has no context before it


def test_with_one_tokenizer_for_both_the_targets_are_the_teachers_distributions(tokenizers):
    teacher, _ = tokenizers
    aligner = Aligner(teacher, teacher, teacher_positions=64)
    window, _ = corpus.windows(TEXTS[:2], teacher, 20)
    window = window[1]
    ids, starts, stream = aligner.teacher_ids(window)
    assert ids == window.tolist()  # the same text, the same tokens
    probs = torch.softmax(torch.randn(len(ids), len(teacher), generator=torch.Generator().manual_seed(0)), -1)
    q, fallback = aligner.targets(window, ids, starts, stream, probs)
    # the student's position j is the teacher's position j: its target, the teacher's row j, less the
    # ids that stand for no text (the byte 0x00, which only the end-of-text stands for), renormalised
    text = torch.tensor([len(b) > 0 for b in aligner.teacher_bytes])
    expected = probs[:-1] * text
    assert fallback == 0 and torch.allclose(q, expected / expected.sum(-1, keepdim=True), atol=1e-6)


def test_inside_a_teacher_token_the_target_is_conditioned_on_what_was_read(tokenizers):
    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    # a teacher token the student splits: find one whose bytes are two or more student tokens
    table = aligner.teacher_bytes
    long = next(t for t in range(len(table)) if len(table[t]) > 3
                and len(student(table[t].decode("utf-8", "ignore"), add_special_tokens=False)["input_ids"]) > 1)
    first = student(table[long].decode("utf-8"), add_special_tokens=False)["input_ids"][0]
    read = aligner.student_bytes[first]
    teacher_ids, pieces = aligner.candidates(read)
    assert long in teacher_ids.tolist()
    assert all(table[t].startswith(read) and len(table[t]) > len(read) for t in teacher_ids.tolist())
    rest = table[long][len(read):]
    expected = student(rest.decode("utf-8"), add_special_tokens=False)["input_ids"][0]
    assert pieces[teacher_ids.tolist().index(long)] == expected


def test_documents_align_at_their_end_of_text(tokenizers):
    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    stream = np.concatenate([student("the film", add_special_tokens=False)["input_ids"], [student.eos_token_id],
                             student("a story", add_special_tokens=False)["input_ids"]])
    ids, starts, _ = aligner.teacher_ids(stream)
    assert teacher.eos_token_id in ids
    eos_at = starts[ids.index(teacher.eos_token_id)]
    assert eos_at == len(b"the film")


def test_a_window_longer_than_the_teachers_positions_falls_back_past_them(tokenizers):
    teacher, student = tokenizers
    windows, _ = corpus.windows(TEXTS, student, 40)
    aligner = Aligner(teacher, student, teacher_positions=8)
    q, fallback = oracle(aligner, windows[0])
    assert fallback > 20 and (q.argmax(-1).numpy() == windows[0][1:]).all()
