"""The language-model pipeline (lm/dvc.yaml) end to end on a tiny GPT-2 and a tiny corpus: every
stage in this process (one built pipeline shared by the tests here), the refusals of soft labels
made with another tokenizer, vocabulary or data, every target form, streaming, a pretrained
teacher folder; under `dvc repro` (slow) with the no-op and temperature-only reruns; and
torchrun with two processes (slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import REPO, TINY_PARAMS, dvc, git_commit, make_scratch_project, repro, run_pipeline_in_process
from conftest import run_stage_in_process, write_params
from distill import checkpoint, corpus, lm, lm_soft_labels
from distill.distributed import World
from distill.errors import UserError
from distill.io import file_sha256
from distill.lm_params import LMResumeConfig, LMStudentConfig
from distill.text import tokenizer_sha256
from tiny_lm import make_corpus, tiny_lm_params

STAGES = {"prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate"}


def lm_project(root: Path, **changes) -> Path:
    """A folder laid out like lm/: its dvc.yaml, the tiny params and corpus."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "lm" / "dvc.yaml", root / "dvc.yaml")
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    make_corpus(root / "data" / "raw" / "corpus.parquet")
    write_params(root / "params.yaml", tiny_lm_params("data/raw/corpus.parquet", **changes))
    return root


