"""The language model's loss family (distill/lm_losses.py): each divergence against values worked
out by hand, dense and sparse; sparse targets over the whole vocabulary equal dense ones; the JSD's
ends; zero at the target with finite gradients; the registry and the config."""

import math
import typing

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import REPO, write_params
from distill import lm, lm_losses, sparse
from distill.config import load_params
from distill.errors import UserError
from distill.lm_params import LMStudentConfig
from distill.losses import get_loss

NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
PART = {"forward_kl": "kl", "reverse_kl": "reverse_kl", "jsd": "jsd", "skew_kl": "skew_kl", "tvd": "tvd"}
V, B, P = 13, 2, 3


def one_position(probs) -> torch.Tensor:
    """(1, 1, V) logits whose softmax is `probs`."""
    return torch.tensor(probs).log().view(1, 1, -1)


def dense(teacher_logits: torch.Tensor) -> sparse.Targets:
    return sparse.Targets(None, F.log_softmax(teacher_logits, -1))


def divergence(name: str, student_logits, targets, temperature=1.0, tail="zero", **options) -> torch.Tensor:
    """The per-position divergence (B, P) a loss mixes in: its part, before T^2 and alpha."""
    parts = get_loss(name)(student_logits, targets, torch.zeros(student_logits.shape[:2], dtype=torch.long),
                           temperature, 1.0, tail=tail, **options)
    return parts[PART[name]]


def random_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, P, V, generator=gen) * 2.5, torch.randn(B, P, V, generator=gen)


# teacher p = (1/2, 1/4, 1/4), student q = (1/3, 1/3, 1/3); jsd at beta 1/2: m = (5/12, 7/24, 7/24);
# skew_kl at skew 1/4: m = p/4 + 3q/4 = (3/8, 5/16, 5/16)
DENSE_BY_HAND = {
    "forward_kl": ({}, 0.5 * math.log((1 / 2) / (1 / 3)) + 2 * 0.25 * math.log((1 / 4) / (1 / 3))),  # 1/2 ln(9/8)
    "reverse_kl": ({}, (1 / 3) * math.log((1 / 3) / (1 / 2)) + 2 * (1 / 3) * math.log((1 / 3) / (1 / 4))),
    "jsd": ({"beta": 0.5}, 0.5 * (0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7))  # 1/2 KL(p || m)
            + 0.5 * ((1 / 3) * math.log(4 / 5) + (2 / 3) * math.log(8 / 7))),  # + 1/2 KL(q || m)
    "skew_kl": ({"skew": 0.25}, 0.5 * math.log((1 / 2) / (3 / 8)) + 2 * 0.25 * math.log((1 / 4) / (5 / 16))),
    "tvd": ({}, 0.5 * (abs(1 / 2 - 1 / 3) + 2 * abs(1 / 4 - 1 / 3))),  # 1/6
}


