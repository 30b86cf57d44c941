"""The GPU kit: one command that proves the project on a CUDA machine, inside a time budget.

    make gpu                                        # = PYTHONPATH=. python3 -m benchmarks.gpu
    make gpu-profile                                # = ... -m benchmarks.gpu --plan profile
    make gpu-sweep                                  # = ... -m benchmarks.gpu --plan sweep
    python3 -m benchmarks.gpu [--plan full|profile|sweep] [--budget S] [--out DIR]
                              [--steps tests,benchmarks] [--dry-run]
    python3 -m benchmarks.gpu --unpack DIR          # bring a run's results into the checkout

Nothing is installed: it runs on the machine's own python3 and packages. Three plans, each
a list of steps run in order, each step in its own subprocess with its own time cap carved
from the plan's budget; a failing step never stops the plan:

- ``full`` (540 s, ``make gpu``): environment, smoke, tests, memcheck, benchmarks, static;
- ``profile`` (300 s, ``make gpu-profile``): environment, smoke, profile, ncu;
- ``sweep`` (240 s, ``make gpu-sweep``): environment, sweep.

The full plan fills its 10-minute call; the two short ones are later calls for the device
time left (after a machine's start and a full plan, about one of them: docs/gpu.md says
which fits where). The steps:

- environment: GPU, driver, versions, measured copy bandwidth;
- smoke: every public op and both model builders once against torchvision;
- tests: the test suite on the CUDA backend only (TEST_BACKENDS=cuda), with durations;
- memcheck: ``compute-sanitizer --tool memcheck`` over one specialization per kernel,
  each kernel in a process of its own with its own share of the step's time, reported per
  kernel (``benchmarks.gpu.launch_all --memcheck``); skipped, with the reason, where the
  tool is missing or refuses the device;
- benchmarks: the full benchmark report (``python -m benchmarks``);
- static: the static kernel report, added to the benchmark report beside the times;
- profile: the benchmark report with each call profiled (``python -m benchmarks
  --profile``: kernel device time, host time, host syncs; float32);
- ncu: hardware counters of the hot kernels beside torchvision's at the same workloads
  (``benchmarks.gpu.ncu``): duration, DRAM and L2 throughput, L2 hit rate, occupancy,
  registers, top warp stalls; skipped, with the reason, where ncu is missing or refuses;
- sweep: candidate tuning rows timed on this GPU, the winners written
  (``benchmarks.gpu.sweep``).

Each step gets the seconds reserved for it (its plan's ``SHARES``, scaled to ``--budget``)
plus what the steps before it left unused; one that runs out is killed with its process
group and marked ``timed-out``, and the later steps keep their reserve. The out folder
receives ``summary.json`` (one entry per step: name, status — passed, failed, skipped,
timed-out — seconds, counts, and the reason for anything not passed), ``kit.log`` (every
step's output, one section per step: a step's log is ``<step>.log`` while it runs) and the
results (the benchmark report's JSON, the profiled report, the ncu table, the sweep's
files): at most 8 files, flat, each far under 16 MiB — what the device tool brings back.
``--unpack`` turns that folder into ``benchmarks/results/<device>.*`` (JSON, Markdown,
plots), ``<device>-gpu-summary.json`` (``-gpu-<plan>-summary.json`` for the short plans)
and the other plans' results under the device's name, ready to commit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks import targets
from benchmarks._common import RESULTS_DIR, slug

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = RESULTS_DIR / "gpu-run"
PLANS = {
    "full": ("environment", "smoke", "tests", "memcheck", "benchmarks", "static"),
    "profile": ("environment", "smoke", "profile", "ncu"),
    "sweep": ("environment", "sweep"),
}
BUDGETS = {"full": 540.0, "profile": 300.0, "sweep": 240.0}
BUDGET = BUDGETS["full"]
DRY_RUN_BUDGET = 180.0   # every plan's
# Seconds reserved for each step at its plan's default budget (scaled to another budget).
# The full plan's from the first H200 run (2026-12-04): environment 10 s, smoke 30 s, tests
# 66 s, memcheck cut at 175 s (one process over every specialization and tuning row; now one
# specialization per kernel, a process each), benchmarks 87 s with three ops failing early
# (about 170 s more for them, measured after the fix), static 67 s. The profile plan's
# benchmark report is float32 only (the full report, both dtypes, took about 257 s);
# ncu's share is a guess until a GPU run times it.
SHARES = {
    "full": {"environment": 15, "smoke": 40, "tests": 80, "memcheck": 105,
             "benchmarks": 225, "static": 75},
    "profile": {"environment": 15, "smoke": 40, "profile": 150, "ncu": 95},
    "sweep": {"environment": 15, "sweep": 225},
}
# The dry run's steps cost differently (Triton's interpreter pays per program).
DRY_RUN_SHARES = {
    "full": {"environment": 15, "smoke": 75, "tests": 15, "memcheck": 25,
             "benchmarks": 30, "static": 20},
    "profile": {"environment": 15, "smoke": 75, "profile": 55, "ncu": 35},
    "sweep": {"environment": 15, "sweep": 165},
}
KILL_GRACE = 5.0     # seconds between SIGTERM and SIGKILL of a step cut at its cap
MARGIN = 3.0         # kept back for writing the summary
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
LOG = "kit.log"      # every step's output, appended as each step ends
# The dry run at tiny sizes: the test step runs a few parity tests on the interpreter
# backend; the memory check runs two kernels' processes, interpreted, without a sanitizer.
DRY_RUN_TESTS = ["tests/test_mask_loss.py", "-k", "target_dtypes or layouts"]
DRY_RUN_KERNELS = ["kernels.ops.paste_masks_in_image:_paste_masks_in_image_kernel",
                   "kernels.ops.nms:_nms_mask_kernel"]
MEMCHECK_JOBS = 4    # sanitized processes at a time on the GPU machine (16 cores, one GPU)
PROFILE_DTYPES = "float32"   # the profile plan's report: both dtypes would outrun its share
STATUSES = ("passed", "failed", "skipped", "timed-out")


@dataclass
class Context:
    out: Path
    work: Path                      # private scratch: the steps' machine-readable outputs
    dry_run: bool
    python: str = sys.executable
    results: Path = RESULTS_DIR     # where the benchmark report goes
    environment: dict = field(default_factory=dict)
    report: Path | None = None      # the benchmark report's JSON, once written
    step_started: float = 0.0       # wall-clock start of the running step
    cap: float = 0.0                # the running step's cap, seconds

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                                "TEST_BACKENDS")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          os.environ.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"   # the kernels run on Triton's CPU interpreter
        env.update(extra)
        return env


@dataclass
class Step:
    name: str
    what: str
    # argv and extra environment, or a string: the reason the step is skipped
    command: Callable[[Context], "tuple[list[str], dict] | str"]
    # (status or None to keep the exit code's verdict, reason, counts) from what it wrote
    collect: Callable[[Context, int], tuple[str | None, str | None, dict]]
    dry_what: str = ""      # what the dry run's version of the step does, where it differs

    def describe(self, ctx: Context) -> str:
        return self.dry_what if ctx.dry_run and self.dry_what else self.what


# ---------------------------------------------------------------------------------------
# The steps

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json_lines(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass   # a line cut by a kill
    return out


def environment_command(ctx: Context):
    return ([ctx.python, "-m", "benchmarks.gpu.environment", "--json",
             str(ctx.work / "environment.json"), "--device", ctx.device], {})


def environment_collect(ctx: Context, rc: int):
    info = _read_json(ctx.work / "environment.json") or {}
    ctx.environment = info
    if "error" in info:
        return "failed", info["error"], {}
    keys = ("device", "driver", "capability", "torch", "triton", "torchvision", "python",
            "copy_bandwidth_GBps")
    return None, None, {k: info[k] for k in keys if k in info}


def smoke_command(ctx: Context):
    argv = [ctx.python, "-m", "benchmarks.gpu.smoke", "--json", str(ctx.work / "smoke.jsonl"),
            "--device", ctx.device]
    return (argv + ["--tiny"] if ctx.dry_run else argv), {}


def smoke_collect(ctx: Context, rc: int):
    checks = _json_lines(ctx.work / "smoke.jsonl")
    failed = [c["name"] for c in checks if c["status"] != "passed"]
    counts = {"checks": len(checks), "passed": len(checks) - len(failed), "failed": failed}
    return None, (f"failed: {', '.join(failed)}" if failed else None), counts


def tests_command(ctx: Context):
    argv = [ctx.python, "-m", "pytest", "-p", "benchmarks.gpu.pytest_progress",
            "-p", "no:cacheprovider", "-q", "-rfE", "--durations=25"]
    if ctx.dry_run:
        return argv + DRY_RUN_TESTS, {"TEST_BACKENDS": "interpreter",
                                      "GPU_KIT_TESTS_JSON": str(ctx.work / "tests.jsonl")}
    if ctx.environment.get("pytest_xdist"):
        # compiling each kernel specialization is most of a cold run: spread it over workers
        argv += ["-p", "xdist", "-n", "4", "--dist", "loadfile"]
    return argv + ["tests"], {"TEST_BACKENDS": "cuda",
                              "GPU_KIT_TESTS_JSON": str(ctx.work / "tests.jsonl")}


def tests_collect(ctx: Context, rc: int):
    lines = _json_lines(ctx.work / "tests.jsonl")
    counts = {o: sum(1 for r in lines if r["outcome"] == o)
              for o in ("passed", "failed", "error", "skipped")}
    slowest = sorted((r for r in lines if r["when"] == "call"), key=lambda r: -r["seconds"])
    counts["slowest"] = [f"{r['seconds']:.1f} s {r['test']}" for r in slowest[:10]]
    bad = [f"{r['test']}: {r['reason']}" for r in lines if r["outcome"] in ("failed", "error")]
    if bad:
        counts["failures"] = bad[:20]
        return "failed", f"{len(bad)} test(s) failed", counts
    if rc == 5 or not counts["passed"]:
        return "failed", "no test passed (none ran, or all were skipped)", counts
    return None, None, counts


NO_SANITIZER = "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"


def memcheck_command(ctx: Context):
    argv = [ctx.python, "-m", "benchmarks.gpu.launch_all", "--memcheck", "--device",
            ctx.device, "--json", str(ctx.work / "memcheck.json"),
            "--budget", f"{max(ctx.cap - KILL_GRACE - 2, 1):.0f}"]
    if ctx.dry_run:   # each kernel's process, interpreted: the machinery without a GPU
        return argv + ["--no-plain-pass", "--kernels", ",".join(DRY_RUN_KERNELS)], {}
    tool = ctx.environment.get("compute_sanitizer")
    if not tool:   # still launch every kernel's call once: a crash shows
        return argv, {}
    return argv + ["--sanitizer", tool, "--jobs", str(MEMCHECK_JOBS)], {}


def memcheck_collect(ctx: Context, rc: int):
    result = _read_json(ctx.work / "memcheck.json") or {}
    per_kernel = {k.split(":")[-1]: v for k, v in result.get("kernels", {}).items()}
    by_status = {}
    for name, entry in per_kernel.items():
        by_status.setdefault(entry["status"], []).append(name)
    errors = sum(int(e["detail"].split()[0]) for e in per_kernel.values()
                 if e["status"] == "errors")
    counts = {"kernels": {n: e["status"] for n, e in per_kernel.items()},
              "details": {n: e["detail"] for n, e in per_kernel.items()
                          if e["status"] != "passed"},
              "seconds": {n: e["seconds"] for n, e in per_kernel.items()},
              "passed": len(by_status.get("passed", [])), "errors": errors,
              "sanitizer": result.get("sanitizer")}
    if result.get("plain", {}).get("errors"):   # the plain pass before the sanitizer
        counts["plain_pass_errors"] = result["plain"]["errors"]
    if not result:
        return "failed", f"no result written (exit code {rc})", counts
    bad = {s: by_status[s] for s in ("errors", "failed") if s in by_status}
    if bad:
        return "failed", "; ".join(f"{s}: {', '.join(names)}" for s, names in bad.items()), \
            counts
    if ctx.dry_run:
        return None, "dry run: each kernel's process ran on the interpreter without " \
                     "compute-sanitizer", counts
    if not result.get("sanitizer"):
        return "skipped", f"{NO_SANITIZER}; every kernel's call launched without it", counts
    if set(by_status) == {"skipped"}:
        return "skipped", "; ".join(sorted({e["detail"] for e in per_kernel.values()})), counts
    short = {s: by_status[s] for s in ("timed-out", "skipped") if s in by_status}
    if short:
        return "timed-out", "; ".join(f"{s}: {', '.join(names)}"
                                      for s, names in short.items()), counts
    return None, None, counts


def benchmarks_command(ctx: Context):
    argv = [ctx.python, "-m", "benchmarks", "--out", str(ctx.results), "--no-static",
            "--device", ctx.device]
    if ctx.environment.get("copy_bandwidth_GBps"):
        argv += ["--copy-bandwidth", str(ctx.environment["copy_bandwidth_GBps"])]
    if ctx.dry_run:
        # timing through the interpreter means nothing (and takes many minutes): the dry
        # run times the ops' PyTorch path, as the committed CPU report does
        return argv + ["--tiny"], {"TRITON_INTERPRET": "0"}
    return argv + ["--full"], {}


def _new_report(ctx: Context, since: float) -> Path | None:
    """The benchmark report JSON written into ctx.results after ``since`` (the step's start)."""
    found = [p for p in ctx.results.glob("*.json")
             if p.name != "static.json" and p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def benchmarks_collect(ctx: Context, rc: int):
    path = ctx.report = _new_report(ctx, ctx.step_started)
    report = _read_json(path) if path else None
    if not report:
        return "failed", "no benchmark report was written", {}
    shutil.copy2(path, ctx.out / path.name)
    sections = report.get("benchmarks", {})
    errors = sorted(op for op, s in sections.items() if "error" in s)
    rows = [r for s in sections.values() for r in s.get("rows", [])]
    mismatches = [f"{op}: {r.get('parity')}" for op, s in sections.items()
                  for r in s.get("rows", []) if r.get("parity", "ok") != "ok"]
    counts = {"ops": sorted(sections), "rows": len(rows), "op_errors": errors,
              "mismatches": len(mismatches), "report": path.name}
    speedups = {}
    for op, s in sections.items():
        values = [r["speedup"] for r in s.get("rows", []) if isinstance(r.get("speedup"),
                                                                         (int, float))]
        if values:
            speedups[op] = f"{min(values):.2f}x-{max(values):.2f}x"
    counts["speedup_range"] = speedups
    counts["targets"] = [{k: v[k] for k in ("target", "status", "rows", "worst", "below",
                                            "missing") if k in v}
                         for v in targets.evaluate(report)]
    if errors or mismatches:
        counts["mismatch_rows"] = mismatches[:20]
        return "failed", f"op errors {errors}, {len(mismatches)} mismatching row(s)", counts
    return None, None, counts


def static_command(ctx: Context):
    argv = [ctx.python, "-m", "benchmarks.static",
            "--out-dir", str(ctx.results if not ctx.dry_run else ctx.work)]
    if ctx.dry_run:   # recording through the interpreter takes minutes on a small CPU:
        launched = _read_json(ctx.work / "memcheck.json")   # the memcheck step's launches
        if not (launched and launched.get("specs")):
            return "the memcheck step recorded no launches to compile"
        # a sample of them (the GPU records every specialization itself, for sm_90)
        argv += ["--specs", str(ctx.work / "memcheck.json"), "--sample", "--arch", "90"]
    else:
        argv += ["--arch", "90"]
    if ctx.report:
        argv += ["--report", str(ctx.report)]
    return argv, {}


def static_collect(ctx: Context, rc: int):
    path = (ctx.work if ctx.dry_run else ctx.results) / "static.json"
    fresh = path.exists() and path.stat().st_mtime >= ctx.step_started   # not a stale copy
    static = (_read_json(path) or {}) if fresh else {}
    rows = static.get("rows", [])
    counts = {"specializations": static.get("specializations"), "rows": len(rows),
              "kernels": len({r["kernel"] for r in rows}),
              "compile_failures": len(static.get("failures", [])),
              "spills": sum(1 for r in rows if r["spill_bytes"])}
    if ctx.report:
        shutil.copy2(ctx.report, ctx.out / ctx.report.name)   # now with the static section
    if not static:
        return "failed", "no static report was written", counts
    return None, None, counts


def _range(values: list) -> str | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return f"{min(values):.2f}x-{max(values):.2f}x" if values else None


def profile_command(ctx: Context):
    main_py = ROOT / "benchmarks" / "__main__.py"
    if '"--profile"' not in main_py.read_text():
        return "python -m benchmarks has no --profile option in this checkout"
    argv = [ctx.python, "-m", "benchmarks", "--profile", "--no-static", "--out",
            str(ctx.work / "profile"), "--device", ctx.device, "--dtype", PROFILE_DTYPES]
    if ctx.environment.get("copy_bandwidth_GBps"):
        argv += ["--copy-bandwidth", str(ctx.environment["copy_bandwidth_GBps"])]
    if ctx.dry_run:   # as the benchmarks step's dry run: the ops' PyTorch path, tiny
        return argv + ["--tiny"], {"TRITON_INTERPRET": "0"}
    return argv, {}


def profile_collect(ctx: Context, rc: int):
    found = sorted((ctx.work / "profile").glob("*.json"), key=lambda p: p.stat().st_mtime)
    report = _read_json(found[-1]) if found else None
    if not report:
        return "failed", "no profiled report was written", {}
    name = f"{found[-1].stem}-profile.json"
    shutil.copy2(found[-1], ctx.out / name)
    sections = report.get("benchmarks", {})
    rows = [(op, r) for op, s in sections.items() for r in s.get("rows", [])]
    profiled = [(op, r) for op, r in rows
                if r.get("ours_kernel_ms") is not None or r.get("ours_host_us") is not None]
    counts = {"report": name, "ops": sorted(sections), "rows": len(rows),
              "profiled_rows": len(profiled),
              "op_errors": sorted(op for op, s in sections.items() if "error" in s),
              "profile_errors": sum(1 for _, r in rows if r.get("profile_error")),
              "mismatches": sum(1 for _, r in rows if r.get("parity", "ok") != "ok")}
    for key, field_ in (("kernel_speedup_range", "kernel_speedup"),
                        ("speedup_range", "speedup")):
        ranges = {op: _range([r.get(field_) for o, r in rows if o == op]) for op in sections}
        counts[key] = {op: v for op, v in ranges.items() if v}
    host = {}
    for op in sections:
        ratios = [r["baseline_host_us"] / r["ours_host_us"] for o, r in profiled
                  if o == op and r.get("ours_host_us") and r.get("baseline_host_us")]
        if ratios:
            host[op] = _range(ratios)
    counts["host_ratio_range"] = host
    counts["ours_syncs_max"] = {op: max(r["ours_syncs"] for o, r in profiled
                                        if o == op and r.get("ours_syncs") is not None)
                                for op in sections
                                if any(o == op and r.get("ours_syncs") is not None
                                       for o, r in profiled)}
    if counts["op_errors"] or counts["mismatches"]:
        return "failed", (f"op errors {counts['op_errors']}, {counts['mismatches']} "
                          "mismatching row(s)"), counts
    if not profiled:
        return "failed", "no row carries the profile's fields", counts
    return None, None, counts


def ncu_command(ctx: Context):
    if ctx.dry_run:   # no ncu on a CPU: the workload alone, interpreted, proves it runs
        return [ctx.python, "-m", "benchmarks.gpu.ncu_workload", "--device", "cpu", "--tiny",
                "--warmup", "0", "--manifest", str(ctx.work / "ncu_manifest.json")], {}
    return [ctx.python, "-m", "benchmarks.gpu.ncu", "--json", str(ctx.work / "ncu.json"),
            "--table", str(ctx.out / "ncu.csv"), "--work", str(ctx.work / "ncu"),
            "--budget", f"{max(ctx.cap - KILL_GRACE - 2, 1):.0f}"], {}


NCU_FIGURES = ("duration_us", "dram_pct", "l2_pct", "l2_hit_pct", "occupancy_pct",
               "registers", "stall_1", "stall_2", "stall_3")


def ncu_collect(ctx: Context, rc: int):
    if ctx.dry_run:
        manifest = _read_json(ctx.work / "ncu_manifest.json")
        if rc != 0 or not manifest:
            return "failed", f"the workload failed on the CPU (exit code {rc})", {}
        return "skipped", (f"dry run: no ncu (the workload ran its {len(manifest['regions'])} "
                           "regions on the CPU, kernels interpreted)"), \
            {"regions": len(manifest["regions"])}
    result = _read_json(ctx.work / "ncu.json")
    if not result:
        return "failed", f"no result written (exit code {rc})", {}
    rows = result.get("rows", [])
    counts = {"kernels": len(rows), "workloads": len(result.get("totals", [])),
              "ncu": result.get("version"), "left_out": result.get("left_out", 0),
              "totals": result.get("totals", []),
              "columns": ["workload", "provider", "kernel", *NCU_FIGURES],
              "table": [[r.get(c) if not isinstance(r.get(c), float) else round(r[c], 1)
                         for c in ("workload", "provider", "kernel", *NCU_FIGURES)]
                        for r in rows]}
    if result.get("unattributed"):
        counts["unattributed"] = result["unattributed"]
    status = {"ok": None, "skipped": "skipped"}.get(result.get("status"), "failed")
    return status, result.get("reason"), counts


SWEEP = ROOT / "benchmarks" / "gpu" / "sweep.py"
SWEEP_MARGIN = (45.0, 20.0)   # GPU, dry run: seconds the sweep's --budget leaves the cap
                              # (start-up, and the workload running when the budget ends)


def sweep_command(ctx: Context):
    if not SWEEP.exists():
        return "benchmarks/gpu/sweep.py is not in this checkout (python -m benchmarks.gpu.sweep)"
    budget = max(ctx.cap - SWEEP_MARGIN[ctx.dry_run], 10.0)
    argv = [ctx.python, "-m", "benchmarks.gpu.sweep", "--out", str(ctx.work / "sweep"),
            "--device", ctx.device, "--budget", f"{budget:.0f}"]
    return (argv + ["--dry-run"] if ctx.dry_run else argv), {}


def sweep_collect(ctx: Context, rc: int):
    files = sorted(p for p in (ctx.work / "sweep").rglob("*")
                   if p.is_file() and p.suffix != ".tmp")
    # room in the out folder: what is there (this step's log folds into kit.log)
    kept = {p.name for p in ctx.out.iterdir() if p.is_file()} - {"sweep.log"}
    room = MAX_FILES - len(kept | {"summary.json", LOG})
    copied, left = [], []
    for path in files:
        name = path.name if path.name.startswith("sweep") else f"sweep-{path.name}"
        if len(copied) < room and path.stat().st_size <= MAX_FILE_BYTES:
            shutil.copy2(path, ctx.out / name)
            copied.append(name)
        else:
            left.append(path.name)
    counts = {"files": copied}
    if left:
        counts["left_behind"] = left
    result = _read_json(ctx.work / "sweep" / "sweep.json")
    if isinstance(result, dict):
        workloads = result.get("workloads", [])
        winners = result.get("winners", [])
        counts.update(workloads=len(workloads),
                      workloads_run=sum(1 for w in workloads if "entries" in w),
                      winners=len(winners),
                      changed=sum(1 for w in winners if isinstance(w, dict) and w.get("changed")),
                      problems=len(result.get("problems", [])))
        if result.get("problems"):
            counts["first_problems"] = result["problems"][:10]
    if not files:
        return "failed", f"the sweep wrote no file (exit code {rc})", counts
    return None, None, counts


STEPS = {s.name: s for s in [
    Step("environment", "the GPU, driver, versions and copy bandwidth",
         environment_command, environment_collect, "the CPU, versions and copy bandwidth"),
    Step("smoke", "every public op and both model builders once, against torchvision",
         smoke_command, smoke_collect, "the same checks at tiny sizes, kernels interpreted"),
    Step("tests", "the test suite on the CUDA backend", tests_command, tests_collect,
         "a few mask-loss tests on the interpreter backend"),
    Step("memcheck", "one specialization per kernel under compute-sanitizer memcheck, a "
         "process each", memcheck_command, memcheck_collect,
         "two kernels' processes, interpreted, without a sanitizer"),
    Step("benchmarks", "the full benchmark report", benchmarks_command, benchmarks_collect,
         "the report at tiny sizes, the ops' PyTorch path timed"),
    Step("static", "the static kernel report beside the measured times (sm_90)",
         static_command, static_collect, "a sample of the launched kernels compiled"),
    Step("profile", "the benchmark report with every call profiled (float32)",
         profile_command, profile_collect, "the profiled report at tiny sizes, PyTorch path"),
    Step("ncu", "hardware counters of the hot kernels beside torchvision's (Nsight Compute)",
         ncu_command, ncu_collect, "the ncu workload on the CPU, interpreted, without ncu"),
    Step("sweep", "candidate tuning rows timed, the winners written", sweep_command,
         sweep_collect, "the sweep's dry run on the CPU"),
]}


def plan_steps(plan: str, steps: list[str] | None = None) -> list[Step]:
    """The plan's steps, or ``steps`` (any known steps) in the order the plans list them."""
    if steps is None:
        return [STEPS[name] for name in PLANS[plan]]
    return [s for s in STEPS.values() if s.name in steps]


# ---------------------------------------------------------------------------------------
# Running the plan

def step_shares(plan: str, names: list[str], dry_run: bool = False) -> dict[str, float]:
    """Each step's share: its plan's, or (a step another plan runs, named in --steps)
    the first plan's that has it."""
    tables = DRY_RUN_SHARES if dry_run else SHARES
    ordered = [tables[plan]] + [t for p, t in tables.items() if p != plan]
    return {n: next(t[n] for t in ordered if n in t) for n in names}


def caps(budget: float, dry_run: bool = False, plan: str = "full",
         steps: list[str] | None = None) -> dict[str, float]:
    """Seconds reserved per step for ``budget`` (the shares scaled to it)."""
    shares = step_shares(plan, steps or list(PLANS[plan]), dry_run)
    total = sum(shares.values())
    return {name: budget * share / total for name, share in shares.items()}


def run_step(step: Step, ctx: Context, cap: float) -> dict:
    log_path = ctx.out / f"{step.name}.log"   # while it runs; then folded into kit.log
    t0 = time.monotonic()
    ctx.step_started = time.time()
    ctx.cap = cap
    entry = {"name": step.name, "what": step.describe(ctx), "cap_s": round(cap, 1),
             "log": LOG}
    try:
        command = step.command(ctx)
    except Exception as e:  # a command builder's bug must not stop the plan
        command = None
        entry.update(status="failed", seconds=0.0, reason=f"building the command: {e!r}",
                     counts={})
    if isinstance(command, str):
        entry.update(status="skipped", seconds=0.0, reason=command, counts={})
    if command is None or isinstance(command, str):
        log_path.write_text(f"{entry['status']}: {entry['reason']}\n")
        fold_log(ctx.out, entry)
        return entry
    argv, extra_env = command
    with log_path.open("w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=ctx.env(**extra_env), start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(cap, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    seconds = time.monotonic() - t0
    try:
        status, reason, counts = step.collect(ctx, rc)
    except Exception as e:  # a collector's bug must not stop the plan either
        status, reason, counts = "failed", f"reading the step's output: {e!r}", {}
    if timed_out:
        status = "timed-out"
        reason = f"cut at its {cap:.0f} s cap" + (f"; {reason}" if reason else "")
    elif status is None:
        status = "passed" if rc == 0 else "failed"
        if rc != 0 and not reason:
            reason = f"exit code {rc}: {_last_line(log_path)}"
    entry.update(status=status, seconds=round(seconds, 1), returncode=rc, counts=counts)
    if reason:
        entry["reason"] = reason
    fold_log(ctx.out, entry)
    return entry


def fold_log(out: Path, entry: dict) -> None:
    """Append a finished step's log to kit.log under a header line, and remove it: one log
    file in the out folder however many steps ran."""
    path = out / f"{entry['name']}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    header = (f"===== {entry['name']}: {entry['status']} in {entry['seconds']:.0f} s"
              + (f" (cap {entry['cap_s']:.0f} s)" if "cap_s" in entry else "") + " =====\n")
    with (out / LOG).open("a") as log:
        log.write(header + text + ("" if text.endswith("\n") or not text else "\n"))
    path.unlink(missing_ok=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's whole process group (pytest workers, torchrun children), then
    SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_plan(ctx: Context, budget: float, steps: list[str] | None = None,
             echo: Callable[[str], None] = print, plan: str = "full") -> dict:
    # a step cut at its cap may take KILL_GRACE more to die: keep that back too
    window = budget - MARGIN - KILL_GRACE
    todo = plan_steps(plan, steps)
    reserved = caps(window, ctx.dry_run, plan, [s.name for s in todo])
    start = time.monotonic()
    deadline = start + window
    summary = {"kit": "python3 -m benchmarks.gpu", "plan": plan, "dry_run": ctx.dry_run,
               "budget_s": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "steps": []}
    for i, step in enumerate(todo):
        later = sum(reserved[s.name] for s in todo[i + 1:])
        cap = deadline - time.monotonic() - later   # its share and what earlier steps left
        if cap < 1.0:
            entry = {"name": step.name, "what": step.describe(ctx), "status": "timed-out",
                     "seconds": 0.0, "counts": {}, "reason": "no time left in the budget"}
        else:
            echo(f"[gpu kit] {step.name}: {step.describe(ctx)} (cap {cap:.0f} s)")
            entry = run_step(step, ctx, cap)
        summary["steps"].append(entry)
        echo(f"[gpu kit] {step.name}: {entry['status']} in {entry['seconds']:.0f} s"
             + (f" - {entry['reason']}" if entry.get("reason") else ""))
        summary["environment"] = ctx.environment
        summary["seconds"] = round(time.monotonic() - start, 1)
        write_summary(ctx.out, summary)   # a kit killed from outside keeps what it did
    return summary


def write_summary(out: Path, summary: dict) -> None:
    path = out / "summary.json"
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(path)


def check_out_folder(out: Path) -> list[str]:
    """What in ``out`` the device tool would not bring back: more than MAX_FILES files,
    files over MAX_FILE_BYTES, anything more than two folders down."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back)")
    problems += [f"{p.name}: {p.stat().st_size} bytes" for p in files
                 if p.stat().st_size > MAX_FILE_BYTES]
    problems += [str(p.relative_to(out)) for p in files if len(p.relative_to(out).parts) > 3]
    return problems


def _ncu_lines(counts: dict) -> list[str]:
    """Per workload and provider: the summed kernel time and the hottest kernel's figures."""
    cols = counts.get("columns", [])
    rows = [dict(zip(cols, r)) for r in counts.get("table", [])]
    if not rows:
        return []
    lines = [f"ncu ({counts.get('ncu') or 'Nsight Compute'}; the hottest kernel of each: us, "
             "DRAM/L2 % of peak, L2 hit %, achieved occupancy %, registers, top stalls in "
             "cycles per issued instruction):"]
    hottest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["workload"], r["provider"])
        if key not in hottest or (r["duration_us"] or 0) > (hottest[key]["duration_us"] or 0):
            hottest[key] = r
    totals = {t["workload"]: t for t in counts.get("totals", [])}

    def pct(v):
        return "-" if v is None else f"{v:.0f}"
    for (workload, provider), r in hottest.items():
        t = totals.get(workload, {})
        total = t.get(f"{provider}_us")
        ratio = (f" ({t['ratio']:.2f}x)" if provider == "ours" and t.get("ratio") else "")
        stalls = ", ".join(r[c] for c in ("stall_1", "stall_2", "stall_3") if r.get(c))
        lines.append(
            f"  {workload[:38]:38s} {provider[:11]:11s} {total or 0:8.0f} us{ratio:9s} "
            f"{r['kernel'][:28]:28s} {r['duration_us'] or 0:7.0f} {pct(r['dram_pct']):>3s}/"
            f"{pct(r['l2_pct']):>3s} {pct(r['l2_hit_pct']):>3s} {pct(r['occupancy_pct']):>3s} "
            f"{pct(r['registers']):>3s}  {stalls}")
    return lines


def _counts(summary: dict, step: str) -> dict:
    return next((s.get("counts") or {} for s in summary["steps"] if s["name"] == step), {})


def one_screen(summary: dict, out: Path) -> str:
    env = summary.get("environment", {})
    plan = summary.get("plan", "full")
    head = (f"GPU kit, {plan} plan{' (dry run)' if summary['dry_run'] else ''}: "
            f"{env.get('device', '?')}, driver {env.get('driver', '-')}, torch "
            f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, torchvision "
            f"{env.get('torchvision', '?')}; copy {env.get('copy_bandwidth_GBps', 0):.0f} GB/s")
    lines = [head, f"{'step':12s} {'status':10s} {'seconds':>7s} {'cap':>5s}  details"]
    for s in summary["steps"]:
        c = s.get("counts", {})
        detail = {
            "smoke": lambda: f"{c.get('passed', 0)}/{c.get('checks', 0)} checks passed",
            "tests": lambda: (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
                              f"{c.get('error', 0)} errors, {c.get('skipped', 0)} skipped"),
            "memcheck": lambda: (f"{c.get('passed', 0)}/{len(c.get('kernels', {}))} kernels "
                                 f"passed, {c.get('errors', 0)} memcheck errors"),
            "benchmarks": lambda: (f"{len(c.get('ops', []))} ops, {c.get('rows', 0)} rows, "
                                   f"{c.get('mismatches', 0)} mismatches"),
            "static": lambda: (f"{c.get('rows', 0)} rows of {c.get('kernels', 0)} kernels, "
                               f"{c.get('compile_failures', 0)} failures, "
                               f"{c.get('spills', 0)} with spills"),
            "profile": lambda: (f"{c.get('profiled_rows', 0)}/{c.get('rows', 0)} rows "
                                f"profiled, {c.get('profile_errors', 0)} profile errors, "
                                f"{c.get('mismatches', 0)} mismatches"),
            "ncu": lambda: (f"{c.get('kernels', 0)} kernels in {c.get('workloads', 0)} "
                            "workloads" if "kernels" in c else ""),
            "sweep": lambda: (f"{c['workloads_run']}/{c['workloads']} workloads, "
                              f"{c['winners']} keys, {c['changed']} changed, "
                              f"{c['problems']} problems" if "winners" in c
                              else f"{len(c.get('files', []))} file(s)" if "files" in c
                              else ""),
        }.get(s["name"], lambda: "")()
        if s.get("reason"):
            detail = f"{detail}; {s['reason']}" if detail else s["reason"]
        lines.append(f"{s['name']:12s} {s['status']:10s} {s['seconds']:7.0f} "
                     f"{s.get('cap_s', 0):5.0f}  {detail[:160]}")
    memcheck = _counts(summary, "memcheck").get("kernels")
    if memcheck:
        by_status: dict[str, list[str]] = {}
        for name, status in memcheck.items():
            by_status.setdefault(status, []).append(name)
        lines.append("memcheck per kernel: " + "; ".join(
            f"{status} {', '.join(names)}" for status, names in by_status.items()))
    speed = _counts(summary, "benchmarks").get("speedup_range")
    if speed:
        lines.append("speed-up over torchvision (min-max per op): "
                     + ", ".join(f"{op} {r}" for op, r in speed.items()))
    verdicts = _counts(summary, "benchmarks").get("targets")
    if verdicts:
        lines.append("speed targets (issue 18)" + (": dry run, CPU timings, no verdict on "
                                                   "the GPU" if summary["dry_run"] else ":"))
        lines += [f"  {v['status']:12s} {v['target']}"
                  + (f" (worst {v['worst']})" if v.get("worst") else "") for v in verdicts]
    profile = _counts(summary, "profile")
    for key, what in (("kernel_speedup_range", "kernel-time speed-up (baseline / ours)"),
                      ("host_ratio_range", "host-time ratio (baseline / ours)")):
        if profile.get(key):
            lines.append(f"profile {what}: "
                         + ", ".join(f"{op} {r}" for op, r in profile[key].items()))
    if profile.get("ours_syncs_max"):
        lines.append("profile, most host syncs in one of our calls: "
                     + ", ".join(f"{op} {n}" for op, n in profile["ours_syncs_max"].items()))
    lines += _ncu_lines(_counts(summary, "ncu"))
    slow = _counts(summary, "tests").get("slowest")
    if slow:
        lines.append("slowest tests: " + "; ".join(slow[:3]))
    lines.append(f"{summary['seconds']:.0f} s of {summary['budget_s']:.0f}; files in {out}: "
                 + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return "\n".join(lines)


def unpack(folder: Path, results: Path = RESULTS_DIR) -> list[Path]:
    """A run's out folder -> benchmarks/results: the full plan's report as <device>.json,
    .md and plots; the profile plan's as <device>-profile.json and .md; the ncu table as
    <device>-ncu.csv; the sweep's files as <device>-sweep-*; the summary as
    <device>-gpu-summary.json (<device>-gpu-<plan>-summary.json for the short plans):
    what a session commits after a GPU run."""
    from benchmarks.__main__ import markdown, write_report
    summary = _read_json(folder / "summary.json")
    if summary is None:
        raise SystemExit(f"{folder}: no summary.json")
    written = []
    device = summary.get("environment", {}).get("device")
    if not device:
        raise SystemExit(f"{folder}/summary.json names no device")
    name = slug(device)
    results.mkdir(parents=True, exist_ok=True)
    report = _read_json(folder / f"{name}.json")
    if report:
        written += list(write_report(report, results))
        written += sorted(results.glob(f"{name}-*.png"))
    profiled = _read_json(folder / f"{name}-profile.json")
    if profiled:
        target = results / f"{name}-profile.json"
        shutil.copy2(folder / target.name, target)
        target.with_suffix(".md").write_text(markdown(profiled) + "\n")
        written += [target, target.with_suffix(".md")]
    extra = [(folder / "ncu.csv", results / f"{name}-ncu.csv")]
    extra += [(p, results / f"{name}-{p.name}") for p in sorted(folder.glob("sweep*"))
              if p.is_file() and p.name != "sweep.log"]
    for source, target in extra:
        if source.exists():
            shutil.copy2(source, target)
            written.append(target)
    plan = summary.get("plan", "full")
    target = results / (f"{name}-gpu-summary.json" if plan == "full"
                        else f"{name}-gpu-{plan}-summary.json")
    shutil.copy2(folder / "summary.json", target)
    written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=list(PLANS), default="full",
                   help="; ".join(f"{k}: {', '.join(v)} ({BUDGETS[k]:.0f} s)"
                                  for k, v in PLANS.items()))
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole plan (default: the plan's; "
                        f"{DRY_RUN_BUDGET:.0f} with --dry-run)")
    p.add_argument("--out", type=Path, default=None,
                   help="where summary.json, kit.log and the results go (default: $OUT when "
                        f"set, else {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan on the CPU at tiny sizes (interpreter, no sanitizer, "
                        "no ncu)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated steps instead of the plan's, of "
                        f"{','.join(list(STEPS)[1:])} (the environment step always runs: the "
                        "others need what it finds)")
    p.add_argument("--unpack", type=Path, metavar="DIR",
                   help="copy a run's results from DIR into benchmarks/results and stop")
    a = p.parse_args(argv)
    if a.unpack:
        for path in unpack(a.unpack):
            print(f"wrote {path}")
        return 0
    steps = ["environment"] + a.steps.split(",") if a.steps else None
    unknown = set(steps or []) - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown step(s) {sorted(unknown)}")
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / n for n in [f"{s}.log" for s in STEPS] + ["summary.json", LOG, "ncu.csv"]]
    stale += list(out.glob("sweep-*")) + list(out.glob("*-profile.json"))
    for path in stale:
        path.unlink(missing_ok=True)   # a previous run's files in the default folder
    budget = a.budget or (DRY_RUN_BUDGET if a.dry_run else BUDGETS[a.plan])
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as work:
        ctx = Context(out=out, work=Path(work), dry_run=a.dry_run)
        if a.dry_run:   # never overwrite the committed CPU report
            ctx.results = Path(work) / "results"
        summary = run_plan(ctx, budget, steps, plan=a.plan)
    problems = check_out_folder(out)
    if problems:
        summary["out_folder_problems"] = problems
        write_summary(out, summary)
    print()
    print(one_screen(summary, out))
    for problem in problems:
        print(f"warning: {problem}")
    return 0 if all(s["status"] in ("passed", "skipped") for s in summary["steps"]) else 1