def set_params(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        params[section][name] = value
    write_params(root / "params.yaml", params)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = lm_project(tmp_path_factory.mktemp("lm") / "lm")
    run_pipeline_in_process(root)
    return root


def test_a_tiny_gpt2_goes_through_every_stage(built):
    metrics = json.loads((built / "reports" / "metrics.json").read_text())
    teacher, student, baseline = (metrics[m] for m in ("teacher", "student", "baseline"))
    assert teacher["kl_bits_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert teacher["params"] > 3 * student["params"] and student["params"] == baseline["params"]
    for m in (teacher, student, baseline):
        assert 0 < m["test_bits_per_token"] < np.log2(300) + 0.5  # learnt something: below uniform's 8.2
        assert m["test_perplexity"] == pytest.approx(2 ** m["test_bits_per_token"])
        assert m["test_bits_per_byte"] == pytest.approx(m["test_bits_per_token"] * m["test_tokens"] / m["test_bytes"])
    assert student["soft_label_targets"] == "sampled 8" and student["soft_label_bytes_per_token"] > 0
    prov = json.loads((built / "data" / "soft_labels" / "provenance.json").read_text())
    meta = corpus.read_corpus_meta(built / "data" / "prepared")
    assert prov["tokenizer_sha256"] == meta.tokenizer_sha256 == tokenizer_sha256(meta.tokenizer_dir)
    assert prov["vocab_size"] == 300 and prov["samples"] == 8 and prov["positions"] == 15
    assert prov["teacher_sha256"] == file_sha256(built / "models" / "teacher.pt")
    assert prov["rows"] == meta.splits["train"]["windows"] and len(prov["shards"]) > 1  # shard_rows 40
    shard = pq.ParquetFile(built / "data" / "soft_labels" / "part-00000.parquet")
    assert str(shard.schema_arrow.field("sample_rank_deltas").type) == "fixed_size_list<element: uint16 not null>[120]"
    assert prov["schema_version"] == 4 and prov["layout"] == {"window": "int64", "sample_rank_deltas": str(
        shard.schema_arrow.field("sample_rank_deltas").type)}
    assert prov["id_order"] == "successor_ranks"
    ckpt = torch.load(built / "models" / "student.pt", weights_only=True)
    assert ckpt["soft_labels"]["teacher_sha256"] == prov["teacher_sha256"]
    assert [r["step"] for r in ckpt["history"]] == [8, 16] and "train_kl" in ckpt["history"][0]
    assert (built / ".resume").is_dir() and not list((built / ".resume").iterdir())  # saved, then removed
    page = (built / "reports" / "report.html").read_text()
    assert "Prompt 2" in page and "bits per token" in page.lower()
    compare = (built / "reports" / "compare.md").read_text()  # the gate's verdict and reason, before the samples
    assert "| bits / token | bits / byte |" in compare and "in bits per byte" in compare
    verdict = r"\nRegistry: .*; the gate (passed|failed): bits per token [\d.]+ (<=|>) [\d.]+\n\n## Samples"
    assert re.search(verdict, compare), compare
    assert 'id="gate">Registry: ' in page
    assert (built / "reports" / "figures" / "training.png").stat().st_size > 1000
    assert (built / "reports" / "curves" / "student.csv").read_text().startswith("step,val_bits_per_token")


def test_the_student_refuses_soft_labels_of_another_tokenizer_naming_both_hashes(built, tmp_path):
    other = tiny_lm_params(str(built / "data" / "raw" / "corpus.parquet"), **{"data.vocab_size": 280})
    params = write_params(tmp_path / "params.yaml", other)
    meta = corpus.prepare_corpus(load(params).data, tmp_path / "prepared")
    made_with = json.loads((built / "data" / "soft_labels" / "provenance.json").read_text())["tokenizer_sha256"]
    with pytest.raises(UserError) as err:
        lm_soft_labels.SoftLabelSet(built / "data" / "soft_labels", meta, 300)
    assert made_with in str(err.value) and meta.tokenizer_sha256 in str(err.value)
    # the same tokenizer over another split of the data: refused as stale
    same_tok = tiny_lm_params(str(built / "data" / "raw" / "corpus.parquet"), **{
        "data.tokenizer": str(built / "data" / "prepared" / "tokenizer"), "data.seed": 7})
    meta = corpus.prepare_corpus(load(write_params(tmp_path / "p2.yaml", same_tok)).data, tmp_path / "prepared2")
    assert meta.tokenizer_sha256 == made_with
    with pytest.raises(UserError, match="made over other prepared data"):
        lm_soft_labels.SoftLabelSet(built / "data" / "soft_labels", meta, 300)
    with pytest.raises(UserError, match="vocabulary of 300 ids, but the student predicts 512"):
        lm_soft_labels.SoftLabelSet(built / "data" / "soft_labels", corpus.read_corpus_meta(built / "data" / "prepared"),
                                    512)


def load(path: Path):
    from distill.config import load_params

    return load_params(path, task="language_model")


def test_a_vocabulary_larger_than_uint16_is_refused_before_any_work(built, tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.common import cli_main
    from stages import soft_labels

    words = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "tok"))
    params = tiny_lm_params(str(built / "data" / "raw" / "corpus.parquet"), **{"data.tokenizer": str(tmp_path / "tok")})
    params["data"]["source"], params["data"]["path"] = "text_files", str(tmp_path / "words.txt")
    (tmp_path / "words.txt").write_text("\n\n".join(" ".join(f"w{(d * 7 + i) % 70_000}" for i in range(40))
                                                    for d in range(30)))
    write_params(tmp_path / "params.yaml", params)
    meta = corpus.prepare_corpus(load(tmp_path / "params.yaml").data, tmp_path / "prepared")
    assert meta.vocab_size == 70_001
    teacher = lm.gpt2(load(built / "params.yaml").student.model_copy(update={"width": 4, "heads": 1}), meta, 0)
    checkpoint.save(tmp_path / "teacher.pt", teacher, lm.lm_model_args(teacher), "language_model",
                    prepared_fingerprint=meta.fingerprint)
    caplog.clear()
    code = cli_main(soft_labels.main, ["--params", str(tmp_path / "params.yaml"), "--teacher",
                                       str(tmp_path / "teacher.pt"), "--prepared", str(tmp_path / "prepared"),
                                       "--out", str(tmp_path / "s")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1 and "70,001 tokens" in errors[0] and "uint32" in errors[0], errors
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("targets", ["top_k", "dense"])
def test_every_target_form_is_stored_and_distilled_from(built, tmp_path, targets):
    root = tmp_path / "lm"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("soft_labels", "student.pt"))
    set_params(root, **{"soft_labels.targets": targets, "soft_labels.top_k": 6, "student.steps": 4,
                        "student.eval_every": 4})
    prov = run_stage_in_process(root, "soft_labels")
    sampled8 = json.loads((built / "data" / "soft_labels" / "provenance.json").read_text())
    if targets == "dense":
        assert prov["width"] == 300 and prov["bytes_per_token"] > 3 * sampled8["bytes_per_token"]
    else:  # 6 ids, 6 log-probs and the tail per position
        assert prov["width"] == 6 and prov["top_k"] == 6 and prov["samples"] is None
        assert prov["bytes_per_token"] > sampled8["bytes_per_token"] * 6 / 8
    result = run_stage_in_process(root, "train_student")
    assert np.isfinite(result["best_val_bits_per_token"]) and np.isfinite(result["history"][-1]["train_kl"])


def test_sampled_soft_labels_are_seeded_the_same_draws_again(built, tmp_path):
    root = tmp_path / "lm"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("soft_labels", "student.pt"))
    before = json.loads((built / "data" / "soft_labels" / "provenance.json").read_text())
    again = run_stage_in_process(root, "soft_labels")
    assert before["targets"] == "sampled" and before["seed"] == 0
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in before["shards"]]
    set_params(root, **{"soft_labels.seed": 1})
    other = run_stage_in_process(root, "soft_labels")
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in before["shards"]]


