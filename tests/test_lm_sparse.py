"""Sparse per-token soft labels (distill/sparse.py): packing, random-sampling KD, and the forward KL to
them (distill/lm_losses.py's kl_to_targets)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from distill import sparse
from distill.lm_losses import kl_to_targets
from distill.errors import UserError

V, P, B = 50, 7, 3


def teacher_logits(seed=0, scale=3.0):
    return torch.randn(B, P, V, generator=torch.Generator().manual_seed(seed)) * scale


def dense_kl(teacher, student, temperature=1.0):
    log_t = F.log_softmax(teacher / temperature, -1)
    return (log_t.exp() * (log_t - F.log_softmax(student / temperature, -1))).sum(-1)


@pytest.mark.parametrize("targets,width", [("dense", V), ("top_k", 8), ("sampled", 16)])
def test_packing_round_trips_through_parquet(tmp_path, targets, width):
    kept = sparse.select(teacher_logits(), targets, width, torch.Generator().manual_seed(1))
    sch = sparse.schema(targets, P, width, "uint16")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_batches([sparse.pack(kept, np.arange(B), sch)]), path)
    back = sparse.unpack(pq.read_table(path), targets, P)
    table = pq.read_table(path)
    assert table.column("window").to_pylist() == [0, 1, 2]
    if targets == "dense":
        assert back.ids is None
        torch.testing.assert_close(back.logp, kept["logprobs"], atol=0.02, rtol=1e-3)  # float16
        assert table.schema.field("logprobs").type.value_type == pa.float16()
        return
    assert torch.equal(back.ids, kept["ids"])
    assert table.schema.field(sparse.TARGET_COLUMNS[targets][0]).type.value_type == pa.uint16()
    if targets == "top_k":
        torch.testing.assert_close(back.logp, kept["logprobs"], atol=0.02, rtol=1e-3)
        torch.testing.assert_close(back.tail, kept["tail"], atol=1e-3, rtol=1e-3)
        # the tail is what the top k leave: with it, each position's mass is 1
        torch.testing.assert_close(back.logp.exp().sum(-1) + back.tail, torch.ones(B, P), atol=5e-3, rtol=0)
    else:
        torch.testing.assert_close(back.logp.exp(), kept["weights"], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(back.logp.exp().sum(-1), torch.ones(B, P), atol=1e-3, rtol=0)


@pytest.mark.parametrize("tail", ["zero", "uniform", "bucket"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_kl_equals_dense_kl_when_k_is_the_vocabulary(tail, temperature):
    teacher, student = teacher_logits(0), teacher_logits(1, 1.0)
    kept = sparse.select(teacher, "top_k", V)
    t = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    got = kl_to_targets(student, t, temperature, tail)
    torch.testing.assert_close(got, dense_kl(teacher, student, temperature), atol=1e-5, rtol=1e-5)
    every = sparse.select(teacher, "dense", V)["logprobs"]
    dense = kl_to_targets(student, sparse.Targets(None, every), temperature)
    torch.testing.assert_close(dense, dense_kl(teacher, student, temperature), atol=1e-5, rtol=1e-5)


def test_a_uniform_tail_is_the_dense_kl_to_the_spread_distribution():
    teacher, student = teacher_logits(0), teacher_logits(1, 1.0)
    kept = sparse.select(teacher, "top_k", 5)
    t = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    for tail in ("zero", "uniform"):
        q = t.dense_probs(V, tail)
        torch.testing.assert_close(q.sum(-1), torch.ones(B, P))
        log_q = q.clamp(min=1e-30).log()
        want = (q * (log_q - F.log_softmax(student, -1))).sum(-1)
        torch.testing.assert_close(kl_to_targets(student, t, 1.0, tail), want, atol=1e-5, rtol=1e-4)


def test_a_bucket_tail_is_the_kl_over_the_k_ids_and_one_outcome_for_the_rest():
    teacher, student = teacher_logits(0), teacher_logits(1, 1.0)
    kept = sparse.select(teacher, "top_k", 5)
    t = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    p = torch.cat([kept["logprobs"].exp(), kept["tail"].unsqueeze(-1)], -1)
    q_all = F.softmax(student, -1)
    q_kept = q_all.gather(-1, kept["ids"])
    q = torch.cat([q_kept, 1 - q_kept.sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kl_to_targets(student, t, 1.0, "bucket"), want, atol=1e-5, rtol=1e-4)


def test_the_sparse_kl_is_zero_at_the_target_and_its_gradient_is_finite():
    teacher = teacher_logits(0)
    kept = sparse.select(teacher, "sampled", 12, torch.Generator().manual_seed(0))
    t = sparse.Targets(kept["ids"], kept["weights"].log())  # padding: log 0 = -inf
    student = teacher_logits(2, 1.0).requires_grad_()
    loss = kl_to_targets(student, t).mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # the student that puts exactly the target's mass on the target's ids: zero KL
    target = t.dense_probs(V).clamp(min=1e-12).log()
    assert float(kl_to_targets(target, t).abs().max()) < 1e-4


def test_random_sampling_targets_average_to_the_teachers_distribution():
    logits = teacher_logits(0, 2.0)[:1, :2]
    p = F.softmax(logits, -1)
    draws = 2000  # independent sets of 12 draws, at once: the same positions repeated
    kept = sparse.sample(F.log_softmax(logits, -1).expand(draws, -1, -1), 12, torch.Generator().manual_seed(0))
    mean = sparse.Targets(kept["ids"], kept["weights"].log()).dense_probs(V).mean(0, keepdim=True)
    # unbiased: the error shrinks like 1 / sqrt(draws * n), far below the top-12 truncation's
    assert float((mean - p).abs().max()) < 0.01
    top = sparse.select(logits, "top_k", 12)
    truncated = sparse.Targets(top["ids"], top["logprobs"], top["tail"]).dense_probs(V, "zero")
    assert float((mean - p).abs().sum()) < float((truncated - p).abs().sum()) / 3


def test_a_vocabulary_larger_than_the_id_type_is_refused_by_name():
    sparse.check_id_type(65_536, "uint16")
    with pytest.raises(UserError, match=r"70,000 tokens.*uint16.*65,536.*uint32"):
        sparse.check_id_type(70_000, "uint16")
    sparse.check_id_type(70_000, "uint32")
