"""The GPU kit (``make gpu`` = ``python3 -m benchmarks.gpu``), proven before a GPU arrives.

The dry run executes the same six steps on this CPU at tiny sizes and must write the same
files; the budget logic is checked with steps that overrun on purpose; the suite must
collect without pycocotools (the GPU machine has none) and select backends as the kit asks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import kernels
from benchmarks import bench_paste_masks_in_image, targets
from benchmarks.gpu import kit
from kernels import _utils
from kernels import _launch
from kernels.ops import roi_align as roi_align_ops

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TEST_BACKENDS")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run")
    t0 = time.monotonic()
    # a budget above the 180 s default, so a loaded CI machine cannot cut a step: the
    # caps themselves are tested below with steps that overrun on purpose
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out",
                           str(out), "--budget", "420"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return out, proc, time.monotonic() - t0


def test_dry_run_runs_every_step_and_writes_the_files(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = summary["steps"]
    assert [s["name"] for s in steps] == [s.name for s in kit.PLAN]
    for s in steps:
        assert s["status"] == "passed", s
        assert 0 < s["seconds"] <= s["cap_s"] + kit.KILL_GRACE, s
        assert (out / s["log"]).read_text().strip(), s["log"]
    counts = {s["name"]: s["counts"] for s in steps}
    assert counts["environment"]["copy_bandwidth_GBps"] > 0
    assert counts["smoke"]["checks"] == counts["smoke"]["passed"] >= 17
    assert counts["tests"]["passed"] > 0 and counts["tests"]["failed"] == 0
    assert counts["memcheck"]["launches"] > 0 and counts["memcheck"]["missing"] == []
    assert counts["benchmarks"]["mismatches"] == 0 and counts["benchmarks"]["rows"] > 0
    assert counts["static"]["rows"] > 0 and counts["static"]["compile_failures"] == 0
    # issue 18's targets, read from the report: even at tiny sizes the roi_align rows hold
    # both layouts, the combinations its targets require (and both dtypes, but the CPU's
    # torchvision has no bfloat16 baseline to time them against)
    verdicts = {v["target"]: v for v in counts["benchmarks"]["targets"]}
    assert list(verdicts) == [t.name for t in targets.TARGETS]
    for t in targets.TARGETS[:2]:
        assert verdicts[t.name]["rows"], t.name
        assert {m["dtype"] for m in verdicts[t.name]["missing"]} == {"bfloat16"}, t.name
    assert "speed targets (issue 18): dry run" in proc.stdout
    # the benchmark report came back with the static section beside the times
    report = json.loads((out / counts["benchmarks"]["report"]).read_text())
    assert set(report["benchmarks"]) == {"roi_align", "multiscale_roi_align", "nms",
                                         "mask_loss", "mask_predictor_loss",
                                         "paste_masks_in_image", "model"}
    assert report["static"]["rows"]
    # what the device tool brings back: at most 8 flat files of at most 16 MiB
    assert kit.check_out_folder(out) == []
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= kit.MAX_FILES and "summary.json" in files
    # the one-screen summary is printed last
    assert proc.stdout.rindex("GPU kit (dry run)") > proc.stdout.rindex("[gpu kit]")
    print(f"dry run: {seconds:.0f} s")


def test_unpack_brings_a_run_into_results(dry_run, tmp_path):
    out, _, _ = dry_run
    written = kit.unpack(out, tmp_path)
    names = {p.name for p in written}
    summary = json.loads((out / "summary.json").read_text())
    slug = kit.slug(summary["environment"]["device"])
    assert {f"{slug}.json", f"{slug}.md", f"{slug}-gpu-summary.json"} <= names
    assert any(n.endswith(".png") for n in names)
    assert "## Static kernel report" in (tmp_path / f"{slug}.md").read_text()


def _running(pid: int) -> bool:
    """A live process (a zombie waiting for a reaper that may never come counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _step(name, code, status=None):
    """A kit step that runs ``python -c code``."""
    return kit.Step(name, f"test step {name}",
                    lambda ctx: ([sys.executable, "-c", code], {}),
                    lambda ctx, rc: (status, None, {}))


def test_a_step_over_its_cap_is_cut_and_the_rest_keep_their_share(tmp_path, monkeypatch):
    # the slow step starts a child that also sleeps: the whole process group must die
    pid_file = tmp_path / "child.pid"
    slow = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    monkeypatch.setattr(kit, "PLAN", [_step("environment", "pass"), _step("smoke", slow),
                                      _step("tests", "import sys; sys.exit(3)"),
                                      _step("memcheck", "pass")])
    monkeypatch.setattr(kit, "SHARES", {"environment": 3, "smoke": 4, "tests": 3,
                                        "memcheck": 3})
    monkeypatch.setattr(kit, "KILL_GRACE", 1.0)
    ctx = kit.Context(out=tmp_path, work=tmp_path, dry_run=False)
    t0 = time.monotonic()
    summary = kit.run_plan(ctx, budget=20, echo=lambda line: None)
    elapsed = time.monotonic() - t0
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"environment": "passed", "smoke": "timed-out", "tests": "failed",
                      "memcheck": "passed"}
    assert elapsed < 20
    smoke = summary["steps"][1]
    assert "cut at" in smoke["reason"] and smoke["seconds"] < smoke["cap_s"] + 3
    assert "exit code 3" in summary["steps"][2]["reason"]
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not _running(child), "the slow step's child outlived the cut"
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary["steps"]


