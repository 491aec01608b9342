"""Soft labels across tokenizers (distill/cross_tokenizer.py): the bytes each id stands for, the
alignment of a student window to the teacher's tokens of the same text, and the targets it makes:
exact where the teacher is certain, the teacher's own distribution when both tokenizers are one;
then the tiny pipeline with a student BPE of its own through every stage (in this process, and
under `dvc repro`, slow), its pairing checked."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_PARAMS, git_commit, make_scratch_project, repro, run_pipeline_in_process
from conftest import run_stage_in_process, write_params
from distill import checkpoint, corpus, lm, lm_soft_labels
from distill.cross_tokenizer import EOS_BYTES, Aligner, token_bytes
from distill.errors import UserError
from test_lm_pipeline import STAGES, lm_project, set_params
from tiny_lm import WORDS, make_corpus, tiny_lm_params

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
    """Targets from a teacher certain of its own next token at every position, and how many
    positions fell back to the observed next token."""
    ids, starts, stream = aligner.teacher_ids(window)
    probs = torch.zeros(len(ids), len(aligner.teacher_bytes))
    probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] = 1.0
    q, empty = aligner.targets(window, ids, starts, stream, probs)
    return q, int(empty.sum())


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
    q, empty = aligner.targets(window, ids, starts, stream, probs)
    fallback = int(empty.sum())
    # the student's position j is the teacher's position j: its target, the teacher's row j, less the
    # ids that stand for no text (the byte 0x00, which only the end-of-text stands for), renormalised
    text = torch.tensor([len(b) > 0 for b in aligner.teacher_bytes])
    expected = probs[:-1] * text
    assert fallback == 0 and torch.allclose(q, expected / expected.sum(-1, keepdim=True), atol=1e-6)


class Bigram(torch.nn.Module):
    """A teacher whose next-token logits are a row of a table, picked by the current token (so its
    positions and attention mask change nothing)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, position_ids=None, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_the_alignments_fidelity_with_one_tokenizer_for_both_is_the_teachers_own_bits_per_byte(tokenizers):
    teacher, _ = tokenizers
    aligner = Aligner(teacher, teacher, teacher_positions=64)
    windows, _ = corpus.windows(TEXTS, teacher, 20)
    table = torch.randn(len(teacher), len(teacher), generator=torch.Generator().manual_seed(1))
    table[:, [i for i, b in enumerate(aligner.teacher_bytes) if not b]] = -torch.inf  # no mass on ids with no text
    aligner.batch(Bigram(table), windows[:4], contextlib.nullcontext())
    summary = aligner.summary()
    # by hand: the bigram's -log2 p of each next token over the bytes it stands for
    log_p = torch.log_softmax(table, -1)
    bits = sum(-float(log_p[a, b]) for w in windows[:4] for a, b in zip(w[:-1], w[1:])) / np.log(2)
    size = sum(len(aligner.teacher_bytes[b]) for w in windows[:4] for b in w[1:])
    assert summary["unaligned_fraction"] == 0
    assert summary["teacher_bits_per_byte"] == pytest.approx(bits / size, rel=1e-5)
    assert summary["targets_bits_per_byte"] == pytest.approx(bits / size, rel=1e-5)


def test_inside_a_teacher_token_the_split_where_a_token_ends_there_is_run_in_the_same_forward(tokenizers):
    """Where the student's pieces read of a teacher token are a teacher token themselves, the target
    adds that token's ending, followed as the teacher continues after it: the teacher run in the same
    forward over that other split (a 4D mask) gives what a separate run over it gives."""
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(teacher), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=teacher.eos_token_id, eos_token_id=teacher.eos_token_id)).eval()
    windows, _ = corpus.windows(TEXTS, student, 24)
    batched = aligner.batch(model, windows[:6], contextlib.nullcontext())
    checked = 0
    for row, window in enumerate(windows[:6]):
        ids, starts, stream = aligner.teacher_ids(window)
        with torch.inference_mode():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            ended = {j: (t, torch.softmax(model(input_ids=torch.tensor([ids[:k] + [t]])).logits[0, -1].float(), -1))
                     for j, (k, t) in aligner.endings(window, ids, starts).items()}
        expected, _ = aligner.targets(window, ids, starts, stream, probs, ended)
        assert torch.allclose(batched[row], expected, atol=1e-5)
        conditioned, _ = aligner.targets(window, ids, starts, stream, probs)  # token k going on, as before
        for j in ended:
            assert not torch.allclose(conditioned[j], expected[j], atol=1e-4)
        checked += len(ended)
    assert checked >= 3


