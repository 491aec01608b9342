"""How results are shown: the markdown comparison, and the HTML report with its figures.

    reports/compare.md       the comparison table, the gap-closed line and what is noise (`compare_table`);
                             the evaluate stage adds the registry gate's verdict line (distill.gate.announce)
    reports/report.html      headline, the registry gate's verdict, comparison table, what is noise, the four
                             figures (embedded)
    reports/figures/*.png    the same figures, for `dvc plots show` and MLflow

The table's columns (`COLUMNS`) are defined once, for both; its rows are the three models and, on
text, the TF-IDF reference. The headline is the share of the teacher-baseline gap the student
closes, with the size and speed the student buys; it says "within noise" where McNemar's test of
student against baseline cannot tell them apart, claims nothing on a test split of a few dozen
rows, and names a model that predicts one class for every row (distill.significance decides,
`noise_lines` words it). Figures (matplotlib, no display needed):
accuracy against size and latency, training curves, confusion matrices, and a
reliability diagram. Everything comes from what `evaluate` computes, so the page
never disagrees with reports/metrics.json.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from distill import significance
from distill.evaluation import PAIRS, Evaluation, no_gap_reason
from distill.gate import REPORT_SLOT
from distill.io import atomic_path, write_text
from distill.task import ROLES

COLORS = {"teacher": "#4C72B0", "student": "#DD8452", "baseline": "#8C8C8C", "reference": "#55A868"}
MODELS = (*ROLES, "reference")  # the table's rows; the reference only where evaluate scored one (text)
FIGURES = ("tradeoff", "training", "confusion", "reliability")
DPI = 110


def headline(metrics: dict) -> str:
    """A few sentences: the gap closed (or why none is claimed: no gap, within noise, too few test rows),
    the student against the reference, the models no better than a constant, and what the student costs
    against the teacher."""
    acc = {m: 100 * metrics[m]["test_accuracy"] for m in ROLES}
    gap, pair, rows = metrics.get("gap_closed"), metrics["student_vs_baseline"], metrics["test_split"]["rows"]
    smaller = metrics["teacher"]["params"] / max(metrics["student"]["params"], 1)
    student_ms, teacher_ms = metrics["student"]["latency_ms_b1"], metrics["teacher"]["latency_ms_b1"]
    size = (f"{smaller:.1f}x fewer parameters than the teacher" if smaller >= 1
            else f"{1 / smaller:.1f}x the teacher's parameters")  # a student larger than its teacher happens
    cost = f"The student has {size} and answers one example in {student_ms:.2f} ms (teacher: {teacher_ms:.2f} ms)."
    versus = f"student {acc['student']:.1f}% vs baseline {acc['baseline']:.1f}%: {100 * pair['difference']:+.1f} points"
    tested = f"McNemar exact {p_text(pair['p_value'])}, {rows:,} test rows"
    if significance.too_few_rows(rows):
        spread = 50 * (metrics["student"]["test_accuracy_ci95_high"] - metrics["student"]["test_accuracy_ci95_low"])
        first = (f"Too few test rows to measure what distillation buys: {versus}, teacher {acc['teacher']:.1f}% "
                 f"({tested}); on {rows} rows one accuracy's 95% interval is about ±{spread:.0f} points. Score a "
                 "larger test split (data.test_fraction, or more data) before drawing a conclusion.")
    elif gap is None:
        first = (f"No gap to close: {no_gap_reason(metrics)}; the student reaches {acc['student']:.1f}%. A stronger "
                 f"teacher (more epochs, a wider model) may change that; until then the baseline is the model to "
                 f"keep.")
    elif significance.within_noise(pair["p_value"]):
        first = (f"Distillation made no difference this test split can tell: {versus}, within noise ({tested}); "
                 f"teacher {acc['teacher']:.1f}%.")
    else:
        first = (f"Distillation closed {100 * gap:.0f}% of the teacher-baseline gap: student {acc['student']:.1f}% vs "
                 f"baseline {acc['baseline']:.1f}% vs teacher {acc['teacher']:.1f}% test accuracy ({tested}).")
    return " ".join([first, *against_reference(metrics), *naive_sentences(metrics), cost])


def against_reference(metrics: dict) -> list[str]:
    """The student against the TF-IDF reference, where there is one (text)."""
    if "student_vs_reference" not in metrics:
        return []
    pair = metrics["student_vs_reference"]
    return [f"Against the TF-IDF reference ({100 * metrics['reference']['test_accuracy']:.1f}%) the student is "
            f"{100 * pair['difference']:+.1f} points, {noise_word(pair['p_value'])} "
            f"(McNemar exact {p_text(pair['p_value'])})."]


def p_text(p: float) -> str:
    """A p-value as read: "p = 0.41", "p < 0.001"."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def noise_word(p: float) -> str:
    return "within noise" if significance.within_noise(p) else "more than noise"