class Interrupted(Exception):
    pass


def test_an_interrupted_lm_training_resumes_from_its_last_save_and_ends_as_an_uninterrupted_one(built, tmp_path):
    meta = corpus.read_corpus_meta(built / "data" / "prepared")
    train, val = corpus.read_windows(meta.path, "train"), corpus.read_windows(meta.path, "val")
    soft = lm_soft_labels.SoftLabelSet(built / "data" / "soft_labels", meta, 300)
    # dropout on, soft labels streamed in blocks of 16 windows, more than one epoch (8-window batches)
    cfg = LMStudentConfig(layers=1, heads=2, width=16, steps=3 * len(train) // 8, batch_size=8, eval_every=4,
                          dropout=0.2, shuffle_buffer=16)
    assert cfg.steps > 2 * (len(train) // 8) >= 10

    def run(resume=None, stop_at: int | None = None) -> lm.LMResult:
        def on_eval(row):
            if row["step"] == stop_at:
                raise Interrupted

        job = lm.LMJob(cfg, 0, "student", distill=cfg, on_eval=on_eval, resume=resume)
        return lm.train(lm.gpt2(cfg, meta, 0), job, lm.WindowBatches(train, 8, World(), soft, 16), val)

    reference = run()
    resume = lm.resumable(lm.LMJob(cfg, 0, "student", distill=cfg), LMResumeConfig(every_steps=3, dir=str(tmp_path)),
                          meta, soft_labels="abc").resume
    with pytest.raises(Interrupted):
        run(resume, stop_at=cfg.steps - 4 - cfg.steps % 4)  # killed at a val score past an epoch's end
    assert resume.path.is_file()
    saved = torch.load(resume.path, weights_only=True)
    assert 0 < saved["in_epoch"] < len(train) // 8 and saved["step"] > len(train) // 8  # mid-epoch, past the first
    resumed = run(resume)
    assert resumed.history == reference.history  # batch order, dropout, schedule and train averages included
    assert resumed.best_step == reference.best_step and resumed.best_val_bits == reference.best_val_bits
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not resume.path.exists()  # removed once training ends
    for other in ({"soft_labels": "abd"}, {"soft_labels": "abc", "processes": 2}):
        job = lm.LMJob(cfg, 0, "student", distill=cfg)
        assert lm.resumable(job, LMResumeConfig(dir=str(tmp_path)), meta, **other).resume.path != resume.path
    assert lm.resumable(job, LMResumeConfig(every_steps=0), meta).resume is None


def test_a_killed_lm_training_stage_resumes_from_its_saved_state(built, tmp_path, monkeypatch, caplog):
    root = tmp_path / "lm"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("student.pt", ".resume"))
    real, calls = lm._loss, []

    def dies_at_step_11(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "_loss", dies_at_step_11)
    with pytest.raises(Interrupted):
        run_stage_in_process(root, "train_student")
    assert len(list((root / ".resume").glob("student-*.pt"))) == 1  # saved at steps 4 and 8
    monkeypatch.setattr(lm, "_loss", real)
    with caplog.at_level("INFO", logger="distill"):
        result = run_stage_in_process(root, "train_student")
    assert "student: resuming after step 8" in caplog.text
    uninterrupted = torch.load(built / "models" / "student.pt", weights_only=True)
    assert result["history"] == uninterrupted["history"] and not list((root / ".resume").iterdir())


def test_streamed_soft_labels_give_every_window_once_per_epoch_with_its_own_targets(built):
    meta = corpus.read_corpus_meta(built / "data" / "prepared")
    soft = lm_soft_labels.SoftLabelSet(built / "data" / "soft_labels", meta, 300)
    windows = corpus.read_windows(meta.path, "train")
    whole = next(soft.blocks(torch.Generator().manual_seed(0), 10 ** 9))
    order = np.argsort(whole.windows)
    seen = []
    for block in soft.blocks(torch.Generator().manual_seed(1), 16):  # several blocks: streamed
        assert len(block.windows) < len(windows)
        rows = np.arange(len(block.windows))
        got = block.targets(rows)
        want = whole.targets(order[block.windows])
        assert torch.equal(got.ids, want.ids) and torch.equal(got.logp, want.logp)
        seen += block.windows.tolist()
    assert sorted(seen) == list(range(len(windows)))
    batches = lm.WindowBatches(windows, 8, World(), soft, 16)
    rows = [tuple(r) for x, _, _ in batches.epoch(torch.Generator().manual_seed(2)) for r in x.tolist()]
    assert sorted(rows) == sorted(tuple(w) for w in windows.tolist())


