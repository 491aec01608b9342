"""The language model's divergences to the teacher's stored per-token targets, one registered loss
each (distill.losses' registry; `student.loss` names one).

With p the teacher's target and q the student's softmax over all V ids, both at temperature T
(the target tempered as its stored log-probs or log-weights divided by T, renormalised):

  forward_kl  KL(p || q) = sum p log(p / q)                              Hinton et al. 2015
  reverse_kl  KL(q || p) = sum q log(q / p)                              MiniLLM (Gu et al., ICLR 2024)
  jsd         b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q     GKD (Agarwal et al., ICLR 2024),
              with b = `beta` as TRL's GKDTrainer.generalized_jsd_loss: b = 0 is exactly the forward
              KL, b = 1 exactly the reverse KL (as TRL, those two are special cases: the mixture
              formula itself tends to 0 at both ends, like b KL(p || q) as b -> 0)
  skew_kl     KL(p || l p + (1 - l) q), l = `skew` in (0, 1]              DistiLLM (Ko et al., ICML 2024)
  tvd         1/2 sum |p - q|                                            as DistillKit offers it

Dense targets give each exactly. Sparse targets describe p at the w stored ids S only:

  top_k, `tail: bucket`  the outcomes are the k ids and the rest of the vocabulary as one more,
      the target's tail mass against the student's total mass outside S: the divergence of the
      coarse-grained distributions. All five are f-divergences, so at T = 1 it is a lower bound
      of the divergence to the teacher (data processing); exact for what is stored.
  top_k, `tail: uniform`  the tail spread evenly over the V - k other ids: exact for that
      dense distribution (a guess at the tail's shape).
  top_k, `tail: zero`, and sampled targets  the target p^ has no mass outside S: the plug-in
      D(p^, q) over all V ids, the student's mass outside S one outcome (exact, as p^ is 0
      there). Forward KL: that outcome adds nothing (`kl_to_targets`). Reverse KL would be
      infinite wherever the student has mass p^ lacks: it is KL(q(. | S) || p^), the student
      conditioned on the ids with target mass (its mass elsewhere is left to the cross-entropy).

Under random sampling (E[p^_i] = p_i at T = 1) only the forward KL is unbiased where it
matters: its student-dependent part -sum p^ log q is linear in p^, so its value is unbiased up
to the constant sum p^ log p^ and its gradient is unbiased. Reverse KL, JSD, skew KL and TVD
hold p^ inside a log, a mixture or an absolute value: nonlinear, so the plug-in is biased
(and the reverse KL sees only the drawn ids). Top-k targets are biased for all five.

The T^2 factor and the mix with the next-token cross-entropy are the same for all five
(distill.losses.total). Each returns its parts: "loss", "ce", and the divergence ("kl" for the
forward KL, else its name), averaged over positions before the T^2 and alpha factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses import register_loss, total
from distill.sparse import Targets

NO_MASS = -1e4  # the log-mass of an outcome without any: exp gives exactly 0 in float32, and, unlike
# -inf, no 0 * inf reaches a gradient through a mixture, a difference of logs or a mask
OPTIONS = {"forward_kl": ("tail",), "reverse_kl": ("tail",), "jsd": ("tail", "beta"), "skew_kl": ("tail", "skew"),
           "tvd": ("tail",)}  # the student's settings (LMStudentConfig) each loss takes as keyword options


def options(loss: str, settings: object) -> dict:
    """The keyword options of the registered `loss`, read from `settings` (a student's config)."""
    return {key: getattr(settings, key) for key in OPTIONS[loss]}


def kl_to_targets(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0, tail: str = "zero"
                  ) -> torch.Tensor:
    """KL(target_T || student_T) per position, (B, P), at temperature T.

    Over the stored ids only: the student's log-probs are its full softmax's (all V ids), so
    probability it puts outside the stored ids costs it. A top-k tail with `tail: uniform` is
    V - k ids of log-prob log(tail / (V - k)) each, tempered like the rest; `tail: zero`
    renormalises the stored ids. Dense targets give the exact KL.
    """
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    z = t.logp / temperature  # -inf (sampled padding) stays -inf
    if t.ids is None:
        p = F.softmax(z, dim=-1)
        return (torch.special.xlogy(p, p) - p * log_s).sum(-1)  # 0 log 0 = 0 where the teacher puts nothing
    log_s_kept = log_s.gather(-1, t.ids)
    rest = vocab - t.ids.shape[-1]
    if tail == "uniform" and t.tail is not None and rest > 0:
        each = (t.tail.clamp(min=1e-12) / rest).log() / temperature  # one tail id's tempered logit
        log_z = torch.logaddexp(torch.logsumexp(z, -1), each + math.log(rest))
        log_t, log_t_each = z - log_z.unsqueeze(-1), each - log_z
        tail_s = log_s.sum(-1) - log_s_kept.sum(-1)  # the student's log-probs summed over the tail ids
        tail_kl = rest * log_t_each.exp() * log_t_each - log_t_each.exp() * tail_s
    elif tail == "bucket" and t.tail is not None and rest > 0:
        bucket = t.tail.clamp(min=1e-12).log() / temperature  # the tail as one more outcome
        log_z = torch.logaddexp(torch.logsumexp(z, -1), bucket)
        log_t, log_t_rest = z - log_z.unsqueeze(-1), bucket - log_z
        kept_s = torch.logsumexp(log_s_kept, -1).clamp(max=-1e-6)  # the student's mass on the stored ids
        log_s_rest = torch.log(-torch.expm1(kept_s))  # and on the rest: log(1 - kept)
        tail_kl = log_t_rest.exp() * (log_t_rest - log_s_rest)
    else:
        log_t, tail_kl = z - torch.logsumexp(z, -1, keepdim=True), 0.0
    p = log_t.exp()
    kept = torch.where(p > 0, p * (log_t - log_s_kept), torch.zeros_like(p))
    return kept.sum(-1) + tail_kl


def outcomes(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0, tail: str = "zero"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q), each (B, P, O): the target's and the student's log-probs at temperature T over
    the outcomes the divergences are taken on (the module's docstring). Dense targets and a uniform
    tail: every id (O = V). Otherwise the w stored ids, then the rest of the vocabulary (O = w + 1).
    An outcome without mass has log-mass NO_MASS (about it, for the student's rest when S is every
    id): a sampled row's padding in both, and the rest in the target unless a top-k tail is kept as
    a bucket."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, P, V)
    vocab = log_s.shape[-1]
    if t.ids is None:
        return F.log_softmax(t.logp / temperature, dim=-1).clamp(min=NO_MASS), log_s
    others = vocab - t.ids.shape[-1]  # ids outside the stored ones (at least, with padding)
    if tail == "uniform" and t.tail is not None and others > 0:
        each = (t.tail.clamp(min=1e-12) / others).log()  # (B, P): each tail id's log-prob before T
        logp = each.unsqueeze(-1).expand_as(log_s).scatter(-1, t.ids, t.logp)  # (B, P, V)
        return F.log_softmax(logp / temperature, dim=-1).clamp(min=NO_MASS), log_s
    stored = t.logp > -math.inf  # (B, P, w): False on a sampled row's padding (weight 0)
    ids = torch.where(stored, t.ids, t.ids[..., :1])  # padding points at the first (a stored) id
    in_s = torch.zeros_like(log_s, dtype=torch.bool).scatter_(-1, ids, True)  # (B, P, V)
    q_rest = log_s.masked_fill(in_s, NO_MASS).logsumexp(-1)  # (B, P): the student's mass outside S
    log_q = torch.cat([log_s.gather(-1, t.ids).masked_fill(~stored, NO_MASS), q_rest.unsqueeze(-1)], -1)
    if tail == "bucket" and t.tail is not None and others > 0:
        p_rest = t.tail.clamp(min=1e-12).log()  # (B, P): the tail as one more outcome
    else:
        p_rest = torch.full_like(q_rest, -math.inf)  # zero, sampled: the target has nothing outside S
    z = torch.cat([t.logp, p_rest.unsqueeze(-1)], -1) / temperature  # (B, P, w + 1); -inf: no mass
    return F.log_softmax(z, dim=-1).clamp(min=NO_MASS), log_q


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per position, summed over the outcomes; one where a has no mass adds exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w p + (1 - w) q) over the outcomes, 0 < w < 1."""
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def reverse_kl_to_targets(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0,
                          tail: str = "zero") -> torch.Tensor:
    """KL(student_T || target_T) per position, (B, P): over the outcomes the target gives mass to,
    the student conditioned on them (renormalised; a no-op where the target covers every outcome)."""
    log_p, log_q = outcomes(student_logits, t, temperature, tail)
    log_q = log_q.masked_fill(log_p <= NO_MASS, NO_MASS)
    return _kl(log_q - log_q.logsumexp(-1, keepdim=True), log_p)


def jsd_to_targets(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0, tail: str = "zero",
                   beta: float = 0.5) -> torch.Tensor:
    """The generalised JSD per position, (B, P): b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q;
    beta = 0 gives the forward KL (`kl_to_targets`), beta = 1 the reverse KL (`reverse_kl_to_targets`)."""
    if beta == 0:
        return kl_to_targets(student_logits, t, temperature, tail)
    if beta == 1:
        return reverse_kl_to_targets(student_logits, t, temperature, tail)
    log_p, log_q = outcomes(student_logits, t, temperature, tail)
    log_m = _mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def skew_kl_to_targets(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0, tail: str = "zero",
                       skew: float = 0.1) -> torch.Tensor:
    """KL(p || l p + (1 - l) q) per position, (B, P), l = `skew` (l = 1: 0 for any student)."""
    log_p, log_q = outcomes(student_logits, t, temperature, tail)
    return _kl(log_p, log_p if skew == 1 else _mixture(log_p, log_q, skew))


def tvd_to_targets(student_logits: torch.Tensor, t: Targets, temperature: float = 1.0, tail: str = "zero"
                   ) -> torch.Tensor:
    """1/2 sum |p - q| per position, (B, P)."""
    log_p, log_q = outcomes(student_logits, t, temperature, tail)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _parts(name: str, divergence: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
           temperature: float, alpha: float) -> dict[str, torch.Tensor]:
    """alpha * T^2 * the mean `divergence` (B, P) + (1 - alpha) * the next-token cross-entropy."""
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten())
    term = divergence.mean()
    return {"loss": total(term, ce, temperature, alpha), "ce": ce, name: term}


@register_loss("forward_kl")
def forward_kl_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
                    alpha: float, tail: str = "zero") -> dict[str, torch.Tensor]:
    """A language model's distillation loss over every position of a batch of windows:

        loss = alpha * T^2 * mean KL(target_T || student_T) + (1 - alpha) * CE(z_s, next token)

    Args:
        student_logits: (B, P, V) the student's next-token logits z_s.
        targets: the teacher's stored targets at the same (B, P) positions.
        labels: (B, P) the next tokens' ids.
        temperature: T > 0.
        alpha: weight of the divergence, in [0, 1].
        tail: what a top-k tail stands for: zero, uniform or bucket (`kl_to_targets`).

    Returns:
        {"loss": the total, "ce": the next-token cross-entropy, "kl": the KL averaged over the
        positions (before the T^2 and alpha factors)}.
    """
    return _parts("kl", kl_to_targets(student_logits, targets, temperature, tail), student_logits, labels,
                  temperature, alpha)


@register_loss("reverse_kl")
def reverse_kl_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
                    alpha: float, tail: str = "zero") -> dict[str, torch.Tensor]:
    """alpha * T^2 * mean KL(student_T || target_T) + (1 - alpha) * CE (MiniLLM's divergence).

    Args and returns as `forward_kl_loss`, the divergence under "reverse_kl" (`reverse_kl_to_targets`).
    """
    return _parts("reverse_kl", reverse_kl_to_targets(student_logits, targets, temperature, tail), student_logits,
                  labels, temperature, alpha)


@register_loss("jsd")
def jsd_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
             alpha: float, tail: str = "zero", beta: float = 0.5) -> dict[str, torch.Tensor]:
    """alpha * T^2 * mean JSD_beta(target_T, student_T) + (1 - alpha) * CE (GKD's generalised JSD).

    Args and returns as `forward_kl_loss`, the divergence under "jsd"; `beta` in [0, 1]: 0 the
    forward KL, 1 the reverse KL (`jsd_to_targets`).
    """
    return _parts("jsd", jsd_to_targets(student_logits, targets, temperature, tail, beta), student_logits, labels,
                  temperature, alpha)


@register_loss("skew_kl")
def skew_kl_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
                 alpha: float, tail: str = "zero", skew: float = 0.1) -> dict[str, torch.Tensor]:
    """alpha * T^2 * mean KL(p || skew p + (1 - skew) q) + (1 - alpha) * CE (DistiLLM's skew KL).

    Args and returns as `forward_kl_loss`, the divergence under "skew_kl"; `skew` in (0, 1], 0.1 in
    the paper (`skew_kl_to_targets`).
    """
    return _parts("skew_kl", skew_kl_to_targets(student_logits, targets, temperature, tail, skew), student_logits,
                  labels, temperature, alpha)


@register_loss("tvd")
def tvd_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
             alpha: float, tail: str = "zero") -> dict[str, torch.Tensor]:
    """alpha * T^2 * mean 1/2 sum |p - q| + (1 - alpha) * CE (total variation).

    Args and returns as `forward_kl_loss`, the divergence under "tvd" (`tvd_to_targets`).
    """
    return _parts("tvd", tvd_to_targets(student_logits, targets, temperature, tail), student_logits, labels,
                  temperature, alpha)
