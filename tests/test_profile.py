"""The benchmark report's profile step (``python -m benchmarks --profile``): every op row
carries the kernel time, host time and host syncs of ours and its baseline; the tables and
plots show them beside the wall speed-up; a report without --profile pays nothing for it
and its rows carry none of it. No timing is asserted: only that readings exist and have
their types."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

import kernels
from benchmarks import bench_roi_align
from benchmarks.__main__ import OPS, markdown, plot
from benchmarks._common import (device_work, kernel_ms, measure, profiling,
                                record_profile)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
FIELDS = [f"{side}_{name}" for side in ("ours", "baseline")
          for name in ("kernel_ms", "host_us", "syncs")]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_tiny_profile_report_profiles_every_row(tmp_path):
    # the GPU kit's dry run runs the report at --tiny on the CPU; with --profile every op
    # row of every op gets the fields: kernel times None (no CUDA kernels), host time the
    # call's wall time, syncs an integer (here: the host's reads of tensor data)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--profile", "--dtype",
                    "float32", "--device", "cpu", "--no-static", "--no-host", "--out",
                    str(tmp_path)], env=env, check=True, capture_output=True, text=True,
                   timeout=600)
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert data["profile"] is True and set(data["benchmarks"]) == set(OPS)
    for op, section in data["benchmarks"].items():
        assert section["rows"], op
        for row in section["rows"]:
            where = f"{op}: {row}"
            assert "profile_error" not in row, where
            for field in FIELDS + ["kernel_speedup"]:
                assert field in row, f"{field} missing in {where}"
            assert row["ours_kernel_ms"] is None and row["baseline_kernel_ms"] is None
            assert row["kernel_speedup"] is None
            assert row["ours_host_us"] > 0 and type(row["ours_syncs"]) is int, where
            if _number(row.get("speedup")):     # the baseline ran
                assert row["baseline_host_us"] > 0, where
                assert type(row["baseline_syncs"]) is int, where
    text = json_path.with_suffix(".md").read_text()
    assert "Profile (`--profile`)" in text
    header = next(line for line in text.splitlines() if line.startswith("| dtype | layout"))
    assert "| speedup | ours_host_us | baseline_host_us | ours_syncs | baseline_syncs |" \
        in header
    assert "kernel" not in header and "torchvision_host_us" not in header


def test_profile_is_a_switch_and_fills_the_baseline_fields():
    # without the switch measure() records no profile field (a plain report pays nothing
    # for it: tests/test_report.py checks a whole report's rows); with it, each provider's
    # own fields, the baseline's copied to baseline_*, and the switch is off again after
    x = torch.rand(64, 4)
    plain = {}
    measure(plain, "ours", lambda: x.sum(0), "cpu", None, reps=1)
    assert not [k for k in plain if k.endswith(("_host_us", "_syncs", "_kernel_ms"))]
    row = {}
    with profiling():
        measure(row, "ours", lambda: x.sum(0), "cpu", None, reps=1)
        assert row["baseline_host_us"] is None and row["kernel_speedup"] is None
        measure(row, "torchvision", lambda: x.nonzero(), "cpu", None, reps=1)
    assert row["ours_host_us"] == 1e3 * row["ours_ms"] and row["ours_syncs"] == 0
    assert row["baseline_host_us"] == row["torchvision_host_us"] == 1e3 * row["torchvision_ms"]
    assert row["baseline_syncs"] == row["torchvision_syncs"] == 1     # nonzero reads x
    assert row["ours_kernel_ms"] is row["baseline_kernel_ms"] is row["kernel_speedup"] is None
    after = {}
    measure(after, "ours", lambda: x.sum(0), "cpu", None, reps=1)
    assert after.keys() == plain.keys()


def test_a_profile_that_raises_keeps_the_row():
    calls = []

    def breaks_when_counted():
        calls.append(1)
        raise RuntimeError("boom")
    row = {}
    record_profile(row, "ours", breaks_when_counted, "cpu", wall_ms=1.0)
    assert row["profile_error"] == "ours: RuntimeError: boom" and calls
    assert row["ours_syncs"] is row["ours_host_us"] is row["baseline_syncs"] is None
    record_profile(row, "torch", lambda: torch.ones(3).sum(), "cpu", wall_ms=0.5)
    assert row["baseline_syncs"] == row["torch_syncs"] == 0
    assert row["baseline_host_us"] == 500.0 and row["profile_error"].startswith("ours:")


class _Event:
    """A stand-in for torch's ``_KinetoEvent`` of a torch build without activity types."""

    def __init__(self, name: str, device, kind: str, ns: int = 0):
        self._name, self._device, self._kind, self._ns = name, device, kind, ns

    def name(self) -> str:
        return self._name

    def device_type(self):
        return self._device

    def is_user_annotation(self) -> bool:
        return self._kind in ("user_annotation", "gpu_user_annotation")

    def duration_ns(self) -> int:
        return self._ns


class _TypedEvent(_Event):
    """... and of one with them."""

    def activity_type(self) -> str:
        return self._kind