def test_caps_are_the_shares_scaled_to_the_budget():
    caps = kit.caps(270)
    assert sum(caps.values()) == pytest.approx(270)
    assert caps["benchmarks"] == pytest.approx(kit.SHARES["benchmarks"] / 2)
    assert sum(kit.caps(180, dry_run=True).values()) == pytest.approx(180)


def test_out_folder_limits(tmp_path):
    for i in range(kit.MAX_FILES):
        (tmp_path / f"f{i}.log").write_text("x")
    assert kit.check_out_folder(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    problems = kit.check_out_folder(tmp_path)
    assert any("files" in p for p in problems) and any("deep.txt" in p for p in problems)


def test_a_benchmark_mismatch_is_recorded_and_the_run_goes_on(monkeypatch):
    # ours returns the wrong image: the rows say so, nothing raises, every row is timed
    real = kernels.paste_masks_in_image
    monkeypatch.setattr(kernels, "paste_masks_in_image",
                        lambda *a, **k: real(*a, **k).logical_not()
                        if k.get("threshold") is not None else real(*a, **k) + 1)
    with _utils.reference_path():
        rows = bench_paste_masks_in_image.run(tiny=True, dtypes=("float32",), device="cpu",
                                              write=False)
    assert [r["mode"] for r in rows] == ["float", "threshold"]
    for r in rows:
        assert r["parity"].startswith("MISMATCH"), r["parity"]
        assert r["ours_ms"] > 0 and r["torchvision_ms"] > 0


def test_suite_collects_without_pycocotools(tmp_path):
    # the GPU machine has no pycocotools: collection must not stop, its tests must skip
    (tmp_path / "no_pycocotools.py").write_text(
        "import sys\nsys.modules['pycocotools'] = None   # import pycocotools fails\n")
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    base = [sys.executable, "-m", "pytest", "-p", "no_pycocotools", "-p", "no:cacheprovider"]
    collect = subprocess.run(base + ["--collect-only", "-q", "tests"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "error" not in collect.stdout.lower().split("\n")[-2]
    run = subprocess.run(base + ["-q", "-rs", "tests/test_data.py", "-k", "coco"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "pycocotools is not installed" in run.stdout


def test_test_backends_selects_the_cuda_cases_only():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests/test_paste_masks_in_image.py",
                           "tests/test_properties.py"], cwd=ROOT,
                          env=_env(TEST_BACKENDS="cuda"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and all("[cuda" in i or "test_properties.py" in i for i in ids), ids
    assert "deselected" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "tests/test_paste_masks_in_image.py"],
                         cwd=ROOT,
                         env=_env(TEST_BACKENDS="gpu"), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "unknown backend" in bad.stdout + bad.stderr


@pytest.mark.parametrize("row", [0, 1, 2])
def test_every_tuning_row_gives_torchvisions_result(backend, row, monkeypatch):
    # the memory check forces each row in turn: each must compute the same result
    x = torch.randn(2, 9, 11, 13, device=backend.device)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 7.0], [1, 0.0, 2.0, 12.5, 10.0]],
                        device=backend.device)
    fwd = roi_align_ops._roi_align_kernel
    monkeypatch.setattr(_launch, "LAUNCHES", set())   # only this call's launches
    with _launch.forced_tuning_row(row), _launch.record_launches():
        out = kernels.roi_align(x, rois, 7, 1.0, 2)   # 49 bins: its own pick is row 0
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, rois, 7, 1.0, 2))
    if backend.triton:
        launched = [s for s in _launch.LAUNCHES if s.kernel == _launch.kernel_id(fwd)]
        expected = _launch.gpu_rows(_launch.kernel_id(fwd))[row]
        assert launched and all(dict(s.tunables) == expected for s in launched)


def test_memcheck_fills_tritons_cache_before_the_sanitizer(tmp_path):
    """On a GPU with compute-sanitizer, the memcheck step launches everything once without
    it, then runs the same launches under it (compiling under the sanitizer outran its cap)."""
    ctx = kit.Context(out=tmp_path, work=tmp_path, dry_run=False,
                      environment={"compute_sanitizer": "/opt/cs/compute-sanitizer"})
    argv, env = kit.memcheck_command(ctx)
    assert argv[:2] == ["sh", "-c"] and env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    warm, checked = argv[2].split(" && exec ")
    assert "benchmarks.gpu.launch_all" in warm and "compute-sanitizer" not in warm
    assert checked.startswith("/opt/cs/compute-sanitizer --tool memcheck")
    assert "benchmarks.gpu.launch_all" in checked and str(tmp_path / "launch_all.json") in checked
    plain, _ = kit.memcheck_command(kit.Context(out=tmp_path, work=tmp_path, dry_run=False))
    assert plain[1:3] == ["-m", "benchmarks.gpu.launch_all"]   # no sanitizer: one plain run
