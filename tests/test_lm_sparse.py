"""Sparse per-token soft labels (distill/sparse.py): packing, random-sampling KD, the forward KL to
them (distill/lm_losses.py's kl_to_targets), and the sampled targets' layout read back streaming
(distill/lm_soft_labels.py) exactly as the fixed layout held them."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from distill import lm_soft_labels, sparse
from distill.corpus import CorpusMeta
from distill.id_ranks import SuccessorRanks
from distill.lm_losses import kl_to_targets
from distill.errors import UserError

V, P, B = 50, 7, 3


def train_windows(n, seed=0) -> np.ndarray:
    """(n, P + 1) token windows in which each token is mostly followed by one of two others."""
    gen = np.random.default_rng(seed)
    windows = np.empty((n, P + 1), np.int64)
    windows[:, 0] = gen.integers(0, V, n)
    for j in range(1, P + 1):
        windows[:, j] = np.where(gen.random(n) < 0.8, (windows[:, j - 1] * 3 + gen.integers(1, 3, n)) % V,
                                 gen.integers(0, V, n))
    return windows


RANKS = SuccessorRanks(train_windows(B), V)


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
    pq.write_table(pa.Table.from_batches([sparse.pack(kept, np.arange(B), sch, RANKS)]), path)
    back = sparse.unpack(pq.read_table(path), targets, P, RANKS)
    table = pq.read_table(path)
    assert table.column("window").to_pylist() == [0, 1, 2]
    if targets == "dense":
        assert back.ids is None
        torch.testing.assert_close(back.logp, kept["logprobs"], atol=0.02, rtol=1e-3)  # float16
        assert table.schema.field("logprobs").type.value_type == pa.float16()
        return
    assert torch.equal(back.ids, kept["ids"])
    assert table.schema.field(sparse.TARGET_COLUMNS[targets][0]).type.value_type == pa.uint16()
    held = sparse.stored_columns(table, targets, P, RANKS)  # in memory: (B, P, width) arrays
    assert sparse.held_bytes(table.schema, targets, P, width) == sum(a.nbytes for a in held.values()) / B
    if targets == "top_k":
        torch.testing.assert_close(back.logp, kept["logprobs"], atol=0.02, rtol=1e-3)
        torch.testing.assert_close(back.tail, kept["tail"], atol=1e-3, rtol=1e-3)
        # the tail is what the top k leave: with it, each position's mass is 1
        torch.testing.assert_close(back.logp.exp().sum(-1) + back.tail, torch.ones(B, P), atol=5e-3, rtol=0)
    else:  # the distinct ids and their counts: weights count / n exactly, ids ascending, then the padding
        assert torch.equal(back.logp.exp(), kept["weights"]) and torch.equal(back.logp.exp().sum(-1), torch.ones(B, P))
        used = kept["counts"] > 0
        assert torch.equal(used, used.int().sort(dim=-1, descending=True, stable=True).values.bool())
        assert bool((kept["ids"][..., 1:] > kept["ids"][..., :-1])[used[..., 1:]].all())
        assert torch.equal(kept["counts"].sum(-1), torch.full((B, P), width))
        # every draw stored as its rank, ascending: the first rank, then the steps between them (0 for a repeat)
        drawn = kept["draws"][0, 0].tolist()
        assert drawn == sorted(drawn) and len(set(drawn)) < width  # some ids drawn more than once
        ranked = sorted(RANKS.encode(np.array([0]), np.array([[drawn]]))[0, 0].tolist())
        assert table.column("sample_rank_deltas")[0].values.to_pylist()[:width] == ranked[:1] + np.diff(ranked).tolist()
        assert np.array_equal(held["sample_draws"], kept["draws"].numpy())  # every draw read back as drawn
        layout = str(table.schema.field("sample_rank_deltas").type)
        assert layout == f"fixed_size_list<element: uint16 not null>[{P * width}]"


def test_no_rows_of_sampled_targets_read_back_as_no_rows():
    sch = sparse.schema("sampled", P, 16, "uint16")
    held = sparse.stored_columns(sch.empty_table(), "sampled", P, RANKS)
    assert held["sample_draws"].shape == (0, P, 16)


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


@pytest.mark.parametrize("sampling", ["multinomial", "systematic"])
def test_random_sampling_targets_average_to_the_teachers_distribution(sampling):
    logits = teacher_logits(0, 2.0)[:1, :2]
    p = F.softmax(logits, -1)
    draws = 2000  # independent sets of 12 draws, at once: the same positions repeated
    kept = sparse.sample(F.log_softmax(logits, -1).expand(draws, -1, -1), 12, torch.Generator().manual_seed(0),
                         sampling)
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


# ---------------------------------------------------------------- the sampled targets' layout, streamed


def header(version=lm_soft_labels.TARGETS_SCHEMA_VERSION, width=32) -> dict:
    return {"schema_version": version, "task": "language_model", "targets": "sampled", "tokenizer_sha256": "tok",
            "vocab_size": V, "prepared_fingerprint": "fp", "positions": P, "width": width, "samples": width}


def corpus_meta(tmp_path) -> CorpusMeta:
    return CorpusMeta(vocab_size=V, context_length=P + 1, eos_id=0, tokenizer_sha256="tok", splits={},
                      fingerprint="fp", path=tmp_path)


def write_train(folder, windows: np.ndarray) -> None:
    """train.parquet of prepared data, as distill/corpus.py writes it."""
    pq.write_table(pa.table({"window": np.arange(len(windows)), "ids": pa.FixedSizeListArray.from_arrays(
        pa.array(windows.reshape(-1), pa.int32()), windows.shape[1])}), folder / "train.parquet")


def write_sampled(folder, logp, draws=32, batch=2, shard_rows=3) -> dict:
    """A soft-label set of `logp`'s (N, P, V) windows, `draws` draws each: batches of `batch` windows
    in shards of `shard_rows` (one row group each, far below SAMPLED_GROUP_ROWS), through the stage's writer;
    the train windows they rank by beside it, in folder's parent (`corpus_meta`'s prepared data)."""
    folder.mkdir()
    windows = train_windows(len(logp), seed=len(logp))
    write_train(folder.parent, windows)
    ranks = SuccessorRanks(windows, V)
    gen = torch.Generator().manual_seed(5)
    sch = sparse.schema("sampled", P, draws, "uint16")
    batches = (sparse.pack(sparse.sample(logp[s:s + batch], draws, gen), np.arange(s, s + len(logp[s:s + batch])),
                           sch, ranks) for s in range(0, len(logp), batch))
    return lm_soft_labels.write_set(batches, folder, sch, header(width=draws), shard_rows)


def fixed_layout_targets(folder, logp, draws=32, batch=2) -> sparse.Targets:
    """What schema 1 stored of the same draws and read back: per position the distinct ids, largest
    count first, as a fixed-size list of `draws` uint16 ids and float16 weights count / draws, padded
    with weight 0 (the weights' log, as its reader gave them to the student)."""
    gen, ids, weights = torch.Generator().manual_seed(5), [], []
    for s in range(0, len(logp), batch):
        probs = logp[s:s + batch].reshape(-1, V).exp()
        drawn = torch.multinomial(probs, draws, replacement=True, generator=gen)  # the same draws, in the same order
        counts = torch.zeros_like(probs).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=probs.dtype))
        w, i = counts.topk(draws, dim=-1)
        ids.append(torch.where(w > 0, i, 0).reshape(-1, P * draws))
        weights.append((w / draws).reshape(-1, P * draws))
    ids, weights = torch.cat(ids).numpy().astype(np.uint16), torch.cat(weights).numpy().astype(np.float16)
    table = pa.table({"sample_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), P * draws),
                      "sample_weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), P * draws)})
    pq.write_table(table, folder / "fixed.parquet", compression="zstd")
    back = pq.read_table(folder / "fixed.parquet")
    columns = {c: back.column(c).combine_chunks().flatten().to_numpy().reshape(len(logp), P, draws)
               for c in ("sample_ids", "sample_weights")}
    return sparse.Targets(torch.from_numpy(columns["sample_ids"].astype(np.int64)),
                          torch.from_numpy(columns["sample_weights"].astype(np.float32)).log())


def by_id(t: sparse.Targets) -> sparse.Targets:
    """The same targets with each position's ids in ascending order, the padding (log-weight -inf) last."""
    order = torch.where(torch.isinf(t.logp), V + t.ids, t.ids).argsort(dim=-1, stable=True)
    return sparse.Targets(t.ids.gather(-1, order), t.logp.gather(-1, order))


def test_sampled_targets_stream_back_exactly_as_the_fixed_layout_held_the_same_draws(tmp_path):
    logp = F.log_softmax(torch.randn(9, P, V, generator=torch.Generator().manual_seed(3)) * 2.5, -1)
    prov = write_sampled(tmp_path / "set", logp)
    assert prov["rows"] == 9 and len(prov["shards"]) == 3
    soft = lm_soft_labels.SoftLabelSet(tmp_path / "set", corpus_meta(tmp_path), V)
    assert soft.window_bytes == P * 32 * 2  # every draw's uint16 id, in memory
    blocks = list(soft.blocks(torch.Generator().manual_seed(0), 4))  # streamed: a row group per 3-row shard
    assert len(blocks) > 1
    order = np.argsort(np.concatenate([b.windows for b in blocks]))  # the blocks' rows in window order
    got = [b.targets(np.arange(len(b.windows))) for b in blocks]
    got = sparse.Targets(torch.cat([t.ids for t in got])[order], torch.cat([t.logp for t in got])[order])
    old = fixed_layout_targets(tmp_path, logp)
    assert got.ids.shape == old.ids.shape == (9, P, 32)
    new, old = by_id(got), by_id(old)
    assert torch.equal(new.ids, old.ids) and torch.equal(new.logp, old.logp)  # bit for bit, padding included
    assert float(torch.isfinite(old.logp).sum(-1).float().mean()) > 5  # several distinct ids per position


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_sampled_set_in_an_older_layout_is_refused_by_name(tmp_path, version):
    write_sampled(tmp_path / "set", F.log_softmax(torch.randn(4, P, V), -1))
    path = tmp_path / "set" / "provenance.json"
    prov = json.loads(path.read_text())
    path.write_text(json.dumps(prov | {"schema_version": version}))
    with pytest.raises(UserError, match=rf"{path}: sampled soft labels in layout version {version}, .* version 4 "
                                        r".*rerun soft_labels"):
        lm_soft_labels.SoftLabelSet(tmp_path / "set", corpus_meta(tmp_path), V)


def test_a_dense_set_of_layout_version_2_is_read_as_it_is(tmp_path):
    """Only the sampled targets' layout changed in version 3: a dense set made before stays valid."""
    folder = tmp_path / "set"
    folder.mkdir()
    logp = F.log_softmax(torch.randn(3, P, V, generator=torch.Generator().manual_seed(2)), -1)
    sch = sparse.schema("dense", P, V, "uint16")
    batch = sparse.pack(sparse.select(logp, "dense", V), np.arange(3), sch)
    lm_soft_labels.write_set(iter([batch]), folder, sch, header(version=2) | {"targets": "dense", "width": V,
                                                                           "samples": None}, 10)
    soft = lm_soft_labels.SoftLabelSet(folder, corpus_meta(tmp_path), V)
    (block,) = list(soft.blocks(torch.Generator().manual_seed(0), 8))
    torch.testing.assert_close(block.targets(np.argsort(block.windows)).logp, logp, atol=0.02, rtol=1e-3)


def test_the_provenance_accounts_for_every_byte_and_records_the_layout(tmp_path):
    logp = F.log_softmax(torch.randn(7, P, V, generator=torch.Generator().manual_seed(4)) * 3, -1)
    prov = write_sampled(tmp_path / "set", logp, draws=12)
    files = sorted((tmp_path / "set").glob("part-*.parquet"))
    assert [f.name for f in files] == [s["file"] for s in prov["shards"]]
    assert prov["bytes"] == sum(f.stat().st_size for f in files) == sum(s["bytes"] for s in prov["shards"])
    assert prov["bytes_per_token"] == prov["bytes"] / (7 * P)
    assert set(prov["column_bytes"]) == {"window", "sample_rank_deltas"}
    footers = sum(pq.ParquetFile(f).metadata.serialized_size + 12 for f in files)  # footer, its length, 2 x "PAR1"
    assert sum(prov["column_bytes"].values()) + footers == prov["bytes"]
    assert prov["layout"] == {"window": "int64",
                              "sample_rank_deltas": f"fixed_size_list<element: uint16 not null>[{P * 12}]"}
    # one uint16 per draw, in row groups of up to SAMPLED_GROUP_ROWS windows, cut at the shards' ends
    deltas = [pq.read_table(f).column("sample_rank_deltas").combine_chunks().flatten().to_numpy() for f in files]
    assert deltas[0].dtype == np.uint16 and sum(len(d) for d in deltas) == 7 * P * 12
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [1, 1, 1]


def test_systematic_draws_give_each_id_its_expected_count_rounded_down_or_up():
    p = torch.tensor([[0.5, 0.26, 0.14, 0.06, 0.04]])
    n = 10  # expected counts 5, 2.6, 1.4, 0.6, 0.4
    for seed in range(50):
        kept = sparse.sample(p.log(), n, torch.Generator().manual_seed(seed), "systematic")
        counts = torch.zeros(5).scatter_add_(0, kept["ids"][0], kept["counts"][0].float())
        assert counts.sum() == n and counts[0] == 5  # 0.5 of 10 draws: exactly 5, every time
        assert ((counts - n * p[0]).abs() < 1).all()  # floor or ceil of n p
        ids = kept["ids"][0][kept["counts"][0] > 0]
        assert (ids.diff() > 0).all()  # distinct, ascending
    # the estimate's spread over seeds: far less than independent draws leave
    logp = torch.log_softmax(teacher_logits(0, 2.0)[:1, :1], -1).expand(500, -1, -1)
    spread = {}
    for how in ("multinomial", "systematic"):
        kept = sparse.sample(logp, 14, torch.Generator().manual_seed(0), how)
        probs = sparse.Targets(kept["ids"], kept["weights"].log()).dense_probs(V)  # (500, 1, V)
        spread[how] = float(probs.var(0).sum())
    assert spread["systematic"] < spread["multinomial"] / 2