@pytest.mark.parametrize("event", [_TypedEvent, _Event], ids=["activity_type", "by_name"])
def test_kernel_time_counts_kernels_memsets_and_device_copies(event):
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    cases = [  # name, device, kineto activity type, counted
        ("_roi_align_kernel", cuda, "kernel", True),
        ("Memset (Device)", cuda, "gpu_memset", True),
        ("Memcpy DtoD (Device -> Device)", cuda, "gpu_memcpy", True),
        ("Memcpy DtoH (Device -> Pageable)", cuda, "gpu_memcpy", False),
        ("Memcpy HtoD (Pageable -> Device)", cuda, "gpu_memcpy", False),
        ("my_range", cuda, "gpu_user_annotation", False),
        ("cudaLaunchKernel", cpu, "cuda_runtime", False),
        ("aten::add", cpu, "cpu_op", False),
    ]
    for name, device, kind, counted in cases:
        assert device_work(event(name, device, kind)) is counted, name


def test_kernel_time_is_the_calls_device_work_per_call_without_the_pad(monkeypatch):
    # kernel_ms on a stand-in profiler (no GPU here): the opening pad kernels are left out,
    # the calls' kernels and device copies summed and divided by the calls, host-device
    # copies left out; a session that lost its whole pad raises instead of reading low
    cuda = torch.autograd.DeviceType.CUDA
    events, pad = [], []

    class Profile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]
            self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(
                events=lambda: events))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: events.extend(pad))

    def call():
        events.extend([_TypedEvent("_roi_align_kernel", cuda, "kernel", 3000),
                       _TypedEvent("Memcpy DtoD (Device -> Device)", cuda, "gpu_memcpy", 500),
                       _TypedEvent("Memcpy DtoH (Device -> Pinned)", cuda, "gpu_memcpy", 900)])
    pad.append(_TypedEvent("at::cuda::spin_kernel(long)", cuda, "kernel", 10_000))
    assert kernel_ms(call, 4) == pytest.approx(3.5e-3)
    events.clear()
    pad.clear()
    with pytest.raises(RuntimeError, match="opening kernels"):
        kernel_ms(call, 4)


def test_markdown_and_plot_show_the_kernel_speedup_only_where_rows_have_it(tmp_path):
    def results(kernel: bool) -> dict:
        row = {"dtype": "float32", "mode": "forward", "ours_ms": 2.0, "torchvision_ms": 1.0,
               "speedup": 0.5, "ours_kernel_ms": 0.5 if kernel else None,
               "ours_host_us": 40.0, "ours_syncs": 0,
               "torchvision_kernel_ms": 1.0 if kernel else None,
               "torchvision_host_us": 9.0, "torchvision_syncs": 0,
               "baseline_kernel_ms": 1.0 if kernel else None, "baseline_host_us": 9.0,
               "baseline_syncs": 0, "kernel_speedup": 2.0 if kernel else None}
        return {"environment": {"device": "CPU test", "torch": "-", "triton": "-",
                                "torchvision": "-", "git_sha": "-"},
                "profile": True, "benchmarks": {"roi_align": {"rows": [row]}}}

    def header(text: str) -> list[str]:
        line = next(x for x in text.splitlines() if x.startswith("| dtype"))
        return [c.strip() for c in line.strip("|").split("|")]
    with_kernels = header(markdown(results(True)))
    at = with_kernels.index("speedup")
    assert with_kernels[at:at + 8] == ["speedup", "kernel_speedup", "ours_kernel_ms",
                                        "baseline_kernel_ms", "ours_host_us",
                                        "baseline_host_us", "ours_syncs", "baseline_syncs"]
    assert "torchvision_host_us" not in with_kernels
    without = header(markdown(results(False)))
    assert not [c for c in without if "kernel" in c] and "ours_host_us" in without
    plain = results(False)
    plain.pop("profile")
    plain["benchmarks"]["roi_align"]["rows"] = [
        {k: v for k, v in plain["benchmarks"]["roi_align"]["rows"][0].items()
         if not k.endswith(("_kernel_ms", "_host_us", "_syncs", "kernel_speedup"))}]
    text = markdown(plain)
    assert "Profile (`--profile`)" not in text and "host_us" not in text
    for kernel in (True, False):
        rows = results(kernel)["benchmarks"]["roi_align"]["rows"]
        png = plot("roi_align", rows, tmp_path / f"{kernel}.png", "CPU test")
        with Image.open(png) as image:
            assert image.format == "PNG"


@CUDA
@pytest.mark.cuda
def test_cuda_kernel_time_of_ours_and_torchvision():
    x, rois = bench_roi_align.make_inputs(16, torch.float32, "cuda", rois_per_image=8,
                                          channels=16, image=(128, 192))
    row = {}
    with profiling():
        measure(row, "ours", lambda: kernels.roi_align(x, rois, 7, 1 / 16, 2), "cuda", None)
        measure(row, "torchvision", lambda: torchvision.ops.roi_align(x, rois, 7, 1 / 16, 2),
                "cuda", None)
    assert "profile_error" not in row, row["profile_error"]
    for side in ("ours", "baseline"):
        assert isinstance(row[f"{side}_kernel_ms"], float) and row[f"{side}_kernel_ms"] > 0
        assert row[f"{side}_host_us"] > 0 and type(row[f"{side}_syncs"]) is int
    assert row["kernel_speedup"] == row["baseline_kernel_ms"] / row["ours_kernel_ms"]