def test_a_students_own_bpe_gets_targets_that_score_its_text_as_the_teacher_scores_it(tokenizers):
    teacher, student = tokenizers
    # a teacher that knows the text: the bigram of its own tokens of it
    counts = torch.full((len(teacher), len(teacher)), 1e-3)
    for text in TEXTS:
        ids = teacher(text, add_special_tokens=False)["input_ids"]
        for a, b in zip(ids[:-1], ids[1:]):
            counts[a, b] += 1
    aligner = Aligner(teacher, student, teacher_positions=64)
    windows, _ = corpus.windows(TEXTS, student, 24)
    aligner.batch(Bigram(counts.log()), windows, contextlib.nullcontext())
    summary = aligner.summary()
    assert 0 < summary["unaligned_fraction"] < 0.2  # the first teacher token of each window
    # the targets lose nothing the teacher knew (taken one teacher position off, they score 7 times
    # worse); they score better than the teacher by what the student's own split of a teacher token
    # tells of it, and inside one by its going on: these texts, where a word's pieces are near certain
    # once it has begun, make that large
    assert 0.5 < summary["targets_bits_per_byte"] / summary["teacher_bits_per_byte"] < 1.0


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


def test_a_teacher_token_the_student_splits_otherwise_is_not_one_it_can_be_reading(tokenizers):
    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    split_so = {}
    for piece, read in enumerate(aligner.student_bytes):
        teacher_ids, pieces = aligner.following.get((piece,), (torch.zeros(0, dtype=torch.long),) * 2)
        for t, nxt in zip(teacher_ids.tolist(), pieces.tolist()):  # split as (piece, nxt, ...)
            assert aligner.split(aligner.teacher_bytes[t])[:2] == (piece, nxt)
        by_bytes = set(aligner.candidates(read)[0].tolist()) if read else set()
        split_so |= {aligner.teacher_bytes[t]: piece for t in by_bytes - set(teacher_ids.tolist())}
    # 'hi' begins with the byte of the student's piece 'h', but the student reads it as its one piece 'hi'
    assert split_so.get(b"hi") == student.convert_tokens_to_ids("h")
    assert aligner.split(b"hi") == (student.convert_tokens_to_ids("hi"),)


def test_where_a_teacher_token_ends_the_target_keeps_the_mass_of_it_going_on(tokenizers):
    teacher, student = tokenizers
    aligner = Aligner(teacher, student, teacher_positions=64)
    windows, _ = corpus.windows(TEXTS, student, 24)
    found = 0
    for window in windows:
        ids, starts, stream = aligner.teacher_ids(window)
        bounds = np.concatenate([[0], np.cumsum([len(aligner.student_bytes[i]) for i in window])])
        for k in range(1, len(ids) - 1):
            end = starts[k] + len(aligner.teacher_bytes[ids[k]])
            first, j = int(np.searchsorted(bounds, starts[k])), int(np.searchsorted(bounds, end)) - 1
            going_on = aligner.following.get(tuple(window[first:j + 1].tolist()))
            if going_on is None or j >= len(window) - 1:
                continue
            longer, piece = int(going_on[0][0]), int(going_on[1][0])  # a longer teacher token the student splits so
            after = aligner.split(aligner.teacher_bytes[ids[k + 1]])[0]
            if piece == after:
                continue
            probs = torch.zeros(len(ids), len(aligner.teacher_bytes))
            probs[k - 1, [ids[k], longer]] = torch.tensor([0.75, 0.25])  # token k, or it going on as `longer`
            probs[k, ids[k + 1]] = 1.0
            q, _ = aligner.targets(window, ids, starts, stream, probs)
            assert q[j, after] == pytest.approx(0.75) and q[j, piece] == pytest.approx(0.25)
            found += 1
    assert found > 3


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


# ---------------------------------------------------------------- the pipeline, with a student tokenizer of its own

CROSS = {"data.cross_tokenizer": True, "data.student_vocab_size": 270}


@pytest.fixture(scope="module")
def crossed(tmp_path_factory) -> Path:
    root = lm_project(tmp_path_factory.mktemp("cross") / "lm", **CROSS)
    run_pipeline_in_process(root)
    return root


