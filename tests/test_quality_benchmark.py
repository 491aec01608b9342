"""The quality benchmark's arithmetic on hand-made numbers."""

import pytest

from benchmarks.quality import aggregate, check_bar, markdown_table


def record(teacher: float, student: float, baseline: float) -> dict:
    def model(acc: float, params: int) -> dict:
        return {"test_accuracy": acc, "params": params, "latency_ms_b1": 0.5}

    return {"teacher": model(teacher, 100_000), "student": model(student, 8_000),
            "baseline": model(baseline, 8_000), "gap_closed": None}


RECORDS = [record(0.98, 0.96, 0.90), record(0.97, 0.95, 0.89), record(0.99, 0.97, 0.91)]


def test_mean_and_sample_std_over_seeds():
    agg = aggregate(RECORDS)
    assert agg["teacher"]["test_accuracy"]["mean"] == pytest.approx(0.98)
    assert agg["teacher"]["test_accuracy"]["std"] == pytest.approx(0.01)  # sample std of .97, .98, .99
    assert agg["student"]["params"] == {"mean": 8000, "std": 0}
    assert agg["seeds"] == 3


def test_gap_closed_per_seed_and_of_the_means():
    agg = aggregate(RECORDS)
    # every seed: (s - b) / (t - b) = 0.06 / 0.08
    assert agg["gap_closed"]["mean"] == pytest.approx(0.75)
    assert agg["gap_closed"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert agg["gap_closed_of_means"] == pytest.approx(0.75)
    assert agg["param_ratio"] == pytest.approx(0.08)


def test_a_seed_where_teacher_and_baseline_tie_is_left_out_of_gap_closed():
    agg = aggregate([record(0.9, 0.95, 0.9), record(0.98, 0.96, 0.90)])
    assert agg["gap_closed"]["mean"] == pytest.approx(0.75) and agg["gap_closed"]["std"] == 0.0


def test_the_bar_checks():
    good = aggregate([record(0.975, 0.965, 0.85)] * 3)  # gap closed 0.115 / 0.125 = 92 %
    checks = check_bar({"mnist1d-cnn": good, "mnist1d-mlp": aggregate([record(0.975, 0.91, 0.7)] * 3)})
    assert all(checks.values()) and len(checks) == 7
    weak = check_bar({"mnist1d-cnn": aggregate([record(0.96, 0.94, 0.90)] * 2)})
    assert not weak["teacher_at_least_97"] and not weak["cnn_student_at_least_95"]
    assert not weak["gap_closed_at_least_90"] and not weak["at_least_3_seeds"]


def test_the_markdown_table_has_a_row_per_model():
    table = markdown_table({"mnist1d-cnn": aggregate(RECORDS)})
    assert table.count("| mnist1d-cnn (3 seeds) |") == 3 and "98.0 ± 1.0" in table and "75.0 ± 0.0" in table


def test_the_sweep_table_puts_temperatures_in_rows_and_alphas_in_columns():
    from benchmarks.sweep import grid_table

    results = [{"temperature": t, "alpha": a, "acc": t / 10 + a / 100} for t in (1, 2) for a in (0.5, 0.9)]
    table = grid_table(results, [1, 2], [0.5, 0.9], "acc", 100, 1)
    assert table.splitlines()[2] == "| 1 | 10.5 | 10.9 |" and table.splitlines()[3] == "| 2 | 20.5 | 20.9 |"
