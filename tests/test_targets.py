"""Issue 18's speed targets read from a benchmark report (``benchmarks.targets``): a target
is met only when every row it concerns reaches its minimum and every required combination
was measured. Reports built here from the benchmarks' own shape lists."""
from __future__ import annotations

import itertools

import pytest

from benchmarks import bench_nms, bench_roi_align, targets
from benchmarks.__main__ import markdown


def _report(speedup: float = 5.0, device: str = "NVIDIA H200") -> dict:
    """The rows the full GPU report writes for roi_align (its deterministic rows left out)
    and nms, each at ``speedup``."""
    roi = []
    for dtype, layout, level, head in itertools.product(
            targets.TARGET_DTYPES, bench_roi_align.LAYOUTS, bench_roi_align.LEVELS,
            bench_roi_align.HEADS):
        for mode in bench_roi_align.MODES[:2]:       # (the targets read no deterministic row)
            roi.append({"dtype": dtype, "layout": layout, "level": level, "head": head,
                        "mode": mode, "parity": "ok", "speedup": speedup})
    nms = [{"dtype": dtype, "op": op, "classes": classes, "boxes": n, "parity": "ok",
            "speedup": speedup}
           for dtype, n, (op, classes) in itertools.product(
               targets.TARGET_DTYPES, bench_nms.SIZES, bench_nms.CASES)]
    return {"environment": {"device": device, "torch": "-", "triton": "-", "torchvision": "-",
                            "git_sha": "-"},
            "benchmarks": {"roi_align": {"rows": roi}, "nms": {"rows": nms}}}


def _status(report: dict) -> dict[str, str]:
    return {v["target"]: v["status"] for v in targets.evaluate(report)}


def test_every_target_is_met_when_every_row_is_fast_enough():
    verdicts = targets.evaluate(_report())
    assert [v["status"] for v in verdicts] == ["met"] * len(targets.TARGETS)
    assert all(v["rows"] > 0 and not v["missing"] for v in verdicts)


def test_one_slow_row_misses_its_target_and_only_its_own():
    report = _report()
    for row in report["benchmarks"]["roi_align"]["rows"]:
        if (row["dtype"], row["layout"], row["level"], row["mode"]) == (
                "bfloat16", "channels_last", "P3", "forward"):
            row["speedup"] = 1.4
    verdicts = {v["target"]: v for v in targets.evaluate(report)}
    forward = verdicts[targets.TARGETS[0].name]
    assert forward["status"] == "missed"
    assert forward["below"] == ["bfloat16 channels_last P3 box 7x7: 1.40x",
                                "bfloat16 channels_last P3 mask 14x14: 1.40x"]
    assert forward["worst"].startswith("1.40x")
    assert [v["status"] for v in verdicts.values()][1:] == ["met"] * (len(targets.TARGETS) - 1)


@pytest.mark.parametrize("speedup, status", [(0.99, "missed"), (1.0, "met")])
def test_batched_nms_never_slower_reads_every_size(speedup, status):
    report = _report()
    for row in report["benchmarks"]["nms"]["rows"]:
        if row["op"] == "batched_nms" and row["classes"] == 5 and row["boxes"] == 1000:
            row["speedup"] = speedup
    assert _status(report)[targets.TARGETS[4].name] == status


def test_missing_layout_or_class_count_is_not_measured():
    report = _report()
    section = report["benchmarks"]["roi_align"]
    section["rows"] = [r for r in section["rows"] if r["layout"] == "NCHW"]
    report["benchmarks"]["nms"]["rows"] = [r for r in report["benchmarks"]["nms"]["rows"]
                                           if r["classes"] != 5]
    verdicts = targets.evaluate(report)
    assert [v["status"] for v in verdicts] == ["not measured", "not measured", "met", "met",
                                               "not measured"]
    assert {"dtype": "float32", "layout": "channels_last"} in verdicts[0]["missing"]
    assert {"classes": 5, "boxes": 20000} in verdicts[4]["missing"]


def test_a_mismatch_or_a_failed_benchmark_meets_nothing():
    report = _report()
    row = next(r for r in report["benchmarks"]["nms"]["rows"]
               if r["op"] == "nms" and r["boxes"] == 5000)
    row["parity"] = "MISMATCH: kept sets differ"
    assert _status(report)[targets.TARGETS[2].name] == "missed"
    report["benchmarks"]["roi_align"] = {"error": "RuntimeError: boom"}
    verdicts = targets.evaluate(report)
    assert verdicts[0]["status"] == "not measured" and "boom" in verdicts[0]["error"]
    assert "benchmark failed" in "\n".join(targets.lines(verdicts))


def test_gpu_reports_open_with_the_targets_cpu_reports_do_not():
    slow = _report(speedup=0.5)
    text = markdown(slow)
    assert "## Speed targets (issue 18)" in text
    assert text.count("| missed |") == len(targets.TARGETS)
    assert "Speed targets" not in markdown(_report(device="CPU x86_64 x2"))
