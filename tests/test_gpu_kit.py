"""The GPU kit (``make gpu`` = ``python3 -m benchmarks.gpu``), proven before a GPU arrives.

The dry run of each plan (full, profile, sweep) executes the same steps on this CPU at tiny
sizes and must write the same files; the budget logic is checked with steps that overrun on
purpose, the per-kernel memory check with a stand-in sanitizer that hangs, finds errors or
refuses the device, the ncu step's reading of Nsight Compute's CSV with a hand-written file
in its layout (no GPU figures: a format test) and with a stand-in ncu that is refused the
counters; the suite must collect without pycocotools (the GPU machine has none) and select
backends as the kit asks.
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
from benchmarks.gpu import kit, launch_all, ncu
from kernels import _utils
from kernels import _launch
from kernels.ops import roi_align as roi_align_ops

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TEST_BACKENDS")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _dry_run(out: Path, plan: str):
    t0 = time.monotonic()
    # a budget above the 180 s default, so a loaded CI machine cannot cut a step: the
    # caps themselves are tested below with steps that overrun on purpose
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--plan", plan,
                           "--dry-run", "--out", str(out), "--budget", "420"], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, proc, time.monotonic() - t0


# The dry runs are subprocesses without the interpreter (_env drops it): the same runs in
# either pass of `make test`, so they run in its interpreter pass only (and in any run that
# sets TRITON_INTERPRET=1 or asks for them with KIT_DRY_RUNS=1).
once = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("KIT_DRY_RUNS") != "1",
    reason="the kit's dry runs run in make test's interpreter pass (the same subprocess in "
           "either pass); set KIT_DRY_RUNS=1 to run them here")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return _dry_run(tmp_path_factory.mktemp("gpu-run"), "full")


def _log_sections(out: Path) -> dict[str, str]:
    """kit.log split into its steps' sections."""
    sections, name = {}, None
    for line in (out / kit.LOG).read_text().splitlines():
        if line.startswith("===== ") and line.endswith(" ====="):
            name = line[6:].split(":")[0]
            sections[name] = ""
        elif name:
            sections[name] += line + "\n"
    return sections