def naive_sentences(metrics: dict) -> list[str]:
    """The models that predict one class for every row, and those no better than always answering the
    majority class (one-sided binomial test, distill.significance.above_majority_p_value)."""
    split, said = metrics["test_split"], []
    for m in (m for m in MODELS if m in metrics):
        if m in split["one_class"]:
            said.append(f"The {m} predicts one class for every row ({split['one_class'][m]}).")
        elif significance.within_noise(metrics[m]["above_majority_p_value"]):
            said.append(f"The {m} ({100 * metrics[m]['test_accuracy']:.1f}%) is no better than always answering "
                        f"{split['majority_class']} ({100 * split['majority_rate']:.1f}%).")
    return said


def noise_lines(metrics: dict) -> list[str]:
    """What is noise, one sentence a line: the test split and its majority class, each paired comparison,
    and the models no better than a constant (compare.md and the report, under the table)."""
    split = metrics["test_split"]
    lines = [f"Test split: {split['rows']:,} rows; its majority class, {split['majority_class']}, is "
             f"{100 * split['majority_rate']:.1f}% of them (the accuracy of always answering it)."]
    for first, second in PAIRS:
        if (pair := metrics.get(f"{first}_vs_{second}")) is not None:
            p = pair["p_value"]
            lines.append(f"{first.capitalize()} vs {second} on the same rows: {100 * pair['difference']:+.1f} points "
                         f"(the {first} alone right on {pair['wins']:,} rows, the {second} alone on "
                         f"{pair['losses']:,}), McNemar exact {p_text(p)}: {noise_word(p)}.")
    return lines + naive_sentences(metrics)


def gap_caveat(metrics: dict) -> str:
    """What the gap-closed figure is worth: "" when the student-baseline difference is more than noise."""
    rows, p = metrics["test_split"]["rows"], metrics["student_vs_baseline"]["p_value"]
    if significance.too_few_rows(rows):
        return f" (on {rows} test rows: too few to tell)"
    return f" (within noise: student vs baseline McNemar exact {p_text(p)})" if significance.within_noise(p) else ""


def tradeoff_figure(metrics: dict) -> Figure:
    """Test accuracy (with its 95 % interval) against parameters and against batch-1 latency, one point
    per model; the reference, which has no latency here, as a dotted level."""
    fig = Figure(figsize=(9, 3.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axes[0], "params", "parameters (log scale)"),
                           (axes[1], "latency_ms_b1", "CPU latency at batch 1, ms")):
        for m in ROLES:
            x, y = metrics[m][key], 100 * metrics[m]["test_accuracy"]
            low, high = (100 * metrics[m][f"test_accuracy_ci95_{end}"] for end in ("low", "high"))
            ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", ms=9, color=COLORS[m], capsize=4, zorder=3,
                        label=m)
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
        if "reference" in metrics:
            ax.axhline(100 * metrics["reference"]["test_accuracy"], ls=":", color=COLORS["reference"],
                       label="reference (TF-IDF)")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.3, y=0.25)
    axes[0].set_xscale("log")
    axes[1].set_xlim(left=0, right=1.3 * max(metrics[m]["latency_ms_b1"] for m in ROLES))
    axes[0].set_ylabel("test accuracy, %")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Accuracy (95% interval) vs size vs latency: up and to the left is better", fontsize=11)
    return fig