@pytest.mark.parametrize("name", NAMES)
def test_each_loss_matches_its_value_by_hand_on_one_position_of_three_tokens(name):
    options, expected = DENSE_BY_HAND[name]
    student, targets = one_position([1 / 3, 1 / 3, 1 / 3]), dense(one_position([0.5, 0.25, 0.25]))
    parts = get_loss(name)(student, targets, torch.tensor([[0]]), 1.0, 0.25, tail="zero", **options)
    ce = math.log(3)  # the student gives the next token (id 0) 1/3
    assert parts[PART[name]].item() == pytest.approx(expected, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(0.25 * expected + 0.75 * ce, abs=1e-6)
    assert set(parts) == {"loss", "ce", PART[name]}


# sampled: ids 0 and 1 with weights 3/4 and 1/4, padded (id 0, weight 0); student q = (1/3, 1/3, 1/3).
# The plug-in over all three ids (id 2: target 0, student 1/3), the reverse KL with q given {0, 1}: (1/2, 1/2);
# jsd at beta 1/2: m = (13/24, 7/24, 1/6); skew_kl at 1/4: m = (7/16, 5/16, 1/4)
SAMPLED_BY_HAND = {
    "forward_kl": ({}, 0.75 * math.log((3 / 4) / (1 / 3)) + 0.25 * math.log((1 / 4) / (1 / 3))),
    "reverse_kl": ({}, 0.5 * math.log((1 / 2) / (3 / 4)) + 0.5 * math.log((1 / 2) / (1 / 4))),  # 1/2 ln(4/3)
    "jsd": ({"beta": 0.5}, 0.5 * (0.75 * math.log(18 / 13) + 0.25 * math.log(6 / 7))
            + 0.5 * (1 / 3) * (math.log(8 / 13) + math.log(8 / 7) + math.log(2))),
    "skew_kl": ({"skew": 0.25}, 0.75 * math.log(12 / 7) + 0.25 * math.log(4 / 5)),
    "tvd": ({}, 0.5 * (abs(3 / 4 - 1 / 3) + abs(1 / 4 - 1 / 3) + 1 / 3)),  # 5/12
}


@pytest.mark.parametrize("name", NAMES)
def test_sampled_targets_give_the_plug_in_value_worked_out_by_hand(name):
    options, expected = SAMPLED_BY_HAND[name]
    targets = sparse.Targets(torch.tensor([[[0, 1, 0]]]), torch.tensor([[[0.75, 0.25, 0.0]]]).log())
    got = divergence(name, one_position([1 / 3, 1 / 3, 1 / 3]), targets, **options)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_a_top_k_bucket_is_the_divergence_of_the_coarse_grained_distributions():
    # k = 1: id 0 with 1/2, the tail 1/2; the student (1/3, 1/2, 1/6) has 2/3 outside id 0
    student, targets = one_position([1 / 3, 1 / 2, 1 / 6]), sparse.Targets(
        torch.tensor([[[0]]]), torch.tensor([[[0.5]]]).log(), torch.tensor([[0.5]]))
    assert divergence("tvd", student, targets, tail="bucket").item() == pytest.approx(
        0.5 * (abs(1 / 2 - 1 / 3) + abs(1 / 2 - 2 / 3)), abs=1e-6)  # 1/6
    assert divergence("reverse_kl", student, targets, tail="bucket").item() == pytest.approx(
        (1 / 3) * math.log((1 / 3) / (1 / 2)) + (2 / 3) * math.log((2 / 3) / (1 / 2)), abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_at_temperature_one_a_top_k_bucket_is_at_most_the_dense_divergence(name):
    teacher, student = random_case(1)
    kept = sparse.select(teacher, "top_k", 4)
    bucket = divergence(name, student, sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"]), tail="bucket")
    assert (bucket <= divergence(name, student, dense(teacher)) + 1e-6).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["zero", "uniform", "bucket"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_targets_over_the_whole_vocabulary_give_the_dense_value(name, tail, temperature):
    teacher, student = random_case(0)
    kept = sparse.select(teacher, "top_k", V)
    every = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    got = divergence(name, student, every, temperature, tail)
    torch.testing.assert_close(got, divergence(name, student, dense(teacher), temperature), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_uniform_tail_is_the_divergence_to_the_tail_spread_evenly(name):
    teacher, student = random_case(2)
    kept = sparse.select(teacher, "top_k", 5)
    targets = sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"])
    spread = sparse.Targets(None, targets.dense_probs(V, "uniform").log())
    got = divergence(name, student, targets, 2.0, "uniform")
    torch.testing.assert_close(got, divergence(name, student, spread, 2.0), atol=2e-6, rtol=1e-5)


def test_the_jsd_is_the_forward_kl_at_beta_0_and_the_reverse_kl_at_beta_1():
    teacher, student = random_case(3)
    targets = dense(teacher)
    forward, reverse = divergence("forward_kl", student, targets), divergence("reverse_kl", student, targets)
    torch.testing.assert_close(divergence("jsd", student, targets, beta=0.0), forward)
    torch.testing.assert_close(divergence("jsd", student, targets, beta=1.0), reverse)
    # the mixture formula tends to 0 at both ends, like beta * KL(p || q) and (1 - beta) * KL(q || p)
    small = 1e-3
    torch.testing.assert_close(divergence("jsd", student, targets, beta=small) / small, forward, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(divergence("jsd", student, targets, beta=1 - small) / small, reverse, rtol=2e-2,
                               atol=1e-4)


def test_the_skew_kl_is_zero_for_any_student_at_skew_1():
    teacher, student = random_case(4)
    assert float(divergence("skew_kl", student, dense(teacher), skew=1.0).abs().max()) == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets", ["dense", "top_k", "sampled"])
def test_each_divergence_is_finite_with_finite_gradients_and_zero_at_the_target(name, targets):
    teacher, student = random_case(5)
    kept = sparse.select(teacher, targets, {"dense": V, "top_k": 4, "sampled": 6}[targets],
                         torch.Generator().manual_seed(0))
    t = {"dense": lambda: sparse.Targets(None, kept["logprobs"]),
         "top_k": lambda: sparse.Targets(kept["ids"], kept["logprobs"], kept["tail"]),
         "sampled": lambda: sparse.Targets(kept["ids"], kept["weights"].log())}[targets]()
    tail = "bucket" if targets == "top_k" else "zero"
    for logits in (student, teacher):
        x = logits.clone().requires_grad_()
        value = divergence(name, x, t, 2.0, tail)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(x.grad).all()
    # the student that is the target: for sparse targets, its mass on the ids with target mass
    # (and, for a top-k bucket, its tail spread evenly over the other ids)
    at = t.dense_probs(V, "uniform" if targets == "top_k" else "zero").clamp(min=1e-12).log()
    assert float(divergence(name, at, t, 1.0, tail).abs().max()) < 1e-5


def test_the_registry_finds_each_divergence_by_name():
    for name in NAMES:
        assert get_loss(name) is getattr(lm_losses, f"{name}_loss")


def test_every_loss_the_config_names_is_registered_and_takes_its_options_from_the_config():
    names = typing.get_args(LMStudentConfig.model_fields["loss"].annotation)
    assert names == NAMES and set(lm_losses.OPTIONS) == set(names)
    settings = LMStudentConfig(tail="bucket", beta=0.3, skew=0.2)
    assert lm_losses.options("jsd", settings) == {"tail": "bucket", "beta": 0.3}
    assert lm_losses.options("skew_kl", settings) == {"tail": "bucket", "skew": 0.2}
    teacher, student = random_case(6)
    for name in names:
        parts = get_loss(name)(student, dense(teacher), torch.zeros(B, P, dtype=torch.long), 1.0, 0.9,
                               **lm_losses.options(name, settings))
        assert torch.isfinite(parts["loss"])


class FixedLogits(nn.Module):
    """A causal LM stand-in: the same (B, T, V) logits whatever the ids."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids):
        return type("Output", (), {"logits": self.logits})()


@pytest.mark.parametrize("name", NAMES)
def test_the_student_trains_on_the_loss_its_config_names_with_its_options(name):
    teacher, student = random_case(7)
    targets = dense(teacher)
    ids = torch.randint(0, V, (B, P + 1), generator=torch.Generator().manual_seed(0))
    cfg = LMStudentConfig(loss=name, beta=0.3, skew=0.2, temperature=2.0, alpha=0.7)
    job = lm.LMJob(cfg, distill=cfg)
    net = FixedLogits(torch.cat([student, torch.zeros(B, 1, V)], 1))  # the last position predicts nothing
    parts, _ = lm.LMTrainee(job, None, None).loss(net, (ids, targets, B))
    want = get_loss(name)(student, targets, ids[:, 1:], 2.0, 0.7, **lm_losses.options(name, cfg))
    assert set(parts) == set(want)
    torch.testing.assert_close(parts["loss"], want["loss"])


def test_the_default_loss_is_the_forward_kl():
    assert LMStudentConfig().loss == "forward_kl"
    assert yaml.safe_load((REPO / "lm" / "params.yaml").read_text())["student"]["loss"] == "forward_kl"


@pytest.mark.parametrize("key, value, message", [
    ("loss", "hinton", r"student\.loss = 'hinton' is not allowed"),
    ("beta", 1.5, r"student\.beta = 1\.5 is not allowed"),
    ("skew", 0.0, r"student\.skew = 0\.0 is not allowed"),
])
def test_a_config_with_an_unknown_loss_or_a_setting_out_of_range_is_refused_by_name(tmp_path, key, value, message):
    raw = yaml.safe_load((REPO / "lm" / "params.yaml").read_text())
    raw["student"][key] = value
    with pytest.raises(UserError, match=message):
        load_params(write_params(tmp_path / "params.yaml", raw), task="language_model")


def test_fitted_to_sampled_targets_only_the_forward_kl_recovers_the_teacher():
    """One student distribution fitted to many positions' systematic draws of one teacher
    distribution: the forward KL's estimate is unbiased, the others' are not (docs: Losses)."""
    vocab, positions = 50, 200
    p = F.softmax(torch.randn(1, 1, vocab, generator=torch.Generator().manual_seed(0)) * 2, -1)
    kept = sparse.sample(p.log().expand(1, positions, vocab).contiguous(), 14, torch.Generator().manual_seed(1),
                         "systematic")
    targets = sparse.Targets(kept["ids"], kept["weights"].log())
    labels = torch.zeros(1, positions, dtype=torch.long)
    after = {}
    for name in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"):
        z = torch.zeros(1, 1, vocab, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(400):
            out = get_loss(name)(z.expand(1, positions, vocab), targets, labels, 1.0, 1.0)  # alpha 1: the divergence alone
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        q = F.softmax(z.detach(), -1)
        after[name] = float((p * (p.log() - q.log())).sum())  # KL(teacher || fitted student), nats
    assert after["forward_kl"] < 0.02
    assert all(after[name] > 5 * after["forward_kl"] for name in ("reverse_kl", "jsd", "skew_kl", "tvd")), after
