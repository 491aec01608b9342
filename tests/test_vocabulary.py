"""A text student's own vocabulary and first embeddings (distill/vocabulary.py): the rows it keeps,
the teacher's embeddings it starts from, the baseline starting from the same, and a checkpoint
of a cut table rebuilding to the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_stage_in_process
from distill import data, vocabulary
from distill.checkpoint import build_model
from distill.classification_params import StudentConfig, TeacherConfig
from distill.errors import UserError
from test_text_pipeline import text_project


def test_row_map_gives_the_padding_row_0_kept_ids_their_rows_and_the_rest_one_row():
    rows = vocabulary.row_map(np.array([3, 7, 8]), vocab_size=10, pad_id=0)
    assert rows.tolist() == [0, 1, 1, 2, 1, 1, 1, 3, 4, 1]


def test_projection_keeps_the_leading_components_at_unit_variance_and_refuses_a_wider_student():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(200, 3, generator=gen) * torch.tensor([5.0, 1.0, 0.1]) + 7.0
    out = vocabulary.projected(table, 2)
    assert out.shape == (200, 2)
    assert torch.allclose(out.std(0), torch.ones(2), atol=1e-5) and torch.allclose(out.mean(0), torch.zeros(2), atol=1e-5)
    # the first component is the widest direction of the table (its first axis), up to sign
    assert abs(float(torch.corrcoef(torch.stack([out[:, 0], table[:, 0]]))[0, 1])) > 0.99
    with pytest.raises(UserError, match="embedding_dim = 4 is not allowed.*3 wide"):
        vocabulary.projected(table, 4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = text_project(tmp_path_factory.mktemp("vocab") / "text")
    run_stage_in_process(root, "prepare")
    return root


def test_a_cut_table_from_the_teacher_embeddings_is_the_same_start_for_student_and_baseline(prepared, monkeypatch):
    monkeypatch.chdir(prepared)
    meta = data.read_meta("data/prepared")
    cfg = StudentConfig(arch="auto", channels=[8, 8], kernel_sizes=[2, 3], embedding_dim=8, hidden=[],
                        vocabulary="used", embedding_init="teacher")
    teacher = TeacherConfig(source="pretrained", model="bert")
    start = vocabulary.student_start(cfg, teacher, "data/prepared")
    torch.manual_seed(0)
    model, args = start(meta)
    ids = vocabulary.used_ids("data/prepared", meta.tokens["pad_id"])
    assert 0 < len(ids) < meta.tokens["vocab_size"] - 1 and args["vocab_rows"] == len(ids) + 2
    assert model.embed.weight.shape == (len(ids) + 2, 8)
    expected = vocabulary.projected(vocabulary.teacher_table("bert"), 8)[torch.from_numpy(ids)]
    assert torch.allclose(model.embed.weight[2:], expected)
    assert not model.embed.weight[:2].any()  # padding, and the ids training never saw
    torch.manual_seed(0)
    again, _ = start(meta)  # what the baseline starts from, with the same seed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a checkpoint of the cut table rebuilds from its model_args and weights to the same outputs
    rebuilt = build_model(args)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.from_numpy(data.read_split("data/prepared", "test").x[:16])
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))
    # an id unseen in training reads the shared row, not another word's
    unseen = next(i for i in range(meta.tokens["vocab_size"]) if i not in set(ids) and i != meta.tokens["pad_id"])
    assert int(model.rows[unseen]) == vocabulary.UNSEEN_ROW


def test_untouched_settings_keep_the_plain_student_and_the_teacher_embeddings_need_a_pretrained_teacher(prepared,
                                                                                                        monkeypatch):
    monkeypatch.chdir(prepared)
    plain = StudentConfig(arch="auto", embedding_dim=8)
    assert vocabulary.student_start(plain, TeacherConfig(), "data/prepared") is None
    wants = StudentConfig(arch="auto", embedding_dim=8, embedding_init="teacher")
    start = vocabulary.student_start(wants, TeacherConfig(source="train"), "data/prepared")
    with pytest.raises(UserError, match="embedding_init: teacher reads the input embeddings.*teacher.source is train"):
        start(data.read_meta("data/prepared"))


def test_the_run_refuses_teacher_embeddings_without_a_teacher_folder_before_any_stage():
    from distill.classification import ClassificationTask
    from distill.classification_params import Params

    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["student"]["embedding_init"] = "teacher"  # the MNIST-1D teacher is trained here
    with pytest.raises(UserError, match="embedding_init: teacher .* teacher.source is train"):
        ClassificationTask().check(Params.model_validate(params))
