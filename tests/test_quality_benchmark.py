"""The quality benchmarks' arithmetic (classifiers, and the language model's) on hand-made numbers."""

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


def lm_record(seed: int, shift: float, targets: bool = True) -> dict:
    """A language-model seed's record: bits per token and per byte; with `targets`, every stored form's
    student as good as the default pipeline's."""
    from benchmarks.lm_quality import STAGES, TARGETS

    bits = {"teacher": (6.9, 2.0), "student": (7.0, 2.1), "baseline": (7.4, 2.4)}
    metrics = {m: {"test_bits_per_token": t + shift, "test_bits_per_byte": b + shift, "kl_bits_per_token": 0.1,
                   "params": 1000} for m, (t, b) in bits.items()}
    record = {"seed": seed, "metrics": metrics, "gap_closed": 0.8, "gap_closed_bits_per_byte": 0.75,
              "stage_seconds": dict.fromkeys(STAGES, 60.0), "wall_minutes": 6.0}
    if targets:
        record["targets"] = {name: {"bytes_per_token": 40.0, "student_bits_per_token": 7.0 + shift,
                                    "student_bits_per_byte": 2.1 + shift} for name in TARGETS}
        record["default_targets"] = "sampled-32"
    return record


def test_the_lm_benchmark_aggregates_and_tables_bits_per_byte_beside_bits_per_token():
    from benchmarks.lm_quality import aggregate, markdown

    agg = aggregate([lm_record(0, 0.0), lm_record(1, 0.2)])
    assert agg["bits_per_byte"]["student"]["mean"] == pytest.approx(2.2)
    assert agg["bits_per_byte"]["student"]["std"] == pytest.approx(0.2 / 2 ** 0.5)  # sample std of 2.1 and 2.3
    assert agg["gap_closed_bits_per_byte"] == {"mean": pytest.approx(0.75), "std": 0.0}
    assert agg["targets"]["top-8"]["student_bits_per_byte"]["mean"] == pytest.approx(2.2)
    table = markdown(agg, [0, 1])
    assert "| model | parameters | bits / token | bits / byte |" in table
    assert "| student | 1,000 | 7.100 ± 0.141 | 2.200 ± 0.141 | 0.100 ± 0.000 |" in table
    assert "80.0% ± 0.0% in bits per token, 75.0% ± 0.0% in bits per byte" in table
    # (7.4 - 7.0) / (7.4 - 6.9) of the gap on either seed
    assert "| sampled-32 (the default) | 40.0 ± 0.0 | 1.0000 | 7.100 ± 0.141 | 2.200 ± 0.141 | 1.0000 ± 0.0000 | " \
           "80.0% ± 0.0% |" in table
    alone = aggregate([lm_record(0, 0.0, targets=False)])  # --no-targets: the models' table alone
    assert alone["targets"] == {} and "| baseline | 1,000 | 7.400 ± 0.000 | 2.400 ± 0.000 |" in markdown(alone, [0])
