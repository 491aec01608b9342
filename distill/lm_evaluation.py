"""Evaluate language models on the held-out test windows: teacher, distilled student, baseline.

Per model: cross-entropy in bits per token (and perplexity) over every predicted test
position, and in bits per byte (the same cross-entropy summed, over the UTF-8 bytes of the text
the predicted tokens stand for: distill/text.py's byte_lengths; the measure that does not depend
on the tokenizer); KL(teacher || model) in bits per token, with the teacher run live (not its
stored targets); parameters; one window's forward time at batch 1; and a few samples, each a test
prompt continued by top-k sampling (seeded, the same prompts for every model). The student adds
its soft labels' bytes per token (from the lineage in its checkpoint). The gap closed is
(baseline - student) / (baseline - teacher) in bits per token (`gap_closed`) and in bits per byte
(`gap_closed_bits_per_byte`), when the teacher is better. Models that share a tokenizer are scored
together on its windows (`score`); a model of another tokenizer is scored by another call, on its
own windows and byte table, and only its bits per byte compare.

Outputs: reports/metrics.json, compare.md (table and samples), report.html (headline, table,
the val curves, samples), figures/training.png, curves/<model>.csv (val bits per token by step).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from distill import checkpoint, lm
from distill.checkpoint import count_parameters
from distill.corpus import TASK, read_corpus_meta, read_windows, student_view
from distill.errors import UserError
from distill.evaluation import gap_closed, latency_ms
from distill.gate import Check, Verdict, verdict
from distill.io import atomic_path, file_sha256, write_csv, write_json, write_text
from distill.lm import LN2
from distill.lm_params import LMEvaluateConfig, LMRegistryConfig
from distill.report import COLORS, PAGE, cell, png_bytes
from distill.task import ROLES
from distill.text import byte_lengths

LATENCY_REPEATS = 20
LM_COLUMNS = (  # key, header, format
    ("test_bits_per_token", "bits / token", "{:.3f}"),
    ("test_bits_per_byte", "bits / byte", "{:.3f}"),
    ("test_perplexity", "perplexity", "{:.1f}"),
    ("kl_bits_per_token", "KL(teacher ‖ model), bits / token", "{:.3f}"),
    ("params", "parameters", "{:,}"),
    ("latency_ms_b1", "ms per window (batch 1)", "{:.2f}"),
)


@dataclass
class LMEvaluation:
    metrics: dict
    samples: dict[str, list[dict[str, str]]]  # model -> [{prompt, continuation}]
    histories: dict[str, list[dict]]
    run_ids: dict[str, str | None]
    described: str


@dataclass(frozen=True)
class TextScore:
    """One model's next-token loss summed over the predicted positions of its test windows."""

    nats: float  # cross-entropy
    tokens: int  # predicted positions
    bytes: int  # UTF-8 bytes of the text the predicted tokens stand for
    kl_nats: float | None  # KL(teacher || model); None when scored without the teacher

    @property
    def bits_per_token(self) -> float:
        return self.nats / LN2 / max(self.tokens, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / max(self.bytes, 1)


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], windows: np.ndarray, table: np.ndarray, batch_size: int,
          device: torch.device, teacher: str | None = "teacher") -> dict[str, TextScore]:
    """Each of `models` on `windows`, ids of the one tokenizer whose byte table (text.byte_lengths) is
    `table`: the next-token cross-entropy over its len(table) ids (a pretrained head's padding rows past
    them left out), and with `teacher` one of `models`, each one's KL from it, in one pass. A model of
    another tokenizer is scored by another call, on its own windows and table."""
    vocab = len(table)
    sums = {m: {"ce": 0.0, "kl": 0.0} for m in models}
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start:start + batch_size]).to(device)
        labels = ids[:, 1:].flatten()
        log_t = _log_probs(models[teacher], ids, vocab) if teacher else None
        p = None if log_t is None else log_t.exp()
        for name, model in models.items():
            log_m = log_t if name == teacher else _log_probs(model, ids, vocab)
            sums[name]["ce"] += float(F.nll_loss(log_m.flatten(0, 1), labels, reduction="sum"))
            if p is not None:
                sums[name]["kl"] += float((torch.special.xlogy(p, p) - p * log_m).sum())
    predicted = windows[:, 1:]
    return {m: TextScore(s["ce"], predicted.size, int(table[predicted].sum()), s["kl"] if teacher else None)
            for m, s in sums.items()}


