"""The registry's quality gate, for every task: the thresholds a distilled student must meet,
whether it met them and why, and the one line that says what became of the serving alias.

A task's gate (`evaluation.passes_gate`, `lm_evaluation.lm_passes_gate`, or a task of your
own) is a list of `Check`s made into a `Verdict` by `verdict`. After the evaluate stage has
registered the student (distill/model_registry.py), `verdict_line` says in one line what
happened, and `announce` logs it and writes it into the stage's compare.md and report.html,
so the terminal, the report, MLflow's copy of both and the Prefect run's artifact (which
embeds compare.md) all say it:

    champion moves to version 3: accuracy 0.93 >= 0.9, latency 0.11 ms <= 10 ms
    champion stays on version 1: latency 72 ms > 10 ms (version 3 registered without it)
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from distill.io import write_text

log = logging.getLogger(__name__)

REPORT_SLOT = "<!-- registry gate -->"  # where report.html's page (report.PAGE) takes the verdict


@dataclass(frozen=True)
class Check:
    """One threshold of a gate: `value` must be at most `limit` (a `ceiling`) or at least it."""

    name: str  # as the verdict says it: "accuracy", "latency"
    value: float
    limit: float
    ceiling: bool
    unit: str = ""  # as written after a number: " ms"

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.ceiling else self.value >= self.limit

    def __str__(self) -> str:
        sign = ("<=" if self.met else ">") if self.ceiling else (">=" if self.met else "<")
        return f"{self.name} {_shown(self.value, self.limit)}{self.unit} {sign} {self.limit:g}{self.unit}"


@dataclass(frozen=True)
class Verdict:
    """Whether the student passed, and why: every check when it passed, the checks it failed when not."""

    passed: bool
    reason: str = ""


def verdict(checks: Iterable[Check]) -> Verdict:
    """The gate's verdict over its checks: passed when every one is met."""
    checks = list(checks)
    failed = [c for c in checks if not c.met]
    return Verdict(not failed, ", ".join(str(c) for c in failed or checks))


def as_verdict(passed: bool | Verdict) -> Verdict:
    """A task's gate outcome (evaluate's "passed") as a Verdict: a task of your own may return a bool."""
    return passed if isinstance(passed, Verdict) else Verdict(bool(passed))


def verdict_line(result: Verdict, alias: str, registered: dict) -> str:
    """What became of `alias` and why, in one line. `registered`: model_registry.register_student's
    answer (the version registered, the version holding the alias after it, or why none was)."""
    outcome = "passed" if result.passed else "failed"
    why = f": {result.reason}" if result.reason else f": the gate {outcome}"
    version, holder = registered.get("registered_version"), registered.get("champion_version")
    if version is None:
        return f"{alias} not moved, nothing registered ({registered.get('unregistered')}); the gate {outcome}{why}"
    if result.passed:
        return f"{alias} moves to version {version}{why}"
    kept = f"stays on version {holder}" if holder else "stays unset"
    return f"{alias} {kept}{why} (version {version} registered without it)"


def announce(line: str, passed: bool, compare: Path | None = None, report: Path | None = None) -> list[Path]:
    """Log the verdict line and write it into compare.md (before its first section heading, else at
    the end) and report.html (at the page's REPORT_SLOT, else before </body>), where they exist.
    Returns the files it changed."""
    (log.info if passed else log.warning)("registry: %s", line)
    changed = []
    if compare is not None and compare.is_file():
        text = compare.read_text()
        head, sep, rest = text.partition("\n## ")
        write_text(compare, f"{head.rstrip()}\n\nRegistry: {line}\n" + (f"\n{sep.lstrip()}{rest}" if sep else ""))
        changed.append(compare)
    if report is not None and report.is_file():
        page = report.read_text()
        block = f'<p class="gate {"passed" if passed else "failed"}" id="gate">Registry: {html.escape(line)}</p>'
        slot = REPORT_SLOT if REPORT_SLOT in page else "</body>"
        write_text(report, page.replace(slot, block + ("" if slot == REPORT_SLOT else "\n" + slot), 1))
        changed.append(report)
    return changed


def _shown(value: float, limit: float) -> str:
    """`value` to two significant digits, or more where two would read as the limit itself."""
    for digits in range(2, 8):
        text = f"{float(f'{value:.{digits}g}'):g}"
        if float(text) != limit or value == limit:
            break
    return text
