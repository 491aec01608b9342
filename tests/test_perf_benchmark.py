"""The performance benchmark's arithmetic on hand-made numbers (no timing here)."""

import pytest

from benchmarks.perf import epoch_summary, merge_report, met, online_limit, ratio, storage_summary, summarize
from distill.rows import EpochTiming


def test_ratios_targets_and_the_online_limit():
    assert ratio(3.0, 6.0) == 0.5
    assert met(0.5, "<=", 0.5) and not met(0.51, "<=", 0.5)
    assert met(0.9, ">=", 0.9) and not met(2.0, "<", 2.0)
    # a student epoch of 1 s next to a teacher forward of 3 s: offline can at best take 1/4 of online
    assert online_limit(1.0, 3.0) == 0.25


def test_epoch_summary_weights_data_wait_by_epoch_time():
    timings = [EpochTiming(10.0, 1.0), EpochTiming(30.0, 1.0), EpochTiming(20.0, 0.0)]
    summary = epoch_summary(timings)
    assert summary == {"median_epoch_s": 20.0, "epochs": 3, "data_wait_fraction": pytest.approx(2 / 60)}


def test_storage_compares_float16_with_float32_in_bytes_and_points():
    entries = {"float32": {"bytes": 4000, "student_test_accuracy": 0.975},
               "float16": {"bytes": 1900, "student_test_accuracy": 0.972}}
    summary = storage_summary(entries)
    assert summary["float16_bytes_ratio"] == pytest.approx(0.475)
    assert summary["float16_accuracy_change_pt"] == pytest.approx(0.3)


def test_summary_lists_every_target_with_whether_it_is_met():
    results = {
        "offline_vs_online": {"ratio": 0.4, "accuracy_difference_pt": 0.1},
        "dump_throughput": {"ratio": 0.85},
        "storage": {"datasets": {"d": {"float16_bytes_ratio": 0.49, "float16_accuracy_change_pt": 0.0}}},
        "cache_overhead": {"ratio": 1.2},
        "framework_overhead": {"ratio": 1.31},
        "memory": {"stages": {"soft_labels": {"1000000": {"peak_rss_gb": 0.6}, "ratio_1m_to_100k": 1.1}}},
        "data_loading": {"streamed": {"data_wait_fraction": 0.02}},
    }
    rows = {row["what"]: row["met"] for row in summarize(results)}
    assert rows == {
        "offline / online epoch time": True,
        "|accuracy difference| (pt)": True,
        "stage rows/s / bare inference rows/s": False,
        "d: float16 / float32 bytes": True,
        "d: |float16 - float32 accuracy| (pt)": True,
        "cached dvc repro: project / trivial": True,
        "dvc repro / bare PyTorch": False,
        "soft_labels: peak RSS at 1M rows (GB)": True,
        "soft_labels: peak RSS 1M / 100k rows": True,
        "streamed: data wait / epoch time": True,
    }
    assert summarize({}) == []


def test_merging_one_remeasured_measure_keeps_the_others_and_notes_its_command():
    old = {"command": "python benchmarks/perf.py", "measured_at": "then", "machine": {"cpus": 2},
           "measure_wall_s": {"cache_overhead": 9.0, "memory": 70.0},
           "cache_overhead": {"ratio": 0.9}, "memory": {"stages": {}}}
    memory = {"stages": {"train_student": {"1000000": {"peak_rss_gb": 0.5}, "ratio_1m_to_100k": 1.1}}}
    new = {"command": "python benchmarks/perf.py --only memory --merge", "measured_at": "now",
           "machine": {"cpus": 2}, "measure_wall_s": {"memory": 80.0}, "memory": memory}
    merged = merge_report(old, new)
    assert merged["cache_overhead"] == {"ratio": 0.9} and merged["memory"] == memory
    assert merged["command"] == "python benchmarks/perf.py" and merged["measured_at"] == "then"
    assert merged["measure_wall_s"] == {"cache_overhead": 9.0, "memory": 80.0}
    assert merged["remeasured"] == {"memory": {"command": new["command"], "measured_at": "now",
                                               "machine": {"cpus": 2}}}
    assert {row["measure"] for row in merged["summary"]} == {"cache_overhead", "memory"}