def _log_probs(model: torch.nn.Module, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T) windows -> (B, T - 1, vocab) next-token log-probabilities, in float32."""
    return F.log_softmax(lm.next_token_logits(model, ids)[..., :vocab].float(), -1)


def evaluate_lm(cfg: LMEvaluateConfig, prepared_dir: str | Path, checkpoints: dict[str, str | Path],
                device: torch.device) -> LMEvaluation:
    """Stage step evaluate (language model). Each model is scored on the test windows of the tokens
    it reads: the teacher's view, or the student's own with data.cross_tokenizer (then the KL to
    the teacher, over no shared vocabulary, and the gap closed in bits per token are not taken:
    bits per byte compare)."""
    meta = read_corpus_meta(prepared_dir)
    own = read_corpus_meta(student_view(prepared_dir))
    views = {"teacher": meta, "student": own, "baseline": own}
    models, ckpts = {}, {}
    for name in ROLES:
        models[name], ckpts[name] = checkpoint.load(checkpoints[name], task=TASK)
        lm.check_lineage(checkpoints[name], ckpts[name], views[name])
        models[name].to(device)
    lineage = ckpts["student"].get("soft_labels") or {}
    if lineage.get("teacher_sha256") not in (None, file_sha256(checkpoints["teacher"])):
        raise UserError(f"{checkpoints['student']}: distilled from another teacher than {checkpoints['teacher']}; "
                        "rerun soft_labels and train_student (dvc repro)")
    cross = own.path != meta.path
    groups = [ROLES] if not cross else [("teacher",), ("student", "baseline")]
    scores, tests, toks = {}, {}, {}
    for group in groups:
        view = views[group[0]]
        test, tok = read_windows(view.path, "test"), lm.tokenizer(view)
        scores |= score({m: models[m] for m in group}, test, byte_lengths(tok), cfg.batch_size, device,
                        teacher="teacher" if "teacher" in group else None)
        tests |= {m: test for m in group}
        toks |= {m: tok for m in group}
    metrics: dict = {}
    for name in ROLES:
        s = scores[name]
        metrics[name] = {"test_bits_per_token": s.bits_per_token, "test_bits_per_byte": s.bits_per_byte,
                         "test_perplexity": 2 ** s.bits_per_token, "test_tokens": s.tokens, "test_bytes": s.bytes,
                         # not -0.000 from rounding; None: no vocabulary shared with the teacher to take it over
                         "kl_bits_per_token": None if s.kl_nats is None else max(s.kl_nats, 0.0) / LN2 / s.tokens,
                         "params": count_parameters(models[name]),
                         "latency_ms_b1": latency_ms(lm.NextTokenLogits(models[name]), torch.from_numpy(tests[name][:1]),
                                                     1, LATENCY_REPEATS, device),
                         "best_step": ckpts[name].get("step")}
    metrics["student"]["soft_label_bytes_per_token"] = lineage.get("bytes_per_token")
    metrics["student"]["soft_label_targets"] = f"{lineage.get('targets')} {lineage.get('width')}"
    for who in ("targets", "teacher"):  # across tokenizers: the aligned targets and the teacher on the train text
        metrics["student"][f"soft_label_{who}_bits_per_byte"] = (lineage.get("alignment") or {}).get(
            f"{who}_bits_per_byte")
    # lower is better in bits: the gap closed is (baseline - student) / (baseline - teacher)
    metrics["gap_closed"] = None if cross else gap_closed(*(-metrics[m]["test_bits_per_token"] for m in ROLES))
    metrics["gap_closed_bits_per_byte"] = gap_closed(*(-metrics[m]["test_bits_per_byte"] for m in ROLES))
    samples = _samples(cfg, {n: m.cpu() for n, m in models.items()}, tests["teacher"], meta, toks)
    described = (f"{meta.splits['test']['windows']} test windows of {meta.context_length} tokens "
                 f"({meta.splits['test']['documents']} documents); vocabulary {meta.vocab_size}")
    if cross:
        described += (f"; the student and the baseline read their own tokenizer's {own.splits['test']['windows']} "
                      f"test windows (vocabulary {own.vocab_size}): compare them to the teacher in bits per byte")
    return LMEvaluation(metrics, samples, {m: ckpts[m].get("history", []) for m in ROLES},
                        {m: ckpts[m].get("mlflow_run_id") for m in ROLES}, described)


def _samples(cfg: LMEvaluateConfig, models: dict, test: np.ndarray, meta, toks: dict) -> dict[str, list[dict[str, str]]]:
    """Each model's continuations of a few document starts of the teacher's test windows, the
    prompt's text read by each model's own tokenizer (`toks`, by model)."""
    picks = np.linspace(0, len(test) - 1, cfg.samples).round().astype(int) if cfg.samples else []
    out: dict[str, list[dict[str, str]]] = {m: [] for m in models}
    size = min(cfg.prompt_tokens, meta.context_length - 1)
    for i, row in enumerate(picks):
        text = toks["teacher"].decode(_document_start(test[row], meta.eos_id, size))
        for name, model in models.items():
            prompt = np.asarray(toks[name](text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            new = lm.generate(model, prompt, cfg.new_tokens, cfg.sample_top_k, cfg.seed + i)
            out[name].append({"prompt": text, "continuation": toks[name].decode(new)})
    return out


def _document_start(window: np.ndarray, eos_id: int, size: int) -> np.ndarray:
    """`size` tokens of the window from just after its first end-of-text (a document's start),
    when they fit; else from the window's start."""
    after = np.flatnonzero(window[:-size] == eos_id) + 1
    start = int(after[0]) if len(after) else 0
    return window[start:start + size]


def lm_passes_gate(student: dict, registry: LMRegistryConfig) -> Verdict:
    """The quality gate for the registry alias: few enough bits per test token."""
    return verdict([Check("bits per token", student["test_bits_per_token"], registry.max_test_bits_per_token,
                          ceiling=True)])


# ---------------------------------------------------------------- outputs


def lm_headline(metrics: dict) -> str:
    bits = {m: metrics[m]["test_bits_per_token"] for m in ROLES}
    per_byte = {m: metrics[m]["test_bits_per_byte"] for m in ROLES}
    smaller = metrics["teacher"]["params"] / max(metrics["student"]["params"], 1)
    gap, gap_bytes = metrics["gap_closed"], metrics["gap_closed_bits_per_byte"]
    if gap is None and gap_bytes is not None:  # the student reads its own tokenizer: bits per byte compare
        closed = f"distillation closed {100 * gap_bytes:.0f}% of the teacher-baseline gap in bits per byte"
    else:
        closed = ("no gap to close: the teacher is not better than the baseline" if gap is None
                  else f"distillation closed {100 * gap:.0f}% of the teacher-baseline gap")
    return (f"Held-out bits per token: student {bits['student']:.3f} vs baseline {bits['baseline']:.3f} vs teacher "
            f"{bits['teacher']:.3f} (bits per byte: {per_byte['student']:.3f} vs {per_byte['baseline']:.3f} vs "
            f"{per_byte['teacher']:.3f}); {closed}. The student has {smaller:.1f}x fewer parameters than the teacher.")


def lm_compare_table(metrics: dict) -> str:
    lines = ["| model | " + " | ".join(h for _, h, _ in LM_COLUMNS) + " |", "|---" * (len(LM_COLUMNS) + 1) + "|"]
    for m in ROLES:
        lines.append(f"| {m} | " + " | ".join(cell(metrics[m], k, fmt) for k, _, fmt in LM_COLUMNS) + " |")
    gap, gap_bytes = metrics["gap_closed"], metrics["gap_closed_bits_per_byte"]
    shown = ("n/a (the teacher is not better than the baseline)" if gap is None and gap_bytes is None
             else f"{_share(gap)} in bits per token, {_share(gap_bytes)} in bits per byte")
    student = metrics["student"]
    size = student["soft_label_bytes_per_token"]
    aligned, teacher = student.get("soft_label_targets_bits_per_byte"), student.get("soft_label_teacher_bits_per_byte")
    fidelity = ("" if aligned is None or teacher is None else
                f"\nAligned to the student's tokenizer, the targets score {aligned:.3f} bits per byte on the train "
                f"text, the teacher {teacher:.3f} (far higher: the alignment lost what the teacher knew; somewhat "
                "lower is expected: the student's own split of a teacher token tells of it)")
    return ("\n".join(lines) + f"\n\nGap closed by distillation (baseline - student) / (baseline - teacher): "
            f"{shown}\nSoft labels: {student['soft_label_targets']}, "
            + ("size not recorded" if size is None else f"{size:.1f} bytes per token") + fidelity + "\n")


def _share(gap: float | None) -> str:
    return "n/a" if gap is None else f"{100 * gap:.1f}%"


def samples_markdown(samples: dict) -> str:
    parts = ["## Samples (test prompts, top-k sampling)\n"]
    for i in range(len(next(iter(samples.values()), []))):
        parts.append(f"Prompt {i + 1}: {_one_line(samples['teacher'][i]['prompt'])}\n")
        parts += [f"- {m}: …{_one_line(samples[m][i]['continuation'])}" for m in samples]
        parts.append("")
    return "\n".join(parts) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def lm_training_figure(histories: dict[str, list[dict]]) -> Figure:
    fig = Figure(figsize=(6.5, 3.6), dpi=110, layout="constrained")
    ax = fig.subplots()
    for m, rows in histories.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["val_bits_per_token"] for r in rows], marker="o", ms=3,
                    color=COLORS[m], label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val bits per token")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def write_lm_outputs(result: LMEvaluation, out: dict[str, str | Path]) -> None:
    """metrics.json, compare.md, report.html, figures/, curves/ (out: their paths by name)."""
    write_json(out["metrics"], result.metrics)
    table = lm_compare_table(result.metrics)
    write_text(out["compare"], table + "\n" + samples_markdown(result.samples))
    with atomic_path(out["curves"]) as tmp:
        tmp.mkdir()
        for m, rows in result.histories.items():
            write_csv(tmp / f"{m}.csv", [{"step": r["step"], "val_bits_per_token": r["val_bits_per_token"]}
                                         for r in rows])
    png = png_bytes(lm_training_figure(result.histories))
    with atomic_path(out["figures"]) as tmp:
        tmp.mkdir()
        (tmp / "training.png").write_bytes(png)
    rows = "".join(f'<tr><th><span class="dot" style="background:{COLORS[m]}"></span>{m}</th>'
                   + "".join(f"<td>{cell(result.metrics[m], k, fmt)}</td>" for k, _, fmt in LM_COLUMNS) + "</tr>"
                   for m in ROLES)
    heads = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in LM_COLUMNS)
    table_html = f"<table><tr><th>model</th>{heads}</tr>{rows}</table>"
    samples = "".join(
        f"<h3>Prompt {i + 1}</h3><p><em>{html.escape(result.samples['teacher'][i]['prompt'])}</em></p><ul>"
        + "".join(f"<li><b>{m}</b>: …{html.escape(result.samples[m][i]['continuation'])}</li>" for m in ROLES)
        + "</ul>" for i in range(len(result.samples.get("teacher", []))))
    figures = (f'<figure id="training"><img alt="training" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
               "<figcaption>Val bits per token by step (the checkpoint kept is each model's best).</figcaption>"
               f'</figure><h2 id="samples">Samples</h2>{samples}')
    note = ("Bits per token: mean next-token cross-entropy over every test position, in bits (perplexity = "
            "2^bits). Bits per byte: the same cross-entropy, summed, over the UTF-8 bytes of the text the predicted "
            "tokens stand for (special tokens, such as end-of-text, count none): it does not depend on the "
            "tokenizer. KL: the live teacher's next-token distribution against the model's, averaged over the same "
            "positions. " + lm_compare_table(result.metrics).split("\n\n", 1)[1].strip().replace("\n", ". ") + ".")
    page = PAGE.format(title="Language-model distillation report", meta=html.escape(result.described),
                       headline=html.escape(lm_headline(result.metrics)), student=COLORS["student"], table=table_html,
                       note=html.escape(note), figures=figures)
    write_text(out["report"], page)
