"""Where the language-model student starts (student.source, distill/lm_start.py): the teacher's own
layers (the blocks taken, the embeddings and head copied), a pretrained Hugging Face folder, each
through every stage of the tiny pipeline with the baseline from the same start; and the starts that
cannot be, refused in one sentence, by `distill run`'s check before any stage where it can know."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_pipeline_in_process
from distill import checkpoint, corpus, lm, lm_start
from distill.config import load_params
from distill.errors import UserError
from distill.io import file_sha256, tree_sha256
from distill.lm_params import LMStudentConfig
from pipelines.overrides import check_files
from test_lm_pipeline import lm_project, set_params

# a teacher of 4 blocks and a student of its width and heads taking 2 of them
LAYERED = {"teacher.layers": 4, "student.source": "teacher_layers", "student.model": "models/teacher.pt",
           "student.layers": 2, "student.width": 48, "student.heads": 2}


def params_of(root: Path):
    return load_params(root / "params.yaml", task="language_model")


def refusal(call) -> str:
    """The one sentence a UserError raised by `call` says."""
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> Path:
    """The tiny pipeline, its student and baseline started from the teacher's blocks 0 and 2, run
    through every stage after `distill run`'s check (the teacher not trained yet)."""
    root = lm_project(tmp_path_factory.mktemp("layered") / "lm", **LAYERED)
    check_files(root, params_of(root))
    run_pipeline_in_process(root)
    return root


def test_blocks_are_taken_evenly_spaced_from_the_first():
    assert lm_start.taken_blocks(4, 2) == [0, 2]  # every other one for half the depth
    assert lm_start.taken_blocks(4, 4) == [0, 1, 2, 3] and lm_start.taken_blocks(4, 1) == [0]
    assert lm_start.taken_blocks(12, 6) == [0, 2, 4, 6, 8, 10] and lm_start.taken_blocks(4, 3) == [0, 1, 2]


def test_teacher_layers_copies_the_chosen_blocks_the_embeddings_the_final_norm_and_the_head(layered):
    meta = corpus.read_corpus_meta(layered / "data" / "prepared")
    teacher = torch.load(layered / "models" / "teacher.pt", weights_only=True)["state_dict"]
    student = lm_start.teacher_layers(params_of(layered).student.model_copy(update={"model": str(
        layered / "models" / "teacher.pt")}), meta).state_dict()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.ln_f.bias", "lm_head.weight"):
        assert torch.equal(student[name], teacher[name]), name
    assert student["lm_head.weight"].data_ptr() == student["transformer.wte.weight"].data_ptr()  # still tied
    blocks = [name.removeprefix("transformer.h.0.") for name in student if name.startswith("transformer.h.0.")]
    assert blocks and not any(name.startswith("transformer.h.2.") for name in student)
    for own, taken in ((0, 0), (1, 2)):
        for rest in blocks:
            assert torch.equal(student[f"transformer.h.{own}.{rest}"], teacher[f"transformer.h.{taken}.{rest}"])
    skipped = "attn.c_attn.weight"
    assert not torch.equal(student[f"transformer.h.1.{skipped}"], teacher[f"transformer.h.1.{skipped}"])


def test_a_teacher_layers_student_and_its_baseline_go_through_every_stage_from_the_same_start(layered):
    metrics = json.loads((layered / "reports" / "metrics.json").read_text())
    assert metrics["student"]["params"] == metrics["baseline"]["params"] < metrics["teacher"]["params"]
    start = file_sha256(layered / "models" / "teacher.pt")
    for role in ("student", "baseline"):
        ckpt = torch.load(layered / "models" / f"{role}.pt", weights_only=True)
        assert (ckpt["source"], ckpt["start_sha256"]) == ("teacher_layers", start), role
        assert ckpt["model_args"]["config"]["n_layer"] == 2 and ckpt["model_args"]["config"]["n_embd"] == 48
    stages = yaml.safe_load((layered / "dvc.yaml").read_text())["stages"]
    for stage in ("train_student", "train_baseline"):  # DVC runs them after train_teacher, which makes the start
        assert "${student.model}" in stages[stage]["deps"]
    assert {"student.source", "student.model"} <= set(stages["train_baseline"]["params"])


