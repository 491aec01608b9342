"""The quality benchmarks' arithmetic (classifiers, and the language model's) on hand-made numbers."""

import json

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


def lm_record(seed: int, shift: float) -> dict:
    """A made-up seed of benchmarks/lm_quality.py: the default pipeline, a dense variant, a loss and a
    student with its own tokenizer (bits per byte of its own)."""
    from benchmarks.lm_quality import STAGES

    bits = {"teacher": (6.9, 2.0), "student": (7.0, 2.1), "baseline": (7.4, 2.4)}
    metrics = {m: {"test_bits_per_token": t + shift, "test_bits_per_byte": b + shift, "params": 1000}
               for m, (t, b) in bits.items()}
    dense = {m: dict(v) for m, v in metrics.items()}
    dense["student"]["test_bits_per_token"] = 6.95 + shift
    cross = {"teacher": metrics["teacher"], "student": {"test_bits_per_token": 6.6, "test_bits_per_byte": 2.2 + shift,
                                                          "params": 700},
             "baseline": {"test_bits_per_token": 6.8, "test_bits_per_byte": 2.3 + shift, "params": 700}}
    variant = {"seed": seed, "bytes_per_token": 15.0, "targets": "sampled", "width": 14}
    return {"seed": seed, "metrics": metrics, "gap_closed": 0.8, "gap_closed_bits_per_byte": 0.75, "samples": 14,
            "bytes_per_token": 15.5, "targets": "sampled", "stage_seconds": dict.fromkeys(STAGES, 60.0),
            "wall_minutes": 6.0,
            "variants": {"dense": variant | {"group": "targets", "bytes_per_token": 6000.0, "metrics": dense,
                                             "gap_closed": 0.9, "gap_closed_bits_per_byte": 0.9},
                         "cross-2048": variant | {"group": "cross", "metrics": cross, "gap_closed": None,
                                                  "gap_closed_bits_per_byte": 0.5}}
            | ({"jsd": variant | {"group": "loss", "metrics": metrics, "gap_closed": 0.8,
                                  "gap_closed_bits_per_byte": 0.75}} if seed == 0 else {})}


def test_the_lm_benchmark_aggregates_each_variant_over_the_seeds_it_ran_and_checks_the_aims():
    from benchmarks.lm_quality import aggregate, markdown

    agg = aggregate([lm_record(0, 0.0), lm_record(1, 0.2)])
    d = agg["default"]
    assert d["student.test_bits_per_byte"]["mean"] == pytest.approx(2.2)
    assert d["student.test_bits_per_byte"]["std"] == pytest.approx(0.2 / 2 ** 0.5)  # sample std of 2.1 and 2.3
    assert d["student_bits_ratio_to_dense"]["mean"] == pytest.approx((7.0 / 6.95 + 7.2 / 7.15) / 2)
    assert agg["jsd"]["seeds"] == [0] and agg["cross-2048"]["seeds"] == [0, 1]
    assert agg["aims_met"] == {"student_beats_baseline": True, "sampled_bytes": True, "wall_time": True,
                               "sampled_within_dense": False}  # 0.7 % over dense; the cross aim needs 3 seeds
    assert aggregate([lm_record(s, 0.1 * s) for s in range(3)])["aims_met"]["cross_gap_closed"] is True
    table = markdown(agg, [0, 1])
    assert "| student | 1,000 | 7.100 ± 0.141 | 2.200 ± 0.141 |" in table
    assert "80.0% ± 0.0% in bits per token, 75.0% ± 0.0% in bits per byte" in table
    assert ("| sampled-14, every draw's rank among what follows its token, delta-coded (the default) | 0, 1 | "
            "15.5 ± 0.0 |") in table
    assert "| forward_kl (the default loss; the dense variant) | 0, 1 | 7.050 ± 0.141 |" in table  # the same targets
    assert "| jsd | 0 | 7.000 ± 0.000 |" in table
    assert "| cross-2048 | 0, 1 | 6.600 ± 0.000 | 6.800 ± 0.000 | 2.300 ± 0.141 | 2.400 ± 0.141 | – | 50.0% ± 0.0% |" \
        in table


def test_a_variant_runs_with_the_one_it_reads_and_is_reused_whatever_the_keys_its_targets_do_not_read():
    from benchmarks.lm_quality import DENSE, effective, params_for, with_sources

    assert with_sources(["jsd", "cross-2048-256"]) == ["dense", "cross-2048", "jsd", "cross-2048-256"]
    dense = params_for(0, DENSE)
    assert effective(dense) == effective(dense | {"soft_labels": dense["soft_labels"] | {"samples": 3}})
    sampled = params_for(0)
    assert effective(sampled) != effective(sampled | {"soft_labels": sampled["soft_labels"] | {"samples": 3}})


def test_a_variant_run_with_other_params_is_left_out_and_one_run_with_other_code_is_rerun_and_named(tmp_path):
    from benchmarks.lm_quality import VARIANTS, code_of, current_result, finished_variants, params_for

    def today(name):
        return params_for(0, VARIANTS[name][1]), code_of(VARIANTS[name][2])

    assert "../distill/lm_soft_labels.py" in today("dense")[1] and "../stages/train_teacher.py" not in today("dense")[1]
    params, code = today("reverse_kl")
    edited = code | {"../distill/lm_losses.py": "0" * 64}
    assert edited != code
    for name, (params, code) in {"dense": today("dense"), "random-256": today("random-256"),
                                 "jsd": ({"soft_labels": {"targets": "x"}}, today("jsd")[1]),
                                 "tvd": (None, today("tvd")[1]), "reverse_kl": (params, edited),
                                 "skew_kl": (today("skew_kl")[0], None)}.items():
        (tmp_path / "seed0" / name).mkdir(parents=True)
        (tmp_path / "seed0" / name / "result.json").write_text(json.dumps({"params": params, "code": code}))
    kept, stale, other_code = finished_variants(tmp_path, 0)
    assert list(kept) == ["dense", "reverse_kl", "skew_kl", "random-256"] and stale == ["jsd", "tvd"]
    assert other_code == ["reverse_kl", "skew_kl"]
    assert [n for n in kept if current_result(tmp_path, 0, n) is not None] == ["dense", "random-256"]  # not rerun
