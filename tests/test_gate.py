"""The registry gate: latency a busy machine does not decide, and one verdict line, with its
reason, in the terminal, compare.md and report.html, for both tasks."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_stage_in_process, tiny_params, write_params
from distill.checkpoint import build_model, count_parameters
from distill.classification_params import RegistryConfig
from distill.evaluation import latency_ms, passes_gate
from distill.gate import REPORT_SLOT, Check, Verdict, announce, verdict, verdict_line
from distill.lm_evaluation import lm_passes_gate
from distill.lm_params import LMRegistryConfig

GATE = RegistryConfig(min_test_accuracy=0.9, max_latency_ms_b1=10.0)


def registered(version=None, holder=None, why=None) -> dict:
    return {"registered_version": version, "champion_version": holder, "unregistered": why}


def test_a_passing_student_moves_the_alias_and_every_check_is_the_reason():
    result = passes_gate({"test_accuracy": 0.934, "latency_ms_b1": 0.1093}, GATE)
    assert result == Verdict(True, "accuracy 0.93 >= 0.9, latency 0.11 ms <= 10 ms")
    assert verdict_line(result, "champion", registered("3", "3")) == (
        "champion moves to version 3: accuracy 0.93 >= 0.9, latency 0.11 ms <= 10 ms")


def test_a_failing_student_leaves_the_alias_where_it_was_and_names_only_the_failed_check():
    result = passes_gate({"test_accuracy": 0.95, "latency_ms_b1": 72.4}, GATE)
    assert result == Verdict(False, "latency 72 ms > 10 ms")
    assert verdict_line(result, "champion", registered("3", "1")) == (
        "champion stays on version 1: latency 72 ms > 10 ms (version 3 registered without it)")
    assert verdict_line(result, "champion", registered("1")) == (  # a fresh registry: no version has it
        "champion stays unset: latency 72 ms > 10 ms (version 1 registered without it)")


def test_nothing_registered_says_why_and_still_gives_the_verdict():
    result = passes_gate({"test_accuracy": 0.5, "latency_ms_b1": 0.1}, GATE)
    assert verdict_line(result, "champion", registered(why="tracking is off")) == (
        "champion not moved, nothing registered (tracking is off); the gate failed: accuracy 0.5 < 0.9")


@pytest.mark.parametrize("check, shown", [
    (Check("accuracy", 0.8996, 0.9, ceiling=False), "accuracy 0.8996 < 0.9"),  # not "0.9 < 0.9"
    (Check("latency", 10.0, 10.0, ceiling=True, unit=" ms"), "latency 10 ms <= 10 ms"),
    (Check("latency", 123.4, 10.0, ceiling=True, unit=" ms"), "latency 120 ms > 10 ms"),
])
def test_a_check_reads_as_a_comparison_that_is_true(check, shown):
    assert str(check) == shown


def test_the_language_models_gate_says_its_bits_per_token():
    gate = LMRegistryConfig(max_test_bits_per_token=8.0)
    assert lm_passes_gate({"test_bits_per_token": 4.213}, gate) == Verdict(True, "bits per token 4.2 <= 8")
    assert lm_passes_gate({"test_bits_per_token": 9.5}, gate) == Verdict(False, "bits per token 9.5 > 8")
    assert verdict([]).passed


def test_the_verdict_goes_into_compare_md_before_its_samples_and_into_the_reports_slot(tmp_path, caplog):
    compare, report = tmp_path / "compare.md", tmp_path / "report.html"
    compare.write_text("| model |\n|---|\n\nGap closed: 75%\n\n## Samples\n\nPrompt 1\n")
    report.write_text(f"<body><p id=headline>h</p>\n{REPORT_SLOT}\n<h2>table</h2></body>")
    caplog.set_level(logging.INFO, logger="distill.gate")
    assert announce("champion stays on version 1: latency 72 ms > 10 ms", False, compare, report) == [compare, report]
    assert compare.read_text() == ("| model |\n|---|\n\nGap closed: 75%\n\n"
                                   "Registry: champion stays on version 1: latency 72 ms > 10 ms\n\n## Samples\n\n"
                                   "Prompt 1\n")
    assert ('<p class="gate failed" id="gate">Registry: champion stays on version 1: latency 72 ms &gt; 10 ms</p>'
            in report.read_text())
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "registry: champion stays on version 1: latency 72 ms > 10 ms")]


def busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


@pytest.mark.timed
def test_latency_beside_two_cpu_bound_processes_stays_near_the_idle_figure():
    # the MNIST-1D student: 8,218 parameters, 40 features, 10 classes
    model = build_model({"arch": "cnn1d", "num_features": 40, "num_classes": 10, "hidden": [32], "dropout": 0.0,
                         "channels": [16, 16, 16], "kernel_size": 5})
    assert count_parameters(model) == 8218
    x = torch.randn(64, 40)
    threads = torch.get_num_threads()
    idle = latency_ms(model, x, 1, 200)
    busy = busy_processes(2)
    try:
        time.sleep(0.5)  # both spinning
        loaded = latency_ms(model, x, 1, 200)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert loaded < 5 * idle, f"idle {idle:.3f} ms, beside two busy processes {loaded:.3f} ms"
    assert torch.get_num_threads() == threads  # the measurement's thread count is undone


@pytest.mark.parametrize("min_accuracy, passed", [(1.0, False), (0.0, True)])
def test_the_evaluate_stage_says_the_verdict_and_its_reason(built_project, caplog, min_accuracy, passed):
    write_params(built_project / "params.yaml", tiny_params(**{"registry.min_test_accuracy": min_accuracy}))
    caplog.set_level(logging.INFO, logger="distill.gate")
    result = run_stage_in_process(built_project, "evaluate")
    accuracy = f"accuracy {result['student']['test_accuracy']:.2g}"
    reason = (f"{accuracy} >= 0, latency" if passed else f"{accuracy} < 1")
    line = f"champion not moved, nothing registered (tracking is off); the gate {'passed' if passed else 'failed'}: "
    assert result["gate"].startswith(line + reason)
    assert f"Registry: {result['gate']}\n" in (built_project / "reports/compare.md").read_text()
    assert 'id="gate">Registry: ' in (built_project / "reports/report.html").read_text()
    assert [r.getMessage() for r in caplog.records] == [f"registry: {result['gate']}"]
