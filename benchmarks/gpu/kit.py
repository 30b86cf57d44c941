"""The GPU kit: one command that proves the project on a CUDA machine, inside a time budget.

    make gpu                                        # = PYTHONPATH=. python3 -m benchmarks.gpu
    python3 -m benchmarks.gpu [--budget 540] [--out DIR] [--steps tests,benchmarks]
    python3 -m benchmarks.gpu --dry-run             # the same plan on a CPU, tiny sizes
    python3 -m benchmarks.gpu --unpack DIR          # bring a run's results into the checkout

Nothing is installed: it runs on the machine's own python3 and packages. Six steps, in this
order, each in its own subprocess with its own time cap carved from the budget; a failing
step never stops the plan:

1. environment: GPU, driver, versions, measured copy bandwidth;
2. smoke: every public op and both model builders once against torchvision;
3. tests: the test suite on the CUDA backend only (TEST_BACKENDS=cuda), with durations;
4. memcheck: ``compute-sanitizer --tool memcheck`` over ``launch_all`` (every kernel
   specialization and tuning row once); skipped, with the reason, where the tool is
   missing or refuses the device;
5. benchmarks: the full benchmark report (``python -m benchmarks``);
6. static: the static kernel report, added to the benchmark report beside the times.

Each step gets the seconds reserved for it (``SHARES``, scaled to ``--budget``) plus what
the steps before it left unused; one that runs out is killed with its process group and
marked ``timed-out``, and the later steps keep their reserve. The out folder receives
``summary.json`` (one entry per step: name, status — passed, failed, skipped, timed-out —
seconds, counts, and the reason for anything not passed), each step's log and the
benchmark report's JSON: 8 files, flat, each far under 16 MiB — what the device tool brings
back. ``--unpack`` turns that folder into ``benchmarks/results/<device>.*`` (JSON,
Markdown, plots) and ``<device>-gpu-summary.json``, ready to commit.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
BUDGET = 540.0
DRY_RUN_BUDGET = 180.0
# Seconds reserved for each step at the default budget (scaled to another budget), from
# the first H200 run (2026-12-04): environment 10 s, smoke 30 s, tests 66 s, memcheck cut
# at 175 s, benchmarks 87 s with three ops failing early (about 170 s more for them,
# measured after the fix), static 67 s.
SHARES = {"environment": 15, "smoke": 40, "tests": 80, "memcheck": 105, "benchmarks": 225,
          "static": 75}
# The dry run's steps cost differently (Triton's interpreter pays per program).
DRY_RUN_SHARES = {"environment": 15, "smoke": 75, "tests": 15, "memcheck": 25,
                  "benchmarks": 30, "static": 20}
KILL_GRACE = 5.0     # seconds between SIGTERM and SIGKILL of a step cut at its cap
MARGIN = 3.0         # kept back for writing the summary
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
# The dry run at tiny sizes: the test step runs a few parity tests on the interpreter
# backend; the memory check's stand-in launches one op family's specializations.
DRY_RUN_TESTS = ["tests/test_mask_loss.py", "-k", "target_dtypes or layouts"]
DRY_RUN_MODULES = "kernels.ops.paste_masks_in_image"
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
    script = [ctx.python, "-m", "benchmarks.gpu.launch_all", "--json",
              str(ctx.work / "launch_all.json"), "--device", ctx.device]
    if ctx.dry_run:
        return script + ["--modules", DRY_RUN_MODULES], {}
    tool = ctx.environment.get("compute_sanitizer")
    if not tool:   # still launch everything once: a crash shows, and static reuses the record
        return script, {}
    # One launch of everything without the sanitizer first, to fill Triton's cache: on the
    # first H200 run, compiling every specialization under the sanitizer did not end in
    # 175 s. One cudaMalloc per tensor: PyTorch's caching allocator would hide overruns.
    warm = [ctx.python, "-m", "benchmarks.gpu.launch_all", "--json",
            str(ctx.work / "launch_all_warm.json"), "--device", ctx.device]
    checked = [tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
               *script]
    return (["sh", "-c", f"{shlex.join(warm)} > /dev/null && exec {shlex.join(checked)}"],
            {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})


REFUSALS = ("Device not supported", "device is not supported", "Unable to find injection",
            "Target application terminated before first instrumented API call",
            "Could not attach", "not supported on this platform")


def memcheck_collect(ctx: Context, rc: int):
    result = _read_json(ctx.work / "launch_all.json") or {}
    counts = {k: result[k] for k in ("launches", "kernels", "missing") if k in result}
    log = (ctx.out / "memcheck.log").read_text(errors="replace")
    if ctx.dry_run:
        status = None if rc == 0 else "failed"
        return status, "dry run: stand-in, launched through the interpreter without " \
                       "compute-sanitizer", counts
    if not ctx.environment.get("compute_sanitizer"):
        if rc == 0:
            return "skipped", f"{NO_SANITIZER}; every specialization launched without it", \
                counts
        return "failed", f"{NO_SANITIZER}; launching without it failed (exit code {rc})", counts
    for line in log.splitlines():
        if "ERROR SUMMARY:" in line:
            counts["errors"] = int(line.split("ERROR SUMMARY:")[1].split()[0])
    refused = next((r for r in REFUSALS if r in log), None)
    if refused and not result:
        return "skipped", f"compute-sanitizer refused the device: {refused!r}", counts
    if counts.get("errors"):
        return "failed", f"{counts['errors']} memory error(s); see memcheck.log", counts
    if result.get("missing"):
        return "failed", f"{len(result['missing'])} kernel row(s) never launched", counts
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
    launched = _read_json(ctx.work / "launch_all.json")
    if launched and not launched.get("missing") and launched.get("specs"):
        argv += ["--specs", str(ctx.work / "launch_all.json")]   # no second recording
    elif ctx.dry_run:   # recording through the interpreter takes minutes on a small CPU
        return "the memcheck stand-in recorded no launches to compile"
    # sm_90 is the GPU's own target (CI compiles sm_80 too); the dry run compiles a sample
    argv += ["--sample", "--arch", "90"] if ctx.dry_run else ["--arch", "90"]
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


PLAN = [
    Step("environment", "the GPU, driver, versions and copy bandwidth",
         environment_command, environment_collect, "the CPU, versions and copy bandwidth"),
    Step("smoke", "every public op and both model builders once, against torchvision",
         smoke_command, smoke_collect, "the same checks at tiny sizes, kernels interpreted"),
    Step("tests", "the test suite on the CUDA backend", tests_command, tests_collect,
         "a few mask-loss tests on the interpreter backend"),
    Step("memcheck", "every kernel specialization under compute-sanitizer memcheck",
         memcheck_command, memcheck_collect,
         "the launch script, interpreted, for one op family, without a sanitizer"),
    Step("benchmarks", "the full benchmark report", benchmarks_command, benchmarks_collect,
         "the report at tiny sizes, the ops' PyTorch path timed"),
    Step("static", "the static kernel report beside the measured times (sm_90)",
         static_command, static_collect, "a sample of the launched kernels compiled"),
]


# ---------------------------------------------------------------------------------------
# Running the plan

def caps(budget: float, dry_run: bool = False) -> dict[str, float]:
    """Seconds reserved per step for ``budget`` (the shares scaled to it)."""
    shares = DRY_RUN_SHARES if dry_run else SHARES
    total = sum(shares.values())
    return {name: budget * share / total for name, share in shares.items()}


def run_step(step: Step, ctx: Context, cap: float) -> dict:
    log_path = ctx.out / f"{step.name}.log"
    t0 = time.monotonic()
    ctx.step_started = time.time()
    command = step.command(ctx)
    entry = {"name": step.name, "what": step.describe(ctx), "cap_s": round(cap, 1),
             "log": log_path.name}
    if isinstance(command, str):
        log_path.write_text(f"skipped: {command}\n")
        entry.update(status="skipped", seconds=0.0, reason=command, counts={})
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
    return entry


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
             echo: Callable[[str], None] = print) -> dict:
    # a step cut at its cap may take KILL_GRACE more to die: keep that back too
    window = budget - MARGIN - KILL_GRACE
    reserved = caps(window, ctx.dry_run)
    plan = [s for s in PLAN if steps is None or s.name in steps]
    start = time.monotonic()
    deadline = start + window
    summary = {"kit": "python3 -m benchmarks.gpu", "dry_run": ctx.dry_run, "budget_s": budget,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": []}
    for i, step in enumerate(plan):
        later = sum(reserved[s.name] for s in plan[i + 1:])
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


def one_screen(summary: dict, out: Path) -> str:
    env = summary.get("environment", {})
    head = (f"GPU kit{' (dry run)' if summary['dry_run'] else ''}: {env.get('device', '?')}"
            f", driver {env.get('driver', '-')}, torch {env.get('torch', '?')}, "
            f"triton {env.get('triton', '?')}, torchvision {env.get('torchvision', '?')}; "
            f"copy {env.get('copy_bandwidth_GBps', 0):.0f} GB/s")
    lines = [head, f"{'step':12s} {'status':10s} {'seconds':>7s} {'cap':>5s}  details"]
    for s in summary["steps"]:
        c = s.get("counts", {})
        detail = {
            "smoke": lambda: f"{c.get('passed', 0)}/{c.get('checks', 0)} checks passed",
            "tests": lambda: (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
                              f"{c.get('error', 0)} errors, {c.get('skipped', 0)} skipped"),
            "memcheck": lambda: (f"{c.get('launches', '?')} launches of "
                                 f"{c.get('kernels', '?')} kernels, "
                                 f"{c.get('errors', '-')} memcheck errors"),
            "benchmarks": lambda: (f"{len(c.get('ops', []))} ops, {c.get('rows', 0)} rows, "
                                   f"{c.get('mismatches', 0)} mismatches"),
            "static": lambda: (f"{c.get('rows', 0)} rows of {c.get('kernels', 0)} kernels, "
                               f"{c.get('compile_failures', 0)} failures, "
                               f"{c.get('spills', 0)} with spills"),
        }.get(s["name"], lambda: "")()
        if s.get("reason"):
            detail = f"{detail}; {s['reason']}" if detail else s["reason"]
        lines.append(f"{s['name']:12s} {s['status']:10s} {s['seconds']:7.0f} "
                     f"{s.get('cap_s', 0):5.0f}  {detail[:160]}")
    speed = next((s["counts"].get("speedup_range") for s in summary["steps"]
                  if s["name"] == "benchmarks" and s.get("counts")), None)
    if speed:
        lines.append("speed-up over torchvision (min-max per op): "
                     + ", ".join(f"{op} {r}" for op, r in speed.items()))
    verdicts = next((s["counts"].get("targets") for s in summary["steps"]
                     if s["name"] == "benchmarks" and s.get("counts")), None)
    if verdicts:
        lines.append("speed targets (issue 18)" + (": dry run, CPU timings, no verdict on "
                                                   "the GPU" if summary["dry_run"] else ":"))
        lines += [f"  {v['status']:12s} {v['target']}"
                  + (f" (worst {v['worst']})" if v.get("worst") else "") for v in verdicts]
    slow = next((s["counts"].get("slowest") for s in summary["steps"]
                 if s["name"] == "tests" and s.get("counts")), None)
    if slow:
        lines.append("slowest tests: " + "; ".join(slow[:3]))
    lines.append(f"{summary['seconds']:.0f} s of {summary['budget_s']:.0f}; files in {out}: "
                 + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return "\n".join(lines)


def unpack(folder: Path, results: Path = RESULTS_DIR) -> list[Path]:
    """A run's out folder -> benchmarks/results/<device>.json, .md, plots and
    <device>-gpu-summary.json (what a session commits after a GPU run)."""
    from benchmarks.__main__ import write_report
    summary = _read_json(folder / "summary.json")
    if summary is None:
        raise SystemExit(f"{folder}: no summary.json")
    written = []
    device = summary.get("environment", {}).get("device")
    if not device:
        raise SystemExit(f"{folder}/summary.json names no device")
    report = _read_json(folder / f"{slug(device)}.json")
    if report:
        written += list(write_report(report, results))
        written += sorted(results.glob(f"{slug(device)}-*.png"))
    target = results / f"{slug(device)}-gpu-summary.json"
    shutil.copy2(folder / "summary.json", target)
    written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole plan (default {BUDGET:.0f}; "
                        f"{DRY_RUN_BUDGET:.0f} with --dry-run)")
    p.add_argument("--out", type=Path, default=None,
                   help="where summary.json and the logs go (default: $OUT when set, else "
                        f"{DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan on the CPU at tiny sizes (interpreter, no sanitizer)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated subset of {','.join(s.name for s in PLAN[1:])} "
                        "(the environment step always runs: the others need what it finds)")
    p.add_argument("--unpack", type=Path, metavar="DIR",
                   help="copy a run's results from DIR into benchmarks/results and stop")
    a = p.parse_args(argv)
    if a.unpack:
        for path in unpack(a.unpack):
            print(f"wrote {path}")
        return 0
    steps = ["environment"] + a.steps.split(",") if a.steps else None
    unknown = set(steps or []) - {s.name for s in PLAN}
    if unknown:
        p.error(f"--steps: unknown step(s) {sorted(unknown)}")
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    for name in [f"{s.name}.log" for s in PLAN] + ["summary.json"]:
        (out / name).unlink(missing_ok=True)   # a previous run's files in the default folder
    budget = a.budget or (DRY_RUN_BUDGET if a.dry_run else BUDGET)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as work:
        ctx = Context(out=out, work=Path(work), dry_run=a.dry_run)
        if a.dry_run:   # never overwrite the committed CPU report
            ctx.results = Path(work) / "results"
        summary = run_plan(ctx, budget, steps)
    problems = check_out_folder(out)
    if problems:
        summary["out_folder_problems"] = problems
        write_summary(out, summary)
    print()
    print(one_screen(summary, out))
    for problem in problems:
        print(f"warning: {problem}")
    return 0 if all(s["status"] in ("passed", "skipped") for s in summary["steps"]) else 1
