"""Text data, text models and teachers brought from outside: splits, augmentation, padding,
pretrained folders and checkpoint files, and the one-sentence refusals of bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from distill import data, pretrained, sources, text, training
from distill.classification_params import DataConfig, Params, TextConfig
from distill.errors import UserError
from distill.models import TextCNN, padding_mask, predict_logits
from distill.rows import InMemoryRows
from tiny_text import make_bert_folder, make_reviews


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("bert") / "bert")


def text_data(tmp_path, bert, **extra) -> DataConfig:
    path = make_reviews(tmp_path / "reviews.csv")
    cfg = {"source": "csv", "path": str(path), "text_column": "text", "group_column": "movie",
           "transfer_size": 300, "augment_copies": 2, "text": {"tokenizer": str(bert), "max_length": 24}} | extra
    return Params.model_validate({"data": cfg}).data


def test_a_text_csv_is_prepared_as_token_ids_with_the_text_beside_them(tmp_path, bert):
    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    assert meta.is_text and meta.num_features == 24 and meta.class_names == ["fresh", "rotten"]
    assert meta.tokens["tokenizer_sha256"] == text.tokenizer_sha256(bert)
    train = data.read_split(tmp_path / "prepared", "train")
    assert train.x.dtype == np.int32 and train.x.shape[1] == 24
    tok = text.load_tokenizer(bert)
    table = pd.read_parquet(tmp_path / "prepared" / "train.parquet")
    assert tok.decode([i for i in train.x[0] if i != 0], skip_special_tokens=True) == table["text"][0]
    assert meta.splits["transfer"] == 300


def groups_by_split(raw: sources.RawData, cfg: DataConfig) -> tuple[dict[str, set], dict]:
    """The groups each split holds: the rows are split with their index as their text."""
    numbered = sources.RawData(np.arange(len(raw.y)).astype(str).astype(object), raw.y, raw.feature_names,
                            groups=raw.groups)
    splits, names = data.split_raw(numbered, cfg)
    return {name: {raw.groups[int(i)] for i in x} for name, (x, _) in splits.items()}, splits


def test_groups_never_straddle_splits(tmp_path, bert):
    cfg = text_data(tmp_path, bert, transfer_size=0)
    groups, _ = groups_by_split(sources.load_source(cfg), cfg)
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]


def test_rotten_tomatoes_holds_the_reviews_grouped_by_movie():
    cfg = Params.model_validate({"data": {"source": "rotten_tomatoes", "transfer_size": 0,
                                          "text": {"tokenizer": "minilm"}}}).data
    raw = sources.load_source(cfg)
    assert len(raw.y) == 7403 + 5405 and set(raw.y) == {"fresh", "rotten"}
    groups, splits = groups_by_split(raw, cfg)
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    share = len(splits["test"][1]) / len(raw.y)
    assert 0.15 < share < 0.25


def test_rotten_tomatoes_reads_a_copy_at_data_path_when_there_is_one(tmp_path):
    rows = [{"category": c, "text": f"{c} review {i}", "movie_name": f"m{i % 7}", "has_plot_and_reviews": True}
            for i, c in enumerate(["fresh", "rotten", "plot"] * 10)]
    pd.DataFrame(rows).to_csv(tmp_path / "rt.csv.bz2", index=False)
    cfg = Params.model_validate({"data": {"source": "rotten_tomatoes", "path": str(tmp_path / "rt.csv.bz2"),
                                          "text": {"tokenizer": "minilm"}}}).data
    raw = sources.load_source(cfg)
    assert len(raw.y) == 20 and set(raw.y) == {"fresh", "rotten"}  # the plot rows left out


def test_augmentation_is_deterministic_by_seed_and_masks_and_cuts():
    texts = np.asarray(["the film was good and warm and very clever indeed"] * 50, dtype=object)
    cfg = TextConfig(mask_prob=0.3, ngram_prob=0.5, ngram_max=3)
    first = text.augment(texts, 4, cfg, "[MASK]", np.random.default_rng(1))
    again = text.augment(texts, 4, cfg, "[MASK]", np.random.default_rng(1))
    other = text.augment(texts, 4, cfg, "[MASK]", np.random.default_rng(2))
    assert list(first) == list(again) and list(first) != list(other)
    assert len(first) == 200
    assert any("[MASK]" in t for t in first)
    lengths = [len(t.split()) for t in first]
    assert min(lengths) <= 3 and max(lengths) == 10  # some cut to an n-gram, some whole
    assert len(text.augment(texts, 4, cfg, "[MASK]", np.random.default_rng(1), limit=30)) == 30


def test_a_spliced_copy_joins_the_start_of_its_text_to_the_end_of_another():
    texts = np.asarray(["a b c d e f", "u v w x y z"], dtype=object)
    plain = TextConfig(mask_prob=0.3, ngram_prob=0.5)
    copies = text.augment(texts, 200, plain.model_copy(update={"splice_prob": 0.5}), "[MASK]",
                          np.random.default_rng(3))
    spliced = [t for t in copies if set(t.split()) & set("abcdef") and set(t.split()) & set("uvwxyz")]
    assert 0.15 < len(spliced) / len(copies) < 0.35  # half spliced, half of those with the other text
    for t in spliced:
        first, second = ("abcdef", "uvwxyz") if t.split()[0] in "abcdef" else ("uvwxyz", "abcdef")
        words = t.split()
        cut = next(i for i, w in enumerate(words) if w in second)
        assert "".join(words[:cut]) == first[:cut] and 0 < cut < 6  # its own start, cut at a word
        assert "".join(words[cut:]) == second[6 - len(words[cut:]):] and len(words[cut:]) < 6  # the other's end
        assert "[MASK]" not in t
    same = [t for t in copies if t not in spliced]
    assert any("[MASK]" in t for t in same)  # the rest masked and cut as before
    before = text.augment(texts, 20, plain, "[MASK]", np.random.default_rng(4))
    assert list(text.augment(texts, 20, plain.model_copy(update={"splice_prob": 0.0}), "[MASK]",
                             np.random.default_rng(4))) == list(before)  # 0: the copies as without the key


def test_textcnn_ignores_padding_beyond_the_text():
    torch.manual_seed(0)
    model = TextCNN(3, vocab_size=50, pad_id=0, embedding_dim=8, channels=[4, 4], kernel_sizes=[2, 3],
                    hidden=[]).eval()
    ids = torch.zeros(2, 20, dtype=torch.int32)
    ids[0, :6] = torch.tensor([5, 6, 7, 8, 9, 10])
    ids[1, :3] = torch.tensor([11, 12, 13])
    short = ids[:, :8]
    assert torch.allclose(model(ids), model(short), atol=1e-6)


def test_length_sorted_passes_give_the_rows_back_in_order():
    torch.manual_seed(0)
    model = TextCNN(4, vocab_size=40, pad_id=0, embedding_dim=8, channels=[4], kernel_sizes=[3], hidden=[])
    ids = torch.zeros(150, 30, dtype=torch.int32)
    for i in range(150):
        n = 1 + (i * 7) % 29
        ids[i, :n] = torch.randint(1, 40, (n,))
    one_by_one = torch.cat([model.eval()(ids[i : i + 1]) for i in range(150)])
    assert torch.allclose(predict_logits(model, ids, pad_id=0), one_by_one, atol=1e-5)


def test_a_pretrained_folder_gets_a_head_and_can_be_frozen_below_the_top(tmp_path, bert):
    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    model, args = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24, trainable_layers=1)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in learning and any(".layer.1." in n for n in learning)
    assert not any(".layer.0." in n or "embeddings" in n for n in learning)
    from distill.checkpoint import build_model

    rebuilt = build_model(args)  # from the checkpoint's args alone, no folder
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.from_numpy(data.read_split(tmp_path / "prepared", "val").x[:5])
    assert torch.allclose(rebuilt.eval()(ids), model.eval()(ids), atol=1e-5)


def test_cls_pooling_feeds_the_head_the_first_token_and_is_rebuilt_from_the_checkpoint(tmp_path, bert):
    from distill.checkpoint import build_model

    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    ids = torch.from_numpy(data.read_split(tmp_path / "prepared", "val").x[:6])
    model, args = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24, pooling="cls")
    model.eval()
    short, mask = padding_mask(ids, meta.tokens["pad_id"])
    hidden = model.encoder(input_ids=short, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(model(ids), model.head(hidden[:, 0]), atol=1e-6)  # [CLS]'s vector, not the mean
    mean = (hidden * mask.unsqueeze(2)).sum(1) / mask.sum(1, keepdim=True)
    assert not torch.allclose(model(ids), model.head(mean), atol=1e-3)
    assert args["pooling"] == "cls"
    rebuilt = build_model(args)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.pooling == "cls" and torch.allclose(rebuilt.eval()(ids), model(ids), atol=1e-5)
    assert build_model({k: v for k, v in args.items() if k != "pooling"}).pooling == "mean"  # older checkpoints
    assert Params.model_validate({"teacher": {"source": "pretrained", "model": str(bert)}}).teacher.pooling == "mean"
    with pytest.raises(ValueError, match="teacher.pooling is for teacher.source: pretrained"):
        Params.model_validate({"teacher": {"source": "train", "pooling": "cls"}})


def test_layer_wise_decay_gives_each_layer_its_own_lr_under_either_schedule(tmp_path, bert):
    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    model, _ = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24)
    groups = model.param_groups(1e-3, 0.5)  # 2 layers: embeddings, layer 0, layer 1, the head
    assert [g["lr"] for g in groups] == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])
    names = {id(p): n for n, p in model.named_parameters()}
    where = [{names[id(p)].split(".")[1 if "encoder.layer" not in names[id(p)] else 3] for p in g["params"]}
             for g in groups]
    assert where == [{"embeddings"}, {"0"}, {"1"}, {"weight", "bias"}]  # the head's weight and bias last
    learning = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(learning)  # every parameter that learns, once
    teacher = Params.model_validate({"teacher": {"source": "pretrained", "model": str(bert)}}).teacher
    for warmup in (None, 0.1):  # one-cycle, and warm-up then linear decay: every group keeps its share
        opt = torch.optim.AdamW(model.param_groups(1e-3, 0.5), lr=1e-3)
        sched = training.lr_schedule(opt, teacher.model_copy(update={"lr": 1e-3, "warmup_fraction": warmup}), 10)
        for _ in range(4):
            opt.step()
            sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([lrs[-1] / 8, lrs[-1] / 4, lrs[-1] / 2, lrs[-1]]) and lrs[-1] > 0

    frozen, _ = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24, trainable_layers=1)
    assert [g["lr"] for g in frozen.param_groups(1e-3, 0.5)] == pytest.approx([5e-4, 1e-3])  # layer 1, the head
    with pytest.raises(ValueError, match="layer_decay is for teacher.source: pretrained"):
        Params.model_validate({"teacher": {"source": "train", "layer_decay": 0.9}})
    shared, _ = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24)
    shared.encoder.config.num_hidden_layers = 3  # no stack of 3 layers: as ALBERT, whose layers share weights
    with pytest.raises(UserError, match="layer_decay needs the teacher's 3 layers apart.*layer_decay: null"):
        shared.param_groups(1e-3, 0.5)


def test_the_teacher_trains_with_the_groups_of_its_layer_decay(tmp_path, bert, monkeypatch):
    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    model, _ = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24)
    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append([g["lr"] for g in self.param_groups])

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    teacher = Params.model_validate({"teacher": {"source": "pretrained", "model": str(bert), "layer_decay": 0.5,
                                                 "lr": 1e-3, "epochs": 1, "batch_size": 64}}).teacher
    train, val = (data.read_split(tmp_path / "prepared", s) for s in ("train", "val"))
    training.fit_classifier(model, training.TrainJob(teacher, 0, "teacher"), InMemoryRows(train.x, train.y),
                            (val.x, val.y))
    assert made == [pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])]


def test_bad_pretrained_folders_are_refused_in_one_sentence(tmp_path, bert):
    meta = data.prepare(text_data(tmp_path, bert), tmp_path / "prepared")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        pretrained.load_pretrained(str(empty), 2, meta.tokens, 24)
    with pytest.raises(UserError, match="no tokenizer in the folder"):
        text.load_tokenizer(empty)
    other = make_bert_folder(tmp_path / "other")
    (other / "vocab.txt").write_text((other / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(UserError, match="not the one that made the prepared data"):
        pretrained.load_pretrained(str(other), 2, meta.tokens, 24)
    three = make_bert_folder(tmp_path / "three", classifier_labels=3)
    for name in text.TOKENIZER_FILES:  # same tokenizer as the data's
        if (bert / name).exists():
            (three / name).write_bytes((bert / name).read_bytes())
    with pytest.raises(UserError, match="a classifier of 3 labels; the data has 2 classes"):
        pretrained.load_pretrained(str(three), 2, meta.tokens, 24)
    with pytest.raises(UserError, match="trainable_layers = 3 is not allowed: the model has 2 layers"):
        pretrained.load_pretrained(str(bert), 2, meta.tokens, 24, trainable_layers=3)
    with pytest.raises(UserError, match="max_length = 100 is not allowed: .* reads at most 64 tokens"):
        pretrained.load_pretrained(str(bert), 2, meta.tokens, 100)
    # a checkpoint teacher made for another vocabulary, or other classes, is refused too
    model, args = pretrained.load_pretrained(str(bert), 2, meta.tokens, 24)
    from distill import checkpoint

    checkpoint.save(tmp_path / "t.pt", model, args | {"vocab_size": 99}, "classify", class_names=["fresh", "rotten"])
    with pytest.raises(UserError, match="made for vocab_size 99, the prepared data has 41: another tokenizer"):
        pretrained.load_user_checkpoint(tmp_path / "t.pt", 24, 2, meta.tokens, meta.class_names)
    checkpoint.save(tmp_path / "t.pt", model, args, "classify", class_names=["rotten", "fresh"])
    with pytest.raises(UserError, match=r"classes are \['rotten', 'fresh'\], the data's \['fresh', 'rotten'\]"):
        pretrained.load_user_checkpoint(tmp_path / "t.pt", 24, 2, meta.tokens, meta.class_names)


def test_bad_text_columns_are_refused_in_one_sentence(tmp_path, bert):
    path = make_reviews(tmp_path / "reviews.csv")
    df = pd.read_csv(path)

    def refused(frame, match, **extra):
        frame.to_csv(tmp_path / "bad.csv", index=False)
        cfg = text_data(tmp_path, bert, path=str(tmp_path / "bad.csv"), **extra)
        with pytest.raises(UserError, match=match):
            data.prepare(cfg, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    refused(df, "no text column 'review'", text_column="review")
    refused(df.assign(text=np.arange(len(df))), "text column 'text' holds int64 at row 0, not a string")
    refused(df.assign(text=["  "] + list(df["text"][1:])),
            r"text column 'text' has empty values, the first at row 0 \(1 in all\); fill them, or set data.on_nan: drop")
    refused(df.assign(movie=[None] + list(df["movie"][1:])), "bad.csv: group column 'movie' has empty values")
    refused(df.assign(label="fresh"), r"bad.csv: label column 'label' holds only one class \('fresh'")
    refused(df, "no group column 'film'", group_column="film")


def test_a_transfer_file_must_have_the_training_columns(tmp_path, bert):
    pd.DataFrame({"comment": ["a good film"] * 5}).to_csv(tmp_path / "unlabeled.csv", index=False)
    cfg = text_data(tmp_path, bert, transfer_path=str(tmp_path / "unlabeled.csv"))
    with pytest.raises(UserError, match=r"lacks the training data's column\(s\) \['text'\]"):
        data.prepare(cfg, tmp_path / "out")
    pd.DataFrame({"text": ["a good film", "a dull plot"]}).to_csv(tmp_path / "unlabeled.csv", index=False)
    meta = data.prepare(cfg, tmp_path / "out")
    transfer = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert meta.splits["transfer"] == 300 and list(transfer["text"][:2]) == ["a good film", "a dull plot"]


def test_numeric_transfer_rows_are_read_and_standardized_with_train(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(90, 3)), columns=["a", "b", "c"]).assign(label=np.arange(90) % 3)
    table.to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"a": [1.0], "b": [2.0], "x": [3.0]}).to_csv(tmp_path / "u.csv", index=False)
    cfg = Params.model_validate({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "augment": "none",
                                          "transfer_path": str(tmp_path / "u.csv"), "transfer_size": 10}}).data
    with pytest.raises(UserError, match=r"lacks the training data's column\(s\) \['c'\]"):
        data.prepare(cfg, tmp_path / "out")
    pd.DataFrame({"a": [1.0], "b": [2.0], "c": [3.0]}).to_csv(tmp_path / "u.csv", index=False)
    assert data.prepare(cfg, tmp_path / "out").splits["transfer"] == 1


def test_a_checkpoint_teacher_is_taken_as_it_is_or_refused(tmp_path):
    from distill.models import MLP

    torch.manual_seed(0)
    net = MLP(6, 3, [8]).eval()
    scripted = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(net), scripted)
    model, args, _ = pretrained.load_user_checkpoint(scripted, 6, 3)
    x = torch.randn(4, 6)
    assert torch.allclose(model(x), net(x))
    from distill.checkpoint import build_model

    rebuilt = build_model(args)  # the TorchScript bytes travel in the checkpoint
    assert torch.allclose(rebuilt(x), net(x))
    with pytest.raises(UserError, match=r"returns \(2, 3\) for a batch of shape \(2, 6\); it must return \(batch, 5\)"):
        pretrained.load_user_checkpoint(scripted, 6, 5)
    missing = tmp_path / "missing.pt"
    torch.save({"arch": "no_such_module:make", "state_dict": {}}, missing)
    with pytest.raises(UserError, match="cannot import no_such_module"):
        pretrained.load_user_checkpoint(missing, 6, 3)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not a model this pipeline can rebuild"):
        pretrained.load_user_checkpoint(foreign, 6, 3)