@once
def test_dry_run_runs_every_step_and_writes_the_files(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert summary["plan"] == "full"
    steps = summary["steps"]
    assert [s["name"] for s in steps] == list(kit.PLANS["full"])
    logs = _log_sections(out)
    for s in steps:
        assert s["status"] == "passed", s
        assert 0 < s["seconds"] <= s["cap_s"] + kit.KILL_GRACE, s
        assert s["log"] == kit.LOG and logs[s["name"]].strip(), s["name"]
    counts = {s["name"]: s["counts"] for s in steps}
    assert counts["environment"]["copy_bandwidth_GBps"] > 0
    assert counts["smoke"]["checks"] == counts["smoke"]["passed"] >= 17
    assert counts["tests"]["passed"] > 0 and counts["tests"]["failed"] == 0
    # the memory check ran each dry-run kernel in a process of its own
    assert counts["memcheck"]["kernels"] == {k.split(":")[-1]: "passed"
                                             for k in kit.DRY_RUN_KERNELS}
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
    # what the device tool brings back: at most 8 flat files of at most 16 MiB, one log
    assert kit.check_out_folder(out) == []
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= kit.MAX_FILES and "summary.json" in files
    assert not [f for f in files if f.endswith(".log") and f != kit.LOG], files
    # the one-screen summary is printed last
    assert proc.stdout.rindex("GPU kit, full plan (dry run)") > proc.stdout.rindex("[gpu kit]")
    assert "memcheck per kernel: passed" in proc.stdout
    print(f"full plan's dry run: {seconds:.0f} s")


@once
@pytest.mark.parametrize("plan", ["profile", "sweep"])
def test_the_short_plans_dry_runs(plan, tmp_path):
    out, proc, seconds = _dry_run(tmp_path, plan)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(kit.PLANS[plan]) and summary["plan"] == plan
    assert steps["environment"]["status"] == "passed"
    logs = _log_sections(out)
    assert set(logs) == set(steps)
    for s in steps.values():   # a step skipped says why
        assert s["status"] == "passed" or (s["status"] == "skipped" and s["reason"]), s
    if plan == "profile":
        assert steps["smoke"]["status"] == "passed"
        ncu = steps["ncu"]   # no ncu on a CPU: the workload runs, the step says why
        assert ncu["status"] == "skipped" and ncu["reason"].startswith("dry run: no ncu")
        assert ncu["counts"]["regions"] == 28
        profile = steps["profile"]
        if profile["status"] == "passed":
            assert profile["counts"]["profiled_rows"] > 0
            assert (out / profile["counts"]["report"]).exists()
        else:
            assert "--profile" in profile["reason"]
    else:
        sweep = steps["sweep"]
        if sweep["status"] == "skipped":
            assert "sweep" in sweep["reason"]
        else:
            assert sweep["counts"]["files"]
    assert kit.check_out_folder(out) == []
    assert f"GPU kit, {plan} plan (dry run)" in proc.stdout
    # --unpack files the plan's results under the device's name, beside the full plan's
    results = tmp_path / "results"
    names = {p.name for p in kit.unpack(out, results)}
    device = kit.slug(summary["environment"]["device"])
    assert f"{device}-gpu-{plan}-summary.json" in names
    assert f"{device}-gpu-summary.json" not in names and f"{device}.json" not in names
    if plan == "profile" and steps["profile"]["status"] == "passed":
        assert {f"{device}-profile.json", f"{device}-profile.md"} <= names
    if plan == "sweep" and steps["sweep"]["status"] == "passed":
        assert f"{device}-sweep.json" in names
    print(f"{plan} plan's dry run: {seconds:.0f} s")


@once
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
    monkeypatch.setattr(kit, "STEPS", {s.name: s for s in [
        _step("environment", "pass"), _step("smoke", slow),
        _step("tests", "import sys; sys.exit(3)"), _step("memcheck", "pass")]})
    monkeypatch.setattr(kit, "PLANS", {"full": ("environment", "smoke", "tests", "memcheck")})
    monkeypatch.setattr(kit, "SHARES", {"full": {"environment": 3, "smoke": 4, "tests": 3,
                                                 "memcheck": 3}})
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
    # one log: each step's section in kit.log, no step log left behind
    assert set(_log_sections(tmp_path)) == set(status)
    assert not list(tmp_path.glob("smoke.log"))


def test_caps_are_the_shares_scaled_to_the_budget():
    caps = kit.caps(270)
    assert sum(caps.values()) == pytest.approx(270)
    assert caps["benchmarks"] == pytest.approx(kit.SHARES["full"]["benchmarks"] / 2)
    for plan in kit.PLANS:
        assert sum(kit.caps(180, True, plan).values()) == pytest.approx(180)
        assert list(kit.caps(100, False, plan)) == list(kit.PLANS[plan])
    # a step of another plan named in --steps takes that plan's share
    assert kit.caps(110, False, "full", ["environment", "ncu"]) == {
        "environment": pytest.approx(110 * 15 / 110), "ncu": pytest.approx(110 * 95 / 110)}


def test_each_plan_fits_its_call():
    # the full plan fills a 10-minute call; the short ones leave room for a second and a
    # third call in fifteen device minutes
    assert kit.BUDGETS == {"full": 540, "profile": 300, "sweep": 240}
    for plan, steps in kit.PLANS.items():
        assert steps[0] == "environment" and set(steps) <= set(kit.STEPS)
        for table in (kit.SHARES, kit.DRY_RUN_SHARES):
            assert list(table[plan]) == list(steps)
        assert sum(kit.SHARES[plan].values()) <= kit.BUDGETS[plan]
        assert kit.DRY_RUN_BUDGET <= 180
    make = subprocess.run(["make", "-n", "gpu", "gpu-profile", "gpu-sweep"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert make.returncode == 0, make.stderr
    lines = [ln for ln in make.stdout.splitlines() if "benchmarks.gpu" in ln]
    assert len(lines) == 3 and "--plan" not in lines[0]
    assert "--plan profile" in lines[1] and "--plan sweep" in lines[2]


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


def test_memcheck_runs_each_kernel_under_the_sanitizer(tmp_path):
    """On a GPU with compute-sanitizer, the memcheck step runs launch_all's per-kernel
    driver with the tool and a share of the step's cap; without it, one plain pass."""
    ctx = kit.Context(out=tmp_path, work=tmp_path, dry_run=False, cap=100.0,
                      environment={"compute_sanitizer": "/opt/cs/compute-sanitizer"})
    argv, env = kit.memcheck_command(ctx)
    assert argv[1:4] == ["-m", "benchmarks.gpu.launch_all", "--memcheck"] and env == {}
    assert argv[argv.index("--sanitizer") + 1] == "/opt/cs/compute-sanitizer"
    assert 0 < float(argv[argv.index("--budget") + 1]) < 100
    plain, _ = kit.memcheck_command(kit.Context(out=tmp_path, work=tmp_path, dry_run=False,
                                                cap=100.0))
    assert "--sanitizer" not in plain and "--memcheck" in plain


def test_every_kernel_has_a_memcheck_call():
    from kernels import _aot
    assert set(launch_all.CALLS) == _aot.launched_kernels()


FAKE_SANITIZER = """#!{python}
import json, sys, time
args = sys.argv[1:]
name = next(a for a in args if a.startswith("kns="))[4:]
out = args[args.index("--json") + 1]
if name == "hangs":
    time.sleep(120)
if name == "refused":
    print("========= Error: Device not supported")
    sys.exit(1)
errors = 2 if name == "bad" else 0
json.dump({{"launches": 1, "missing": [], "errors": {{}}, "specs": []}}, open(out, "w"))
print(f"========= ERROR SUMMARY: {{errors}} errors")
sys.exit(3 if errors else 0)
"""


def test_memcheck_reports_each_kernel_and_cuts_one_that_hangs(tmp_path, monkeypatch):
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(FAKE_SANITIZER.format(python=sys.executable))
    tool.chmod(0o755)
    names = ["hangs", "bad", "refused", "fine"]
    monkeypatch.setattr(launch_all, "CALLS", {f"m:{n}": None for n in names})
    t0 = time.monotonic()
    result = launch_all.memcheck([f"m:{n}" for n in names], "cuda", 22.0, tmp_path, str(tool),
                                 jobs=1, plain_pass=False)
    assert time.monotonic() - t0 < 22
    status = {k.split(":")[1]: v["status"] for k, v in result["kernels"].items()}
    assert status == {"hangs": "timed-out", "bad": "errors", "refused": "skipped",
                      "fine": "passed"}
    hang = result["kernels"]["m:hangs"]
    assert hang["cap_s"] == pytest.approx(5.5, abs=0.5) and hang["seconds"] < 10
    # the time the hung kernel did not use went to the others: each its share of the rest
    assert result["kernels"]["m:fine"]["cap_s"] > 5
    # the step's verdict, per kernel in the summary
    (tmp_path / "memcheck.json").write_text(json.dumps(result))
    ctx = kit.Context(out=tmp_path, work=tmp_path, dry_run=False,
                      environment={"compute_sanitizer": str(tool)})
    verdict, reason, counts = kit.memcheck_collect(ctx, 1)
    assert verdict == "failed" and "errors: bad" in reason and counts["errors"] == 2
    assert counts["kernels"] == status


# Nsight Compute's raw CSV as `ncu --import R --csv --page raw --print-units base` lays it
# out: notes, a header of metric names, a row of units, one row per launch. The numbers are
# made up: this checks the reading, not a GPU.
NCU_HEADER = ['ID', 'Process ID', 'Process Name', 'Host Name', 'Kernel Name', 'Context',
              'Stream', 'Block Size', 'Grid Size', 'Device', 'CC',
              'dram__throughput.avg.pct_of_peak_sustained_elapsed', 'gpu__time_duration.sum',
              'launch__registers_per_thread', 'lts__t_sector_hit_rate.pct',
              'lts__throughput.avg.pct_of_peak_sustained_elapsed',
              'sm__warps_active.avg.pct_of_peak_sustained_active',
              'smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio',
              'smsp__average_warps_issue_stalled_selected_per_issue_active.ratio',
              'smsp__average_warps_issue_stalled_wait_per_issue_active.ratio',
              'smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio',
              'smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio']
NCU_UNITS = [''] * 11 + ['%', 'nsecond', 'register/thread', '%', '%', '%'] + [''] * 5
NCU_ROWS = [
    ['0', '1', 'python3', 'h', '_roi_align_kernel', '1', '7', '(128, 1, 1)', '(10, 2, 1)',
     '0', '9.0', '41.5', '1,234,000', '64', '70.1', '55', '38', '12.5', '1', '3.25', '0.5',
     '7'],
    ['1', '1', 'python3', 'h', 'roi_align_forward_kernel_impl', '1', '7', '(512, 1, 1)',
     '(100, 1, 1)', '0', '9.0', '20', '2000000', '40', '', '30', '60', '4', '9', '2', '1',
     '0'],
]


def _ncu_csv(names: list[str]) -> str:
    def line(cells):
        return ",".join(f'"{c}"' for c in cells)
    rows = [r[:4] + [n] + r[5:] for r, n in zip(NCU_ROWS, names)]
    return "\n".join(["==PROF== Connected to process 1", line(NCU_HEADER), line(NCU_UNITS),
                      *map(line, rows)]) + "\n"


def test_ncu_table_from_the_raw_csv():
    regions = [{"name": f"roi_align forward 7x7 NCHW|{p}", "workload": "roi_align forward 7x7 NCHW",
                "provider": p} for p in ("ours", "torchvision")]
    raw = ncu.parse_raw_csv(_ncu_csv(["_roi_align_kernel", "roi_align_forward_kernel_impl"]))
    renamed = ncu.parse_raw_csv(_ncu_csv([r["name"] for r in regions]))
    rows = ncu.table(raw, renamed, {"regions": regions})
    ours, theirs = rows
    assert (ours["kernel"], ours["provider"], theirs["provider"]) == (
        "_roi_align_kernel", "ours", "torchvision")
    assert ours["duration_us"] == pytest.approx(1234.0)   # ns, thousands separators
    assert (ours["dram_pct"], ours["l2_pct"], ours["l2_hit_pct"], ours["occupancy_pct"],
            ours["registers"]) == (41.5, 55.0, 70.1, 38.0, 64.0)
    # the top three stalls, the issuing warp ("selected") not among them
    assert [ours[f"stall_{i}"].split()[0] for i in (1, 2, 3)] == [
        "long_scoreboard", "lg_throttle", "wait"]
    assert theirs["l2_hit_pct"] is None and theirs["sm_pct"] is None   # missing: empty
    (total,) = ncu.totals(rows)
    assert total["baseline"] == "torchvision" and total["ratio"] == pytest.approx(2000 / 1234,
                                                                                  abs=1e-3)
    # without NVTX, a marker kernel opens each region in the manifest's order
    marked = ncu.parse_raw_csv(_ncu_csv([ncu.MARKER, "_roi_align_kernel"]))
    rows = ncu.table(marked, [], {"regions": regions[:1], "markers": True})
    assert [(r["kernel"], r["provider"]) for r in rows] == [("_roi_align_kernel", "ours")]
    # the step's counts and the one-screen lines
    counts = {"kernels": 2, "workloads": 1, "totals": [total],
              "columns": ["workload", "provider", "kernel", *kit.NCU_FIGURES],
              "table": [[r.get(c) for c in ("workload", "provider", "kernel", *kit.NCU_FIGURES)]
                        for r in ncu.table(raw, renamed, {"regions": regions})]}
    lines = kit._ncu_lines(counts)
    assert len(lines) == 3 and "1.62x" in lines[1] and "long_scoreboard 12.5" in lines[1]


FAKE_NCU = """#!{python}
import sys
if "--version" in sys.argv:
    print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2099.1.0")
    sys.exit(0)
print("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU "
      "Performance Counters on the target device 0.")
print("==WARNING== No kernels were profiled.")
sys.exit(1)
"""


def test_ncu_is_skipped_with_the_reason_where_it_cannot_read_the_counters(tmp_path,
                                                                          monkeypatch):
    tool = tmp_path / "ncu"
    tool.write_text(FAKE_NCU.format(python=sys.executable))
    tool.chmod(0o755)
    result = ncu.profile(tmp_path / "work", 120, str(tool), tmp_path / "ncu.log")
    assert result["status"] == "skipped" and "ERR_NVGPUCTRPERM" in result["reason"]
    assert "--clock-control none" in result["command"]
    assert "--profile-from-start off" in result["command"]
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    missing = ncu.profile(tmp_path / "work", 120, None, tmp_path / "ncu.log")
    assert missing["status"] == "skipped" and "ncu not found" in missing["reason"]
    (tmp_path / "ncu.json").write_text(json.dumps(missing))
    ctx = kit.Context(out=tmp_path, work=tmp_path, dry_run=False)
    assert kit.ncu_collect(ctx, 0)[:2] == ("skipped", missing["reason"])