@pytest.mark.parametrize("change, said", [
    ({"student.width": 32, "student.heads": 2}, "student.width 32 and student.heads 2 must be the teacher's"),
    ({"student.layers": 5}, "student.layers 5 is more than the teacher's"),
])
def test_a_student_that_cannot_take_the_teachers_layers_is_refused_by_check_and_by_the_stage(
        layered, tmp_path, change, said):
    # before any stage: the pipeline's teacher is not there yet, so it is sized by teacher.*
    fresh = lm_project(tmp_path / "fresh", **LAYERED | change)
    message = refusal(lambda: check_files(fresh, params_of(fresh)))
    assert said in message and "(teacher.*)" in message
    assert ("width 48 and heads 2" if "student.width" in change else "4 layers") in message
    # the stage, from the trained teacher's checkpoint
    meta = corpus.read_corpus_meta(layered / "data" / "prepared")
    cfg = params_of(fresh).student.model_copy(update={"model": str(layered / "models" / "teacher.pt")})
    message = refusal(lambda: lm_start.start(cfg, meta, 0))
    assert said in message and "teacher.pt" in message


def test_a_checkpoint_that_is_not_a_language_models_is_refused_before_any_stage(layered, tmp_path):
    net = torch.nn.Linear(3, 2)
    checkpoint.save(tmp_path / "classifier.pt", net, {"arch": "mlp"}, "classify")
    root = lm_project(tmp_path / "lm", **LAYERED | {"student.model": str(tmp_path / "classifier.pt")})
    assert "a classify checkpoint, not a language_model one" in refusal(lambda: check_files(root, params_of(root)))
    set_params(root, **{"student.model": str(tmp_path / "nothing.pt")})
    assert "nothing.pt: no such checkpoint; set student.model" in refusal(lambda: check_files(root, params_of(root)))
    set_params(root, **{"student.model": str(layered / "models" / "teacher.pt")})  # another pipeline's: read
    check_files(root, params_of(root))
    set_params(root, **{"student.layers": 5})
    assert "student.layers 5 is more than the teacher's" in refusal(lambda: check_files(root, params_of(root)))


def test_a_start_needs_a_model():
    with pytest.raises(ValueError, match="student.model is required when student.source is 'pretrained'"):
        LMStudentConfig(source="pretrained")


def tiny_gpt2_folder(folder: Path, meta) -> Path:
    """A GPT-2 of 2 blocks of width 24 saved by transformers, the prepared tokenizer saved into it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=meta.vocab_size, n_positions=32, n_embd=24, n_layer=2, n_head=3)
    GPT2LMHeadModel(config).save_pretrained(folder)
    lm.tokenizer(meta).save_pretrained(str(folder))
    return folder


def test_a_pretrained_student_folder_goes_through_every_stage_with_its_baseline(layered, tmp_path, monkeypatch):
    folder = tiny_gpt2_folder(tmp_path / "gpt2", corpus.read_corpus_meta(layered / "data" / "prepared"))
    root = lm_project(tmp_path / "lm", **{"data.tokenizer": str(folder), "student.source": "pretrained",
                                          "student.model": str(folder)})
    check_files(root, params_of(root))
    keys, resumable = {}, lm.resumable
    monkeypatch.setattr(lm, "resumable", lambda job, cfg, meta, **inputs: keys.setdefault(job.name, inputs)
                        and resumable(job, cfg, meta, **inputs))
    run_pipeline_in_process(root)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["student"]["params"] == metrics["baseline"]["params"]
    for role in ("student", "baseline"):
        ckpt = torch.load(root / "models" / f"{role}.pt", weights_only=True)
        assert (ckpt["source"], ckpt["start_sha256"]) == ("pretrained", tree_sha256(folder)), role
        config = ckpt["model_args"]["config"]  # the folder's own size, not student.layers 1 and width 16
        assert (config["n_layer"], config["n_embd"]) == (2, 24), role
        assert keys[role]["start_sha256"] == tree_sha256(folder), role  # the saved state is the start's


def test_a_pretrained_student_of_another_tokenizer_is_refused_by_check_and_by_the_stage(layered, tmp_path):
    meta = corpus.read_corpus_meta(layered / "data" / "prepared")
    good = tiny_gpt2_folder(tmp_path / "good", meta)
    bad = shutil.copytree(good, tmp_path / "bad")
    (bad / "tokenizer.json").write_text((bad / "tokenizer.json").read_text() + " ")
    root = lm_project(tmp_path / "lm", **{"data.tokenizer": str(good), "student.source": "pretrained",
                                          "student.model": str(bad)})
    said = r"the tokenizer of student.model \(sha256 [0-9a-f]{64}\) is not the one the data was tokenized with"
    for message in (refusal(lambda: check_files(root, params_of(root))),
                    refusal(lambda: lm_start.start(params_of(root).student, meta, 0))):
        assert re.search(said, message) and message.startswith(str(bad)), message
        assert "data.cross_tokenizer: true with data.student_tokenizer its folder" in message
    set_params(root, **{"student.model": str(tmp_path / "none")})
    assert "not a Hugging Face model folder (no config.json); set student.model" in refusal(
        lambda: check_files(root, params_of(root)))