def test_a_pretrained_teacher_folder_is_used_as_it_is_and_its_tokenizer_checked(built, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    meta = corpus.read_corpus_meta(built / "data" / "prepared")
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    lm.tokenizer(meta).save_pretrained(str(folder))
    root = tmp_path / "lm"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("models", "soft_labels"))
    set_params(root, **{"data.tokenizer": str(folder), "teacher.source": "pretrained", "teacher.model": str(folder),
                        "teacher.steps": 0})
    run_stage_in_process(root, "prepare")
    result = run_stage_in_process(root, "train_teacher")
    assert result["best_step"] == 0 and [r["step"] for r in result["history"]] == [0]
    assert result["best_val_bits_per_token"] > 7  # random weights: about log2(300) = 8.2
    # a folder whose tokenizer is not the data's: both hashes named
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace("docmark", "x") + " ")
    with pytest.raises(UserError, match=r"the tokenizer of teacher.model \(sha256 [0-9a-f]{64}\) is not the one .* "
                                        r"tokenized with \([0-9a-f]{64}\)"):
        run_stage_in_process(root, "train_teacher")


@pytest.mark.slow
def test_under_dvc_the_lm_pipeline_reruns_nothing_then_only_what_a_temperature_change_touches(
        tmp_path, flow_module, monkeypatch):
    project = make_scratch_project(tmp_path / "project", yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    root = project / "lm"
    make_corpus(root / "data" / "raw" / "corpus.parquet")
    write_params(root / "params.yaml", tiny_lm_params("data/raw/corpus.parquet") | {"tracking": {
        "enabled": True, "experiment": "tiny-lm", "on_error": "fail"}})
    git_commit(project, "tiny language-model pipeline")
    assert repro(root) == STAGES
    assert repro(root) == set(), "a second dvc repro reran stages"
    assert "lm/" not in dvc(project, "status"), "the root project sees the language-model pipeline's stages"
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    set_params(root, **{"student.temperature": 2.0})
    assert repro(root) == {"train_student", "evaluate"}
    after = json.loads((root / "reports" / "metrics.json").read_text())
    assert after["teacher"]["test_bits_per_token"] == metrics["teacher"]["test_bits_per_token"]
    assert after["student"]["test_bits_per_token"] != metrics["student"]["test_bits_per_token"]
    out = dvc(root, "exp", "run", "-S", "student.temperature=1.5")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"train_student", "evaluate"}
    # the Prefect flow from lm/, as make run-lm starts it: the change applied as dvc exp run -S does
    from pipelines.app import app
    from typer.testing import CliRunner

    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["run", "--set", "student.temperature=3"])
    assert result.exit_code == 0, result.output
    assert set(re.findall(r"(\w+) ran", result.output)) == {"train_student", "evaluate"}, result.output
    assert "bits / token" in result.output and "Samples" in result.output
    set_params(root, **{"soft_labels.samples": 4})
    assert repro(root) == {"soft_labels", "train_student", "evaluate"}
    # a sweep from lm/: each point a DVC experiment of lm/ in a clone of the whole repository, named apart
    result = CliRunner().invoke(app, ["sweep", "-S", "student.alpha=0.5,0.8"])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ") for line in result.output.splitlines() if line.startswith("| sweep-lm-alpha")]
    assert "| student bits/token |" in result.output and [row[1] for row in rows] == ["0.5", "0.8"], result.output
    assert rows[0][2] == rows[1][2] and rows[0][3] != rows[1][3]  # one teacher; two students
    shown = dvc(root, "exp", "show", "--csv")
    assert "sweep-lm-alpha0.5" in shown and "sweep-lm-alpha0.8" in shown


@pytest.mark.slow
def test_the_lm_student_trains_under_torchrun_on_two_processes(built, tmp_path):
    import subprocess
    import sys

    from scratch import env

    root = tmp_path / "lm"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("student.pt"))
    set_params(root, **{"distributed.nproc": 2})
    cmd = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train_student"]["cmd"].split()
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=root, capture_output=True, text=True,
                          env=env() | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(root / "models" / "student.pt", weights_only=True)
    one = torch.load(built / "models" / "student.pt", weights_only=True)
    # two processes see the rows one does, each batch split between them: the same model to rounding
    assert [r["step"] for r in two["history"]] == [r["step"] for r in one["history"]]
    assert two["val_bits_per_token"] == pytest.approx(one["val_bits_per_token"], rel=0.02)
