"""Evaluate language models on the held-out test windows: teacher, distilled student, baseline.

Per model: cross-entropy in bits per token (and perplexity) over every predicted test
position; KL(teacher || model) in bits per token, with the teacher run live (not its stored
targets); parameters; one window's forward time at batch 1; and a few samples, each a test
prompt continued by top-k sampling (seeded, the same prompts for every model). The student
adds its soft labels' bytes per token (from the lineage in its checkpoint). The gap closed is
(baseline - student) / (baseline - teacher) in bits per token, when the teacher is better.

Outputs: reports/metrics.json, compare.md (table and samples), report.html (headline, table,
the val curves, samples), figures/training.png, curves/<model>.csv (val bits per token by step).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from distill import checkpoint, lm
from distill.checkpoint import count_parameters
from distill.corpus import TASK, read_corpus_meta, read_windows
from distill.errors import UserError
from distill.evaluation import gap_closed, latency_ms
from distill.gate import Check, Verdict, verdict
from distill.io import atomic_path, file_sha256, write_csv, write_json, write_text
from distill.lm import LN2
from distill.lm_params import LMEvaluateConfig, LMRegistryConfig
from distill.report import COLORS, PAGE, png_bytes
from distill.task import ROLES

LATENCY_REPEATS = 20
LM_COLUMNS = (  # key, header, format
    ("test_bits_per_token", "bits / token", "{:.3f}"),
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


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], windows: np.ndarray, batch_size: int, device: torch.device,
          vocab: int) -> dict[str, dict[str, float]]:
    """Per model: mean next-token cross-entropy and KL from the teacher (both nats per token), over
    the tokenizer's `vocab` ids (a pretrained head's padding rows past them left out)."""
    sums = {m: {"ce": 0.0, "kl": 0.0} for m in models}
    count = 0
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start:start + batch_size]).to(device)
        labels = ids[:, 1:].flatten()
        log_t = F.log_softmax(lm.next_token_logits(models["teacher"], ids)[..., :vocab].float(), -1)
        p = log_t.exp()
        for name, model in models.items():
            log_m = log_t if name == "teacher" else F.log_softmax(
                lm.next_token_logits(model, ids)[..., :vocab].float(), -1)
            sums[name]["ce"] += float(F.nll_loss(log_m.flatten(0, 1), labels, reduction="sum"))
            sums[name]["kl"] += float((torch.special.xlogy(p, p) - p * log_m).sum())
        count += labels.numel()
    return {m: {k: v / max(count, 1) for k, v in s.items()} for m, s in sums.items()}


def evaluate_lm(cfg: LMEvaluateConfig, prepared_dir: str | Path, checkpoints: dict[str, str | Path],
                device: torch.device) -> LMEvaluation:
    """Stage step evaluate (language model)."""
    meta = read_corpus_meta(prepared_dir)
    models, ckpts = {}, {}
    for name in ROLES:
        models[name], ckpts[name] = checkpoint.load(checkpoints[name], task=TASK)
        lm.check_lineage(checkpoints[name], ckpts[name], meta)
        models[name].to(device)
    test = read_windows(prepared_dir, "test")
    lineage = ckpts["student"].get("soft_labels") or {}
    if lineage.get("teacher_sha256") not in (None, file_sha256(checkpoints["teacher"])):
        raise UserError(f"{checkpoints['student']}: distilled from another teacher than {checkpoints['teacher']}; "
                        "rerun soft_labels and train_student (dvc repro)")
    nats = score(models, test, cfg.batch_size, device, meta.vocab_size)
    metrics: dict = {}
    for name in ROLES:
        metrics[name] = {"test_bits_per_token": nats[name]["ce"] / LN2,
                         "test_perplexity": math.exp(nats[name]["ce"]),
                         "kl_bits_per_token": max(nats[name]["kl"], 0.0) / LN2,  # not -0.000 from rounding
                         "params": count_parameters(models[name]),
                         "latency_ms_b1": latency_ms(lm.NextTokenLogits(models[name]), torch.from_numpy(test[:1]), 1,
                                                     LATENCY_REPEATS, device),
                         "best_step": ckpts[name].get("step")}
    metrics["student"]["soft_label_bytes_per_token"] = lineage.get("bytes_per_token")
    metrics["student"]["soft_label_targets"] = f"{lineage.get('targets')} {lineage.get('width')}"
    # lower is better in bits: the gap closed is (baseline - student) / (baseline - teacher)
    metrics["gap_closed"] = gap_closed(*(-metrics[m]["test_bits_per_token"] for m in ROLES))
    samples = _samples(cfg, {n: m.cpu() for n, m in models.items()}, test, meta)
    return LMEvaluation(metrics, samples, {m: ckpts[m].get("history", []) for m in ROLES},
                        {m: ckpts[m].get("mlflow_run_id") for m in ROLES},
                        f"{meta.splits['test']['windows']} test windows of {meta.context_length} tokens "
                        f"({meta.splits['test']['documents']} documents); vocabulary {meta.vocab_size}")


def _samples(cfg: LMEvaluateConfig, models: dict, test: np.ndarray, meta) -> dict[str, list[dict[str, str]]]:
    tok = lm.tokenizer(meta)
    picks = np.linspace(0, len(test) - 1, cfg.samples).round().astype(int) if cfg.samples else []
    out: dict[str, list[dict[str, str]]] = {m: [] for m in models}
    size = min(cfg.prompt_tokens, meta.context_length - 1)
    for i, row in enumerate(picks):
        prompt = _document_start(test[row], meta.eos_id, size)
        for name, model in models.items():
            new = lm.generate(model, prompt, cfg.new_tokens, cfg.sample_top_k, cfg.seed + i)
            out[name].append({"prompt": tok.decode(prompt), "continuation": tok.decode(new)})
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
    smaller = metrics["teacher"]["params"] / max(metrics["student"]["params"], 1)
    gap = metrics["gap_closed"]
    closed = ("no gap to close: the teacher is not better than the baseline" if gap is None
              else f"distillation closed {100 * gap:.0f}% of the teacher-baseline gap")
    return (f"Held-out bits per token: student {bits['student']:.3f} vs baseline {bits['baseline']:.3f} vs teacher "
            f"{bits['teacher']:.3f}; {closed}. The student has {smaller:.1f}x fewer parameters than the teacher.")


def lm_compare_table(metrics: dict) -> str:
    lines = ["| model | " + " | ".join(h for _, h, _ in LM_COLUMNS) + " |", "|---" * (len(LM_COLUMNS) + 1) + "|"]
    for m in ROLES:
        lines.append(f"| {m} | " + " | ".join(fmt.format(metrics[m][k]) for k, _, fmt in LM_COLUMNS) + " |")
    gap = metrics["gap_closed"]
    shown = "n/a (the teacher is not better than the baseline)" if gap is None else f"{100 * gap:.1f}%"
    student = metrics["student"]
    size = student["soft_label_bytes_per_token"]
    return ("\n".join(lines) + f"\n\nGap closed by distillation (baseline - student) / (baseline - teacher), bits per "
            f"token: {shown}\nSoft labels: {student['soft_label_targets']}, "
            + ("size not recorded" if size is None else f"{size:.1f} bytes per token") + "\n")


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
                   + "".join(f"<td>{fmt.format(result.metrics[m][k])}</td>" for k, _, fmt in LM_COLUMNS) + "</tr>"
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
            "2^bits). KL: the live teacher's next-token distribution against the model's, averaged over the same "
            "positions. " + lm_compare_table(result.metrics).split("\n\n", 1)[1].strip().replace("\n", ". ") + ".")
    page = PAGE.format(title="Language-model distillation report", meta=html.escape(result.described),
                       headline=html.escape(lm_headline(result.metrics)), student=COLORS["student"], table=table_html,
                       note=html.escape(note), figures=figures)
    write_text(out["report"], page)