def training_figure(histories: dict[str, list[dict]]) -> Figure:
    """Validation accuracy and validation loss by optimizer step, the axis the three models share (the
    baseline takes the student's steps in more, shorter epochs); by epoch for histories without steps."""
    fig = Figure(figsize=(9, 3.6), dpi=DPI, layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    rows_of = {m: histories.get(m) or [] for m in ROLES}
    axis = "step" if all("step" in r for rows in rows_of.values() for r in rows) else "epoch"
    for m, rows in rows_of.items():
        x = [r[axis] for r in rows]
        acc_ax.plot(x, [100 * r["val_accuracy"] for r in rows], marker="o", ms=3, color=COLORS[m], label=m)
        loss_ax.plot(x, [r["val_loss"] for r in rows], marker="o", ms=3, color=COLORS[m], label=m)
    xlabel = "optimizer step" if axis == "step" else "epoch"
    acc_ax.set(xlabel=xlabel, ylabel="validation accuracy, %", title="Validation accuracy")
    loss_ax.set(xlabel=xlabel, ylabel="validation cross-entropy", title="Validation loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def confusion(labels: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    return np.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)


def confusion_figure(labels: np.ndarray, predictions: dict[str, np.ndarray], class_names: list[str],
                     metrics: dict) -> Figure:
    """Row-normalised confusion matrices side by side; counts written in when classes are few."""
    n = len(class_names)
    fig = Figure(figsize=(12, 4.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(ROLES))
    image = None
    for ax, m in zip(axes, ROLES):
        counts = confusion(labels, predictions[m], n)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        low, high = (100 * metrics[m][f"test_accuracy_ci95_{end}"] for end in ("low", "high"))
        ax.set_title(f"{m} ({100 * accuracy:.1f}% correct, 95% interval {low:.1f}-{high:.1f})", fontsize=10)
        ax.set_xlabel("predicted")
        if n <= 12:
            ax.set_xticks(range(n), class_names, fontsize=8)
            ax.set_yticks(range(n), class_names, fontsize=8)
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.6 else "black")
    axes[0].set_ylabel("true class")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class")
    return fig


def reliability_figure(reliability: dict[str, list[dict]], metrics: dict) -> Figure:
    """Accuracy against confidence per bin (on the diagonal = calibrated), and how rows spread over bins."""
    fig = Figure(figsize=(9, 4.2), dpi=DPI, layout="constrained")
    curve_ax, count_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    curve_ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1, label="calibrated")
    for m in ROLES:
        bins = reliability[m]
        conf, accuracy = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        curve_ax.plot(conf, accuracy, color=COLORS[m], lw=1.2, alpha=0.8, label=f"{m} (ECE {metrics[m]['ece']:.3f})")
        # marker area follows the bin's share of rows: a bin of three rows should not look like one of 900
        curve_ax.scatter(conf, accuracy, s=[8 + 400 * b["weight"] for b in bins], color=COLORS[m], alpha=0.7,
                         zorder=3)
        count_ax.plot([b["bin_upper"] for b in bins], [100 * b["weight"] for b in bins], marker="o", ms=3,
                      color=COLORS[m], label=m)
    curve_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top-class probability)",
                 ylabel="accuracy in the bin", title="Reliability diagram (test)")
    count_ax.set(xlabel="confidence bin (upper edge)", ylabel="share of test rows, % (log scale)", yscale="log",
                 title="Where the predictions fall")
    for ax in (curve_ax, count_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def figures(inputs: Evaluation) -> dict[str, Figure]:
    return {
        "tradeoff": tradeoff_figure(inputs.metrics),
        "training": training_figure(inputs.histories),
        "confusion": confusion_figure(inputs.labels, inputs.predictions, inputs.class_names, inputs.metrics),
        "reliability": reliability_figure(inputs.reliability, inputs.metrics),
    }


COLUMNS = [  # metric key, heading, format, which direction is better (None: neither)
    ("test_accuracy", "test accuracy", "{:.2%}", "higher"),
    ("test_accuracy_ci95", "95% interval", "{:.1%}–{:.1%}", None),  # its _low and _high
    ("nll", "NLL", "{:.4f}", "lower"),
    ("ece", "ECE", "{:.4f}", "lower"),
    ("teacher_agreement", "agrees with teacher", "{:.2%}", "higher"),
    ("kl_from_teacher", "KL(teacher ‖ model)", "{:.4f}", "lower"),  # ‖, not ||: a pipe ends a markdown cell
    ("entropy", "entropy", "{:.3f}", None),
    ("params", "parameters", "{:,}", "lower"),
    ("checkpoint_bytes", "checkpoint bytes", "{:,}", "lower"),
    ("latency_ms_b1", "ms at batch 1", "{:.3f}", "lower"),
    ("latency_ms_batch", "ms at large batch", "{:.3f}", "lower"),
]
# The smallest difference worth marking: rates by 0.1 point, latencies (noisy on a shared
# machine) by a quarter, everything else by 5 % of the larger value.
RATES = ("test_accuracy", "teacher_agreement")
LATENCIES = ("latency_ms_b1", "latency_ms_batch")


def matters(key: str, value: float, other: float) -> bool:
    """Whether `value` and `other` differ by more than noise or rounding for this metric."""
    if key in RATES:
        return abs(value - other) >= 0.001
    relative = 0.25 if key in LATENCIES else 0.05
    return abs(value - other) > relative * max(abs(value), abs(other))


def cell(row: dict, key: str, fmt: str) -> str:
    """One model's value under one column; "–" where the model has none (the reference: no checkpoint, no
    latency). The interval column reads the key's _low and _high."""
    values = [row.get(f"{key}_low"), row.get(f"{key}_high")] if key.endswith("_ci95") else [row.get(key)]
    return "–" if None in values else fmt.format(*values)


def compare_table(metrics: dict) -> str:
    """A markdown table of the models, the gap-closed line and what is noise (reports/compare.md)."""
    lines = ["| model | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in (m for m in MODELS if m in metrics):
        lines.append(f"| {m} | " + " | ".join(cell(metrics[m], k, fmt) for k, _, fmt, _ in COLUMNS) + " |")
    gap = metrics.get("gap_closed")
    shown = f"n/a ({no_gap_reason(metrics)})" if gap is None else f"{100 * gap:.1f}%{gap_caveat(metrics)}"
    gap_line = f"Gap closed by distillation (student - baseline) / (teacher - baseline): {shown}"
    return "\n".join([*lines, "", gap_line, "", *noise_lines(metrics)]) + "\n"


def table_html(metrics: dict) -> str:
    """The comparison table; the student's cells are marked better / worse than the baseline's (test
    accuracy only where McNemar's test says the difference is more than noise)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in COLUMNS)
    noisy = significance.within_noise(metrics["student_vs_baseline"]["p_value"])  # on test accuracy, McNemar decides
    rows = []
    for m in (m for m in MODELS if m in metrics):
        cells = []
        for key, _, fmt, better in COLUMNS:
            value, mark = metrics[m].get(key), ""
            if (m == "student" and better and matters(key, value, metrics["baseline"][key])
                    and not (key == "test_accuracy" and noisy)):
                wins = (value > metrics["baseline"][key]) == (better == "higher")
                mark = ' class="better"' if wins else ' class="worse"'
            cells.append(f"<td{mark}>{cell(metrics[m], key, fmt)}</td>")
        rows.append(f'<tr><th><span class="dot" style="background:{COLORS[m]}"></span>{m}</th>{"".join(cells)}</tr>')
    noise = "".join(f"<li>{html.escape(line)}</li>" for line in noise_lines(metrics))
    return f'<table><tr><th>model</th>{head}</tr>{"".join(rows)}</table>\n<ul id="noise">{noise}</ul>'


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto;
        padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }}
.headline {{ font-size: 1.15em; background: #f4f6fa; border-left: 5px solid {student}; padding: 0.8em 1em; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: right; }}
tr th:first-child {{ text-align: left; white-space: nowrap; }}
td.better {{ background: #e3f3e3; }} td.worse {{ background: #f8e1e1; }}
.dot {{ display: inline-block; width: 0.7em; height: 0.7em; border-radius: 50%; margin-right: 0.4em; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
.meta {{ color: #777; font-size: 0.85em; }}
.gate {{ padding: 0.5em 1em; border-left: 5px solid #2e7d32; background: #eef6ee; }}
.gate.failed {{ border-left-color: #c62828; background: #fbeeee; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">{meta}</p>
<p class="headline" id="headline">{headline}</p>
""" + REPORT_SLOT + """
<h2 id="comparison">Comparison (test split)</h2>
{table}
<p class="meta">{note}</p>
{figures}
</body></html>
"""

NOTE = ("Student cells are green where the student beats the baseline (same architecture, seed and optimizer steps, "
        "trained on the labels alone), red where it does worse, unmarked where they differ by less than matters "
        "(0.1 point of a rate, a quarter of a latency, 5 % of anything else; test accuracy only where McNemar's "
        "exact test on the paired test rows gives p < 0.05). Intervals: Wilson, 95 %. The reference (text only) is "
        "TF-IDF over word 1-2-grams and character 2-5-grams with logistic regression, fitted on the same train "
        "rows; its parameters are its coefficients. Gap closed = (student - baseline) / (teacher - baseline) in "
        "test accuracy, when the teacher beats the baseline.")

CAPTIONS = {
    "tradeoff": "Accuracy against size and latency. Distillation pays when the student sits level with the "
                "teacher and above the baseline, at the baseline's size and speed.",
    "training": "Validation accuracy and loss by epoch (the checkpoint kept is the epoch with the best "
                "validation accuracy, the lower loss among equals).",
    "confusion": "Confusion matrices, each row normalised to the true class; numbers are counts.",
    "reliability": "Reliability: accuracy against confidence per bin, each marker's area its share of the "
                   "test rows. On the diagonal, a model's confidence means what it says; below it, the model "
                   "is over-confident. Sparse bins are noisy.",
}


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(inputs: Evaluation, html_out: str | Path, figures_dir: str | Path) -> dict:
    """Write the HTML page (figures embedded, so it opens anywhere, MLflow included) and the PNGs."""
    pngs = {name: png_bytes(fig) for name, fig in figures(inputs).items()}
    with atomic_path(figures_dir) as tmp:
        tmp.mkdir()
        for name, data in pngs.items():
            (tmp / f"{name}.png").write_bytes(data)
    blocks = "\n".join(
        f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>"
        for name, data in pngs.items()
    )
    text = headline(inputs.metrics)
    page = PAGE.format(title="Distillation report", meta=html.escape(inputs.described), headline=html.escape(text),
                       student=COLORS["student"], table=table_html(inputs.metrics), note=html.escape(NOTE),
                       figures=blocks)
    write_text(html_out, page)
    return {"headline": text, "figures": sorted(pngs)}