def test_a_student_with_its_own_bpe_goes_through_every_stage_scored_in_bits_per_byte(crossed):
    teacher_meta = corpus.read_corpus_meta(crossed / "data" / "prepared")
    own = corpus.read_corpus_meta(corpus.student_view(crossed / "data" / "prepared"))
    assert (teacher_meta.vocab_size, own.vocab_size) == (300, 270)
    assert teacher_meta.tokenizer_sha256 != own.tokenizer_sha256
    prov = json.loads((crossed / "data" / "soft_labels" / "provenance.json").read_text())
    assert prov["cross_tokenizer"] and prov["vocab_size"] == 270 and prov["tokenizer_sha256"] == own.tokenizer_sha256
    assert prov["teacher_tokenizer_sha256"] == teacher_meta.tokenizer_sha256
    assert prov["teacher_prepared_fingerprint"] == teacher_meta.fingerprint
    assert prov["prepared_fingerprint"] == own.fingerprint
    assert 0 < prov["summary"]["unaligned_fraction"] < 0.25  # the first teacher token of each 16-token window
    assert prov["summary"]["targets_bits_per_byte"] > 0 and prov["summary"]["teacher_bits_per_byte"] > 0
    compare = (crossed / "reports" / "compare.md").read_text()
    assert f"the targets score {prov['summary']['targets_bits_per_byte']:.3f} bits per byte" in compare
    student, _ = checkpoint.load(crossed / "models" / "student.pt", task="language_model")
    assert lm.vocab_of(student) == 270
    metrics = json.loads((crossed / "reports" / "metrics.json").read_text())
    for m in ("teacher", "student", "baseline"):
        assert 0 < metrics[m]["test_bits_per_byte"] < 8
    assert metrics["student"]["kl_bits_per_token"] is None  # no shared vocabulary to take it over
    assert metrics["gap_closed"] is None and metrics["gap_closed_bits_per_byte"] is not None
    assert "bits / byte" in (crossed / "reports" / "compare.md").read_text()


def test_soft_labels_made_for_another_pairing_are_refused_by_name(crossed, tmp_path):
    other = lm_project(tmp_path / "other", **CROSS | {"data.vocab_size": 290})
    run_stage_in_process(other, "prepare")  # the same student view, another teacher tokenizer
    shutil.copytree(crossed / "data" / "soft_labels", other / "data" / "soft_labels")
    own = corpus.read_corpus_meta(corpus.student_view(other / "data" / "prepared"))
    teacher = corpus.read_corpus_meta(other / "data" / "prepared")
    assert own.fingerprint == corpus.read_corpus_meta(corpus.student_view(crossed / "data" / "prepared")).fingerprint
    with pytest.raises(UserError, match="another pairing of teacher tokenizer"):
        lm_soft_labels.SoftLabelSet(other / "data" / "soft_labels", own, 270, teacher)


def test_the_teachers_view_and_its_fingerprint_do_not_move_with_the_students(crossed, tmp_path):
    plain = lm_project(tmp_path / "plain")
    run_stage_in_process(plain, "prepare")
    ours = corpus.read_corpus_meta(crossed / "data" / "prepared")
    assert corpus.read_corpus_meta(plain / "data" / "prepared").fingerprint == ours.fingerprint
    assert corpus.student_view(plain / "data" / "prepared") == plain / "data" / "prepared"
    # what the teacher's fingerprint covers (all but the student's view) is what train_teacher lists as its deps
    prepared = {p.name for p in (crossed / "data" / "prepared").iterdir()}
    assert prepared == set(corpus.VIEW_FILES) | {corpus.STUDENT_VIEW}


@pytest.mark.slow
def test_under_dvc_a_cross_tokenizer_pipeline_runs_every_stage_then_nothing_then_all_but_the_teacher(tmp_path):
    project = make_scratch_project(tmp_path / "project", yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    root = project / "lm"
    make_corpus(root / "data" / "raw" / "corpus.parquet")
    write_params(root / "params.yaml", tiny_lm_params("data/raw/corpus.parquet", **CROSS))
    git_commit(project, "tiny cross-tokenizer language-model pipeline")
    assert repro(root) == STAGES
    assert repro(root) == set(), "a second dvc repro reran stages"
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["gap_closed_bits_per_byte"] is not None
    set_params(root, **{"data.student_vocab_size": 280})  # the student's tokenizer only: the teacher is kept
    assert repro(root) == STAGES - {"train_teacher"}
