"""GPU kit step: hardware counters of the hot kernels beside torchvision's (Nsight Compute).

    python -m benchmarks.gpu.ncu --json PATH --table PATH.csv --work DIR [--budget S]

Runs ``benchmarks.gpu.ncu_workload`` under ``ncu`` — clocks left alone (``--clock-control
none``), only the profiled regions (``--profile-from-start off``: each region's warm-up
runs unprofiled), only the kernels ``ncu_workload.KERNEL_REGEX`` names, at most
``LAUNCH_COUNT`` launches, NVTX on — and writes the report to DIR. Then reads it back twice
as CSV (``--page raw``): with the kernels' own names and renamed by their NVTX range
(``<workload>|<provider>``), joined by launch ID. Per kernel: duration, DRAM and L2
throughput as % of peak, L2 hit rate, achieved occupancy, registers per thread and the top
three warp-stall reasons (cycles per issued instruction); per region, the summed duration.

Writes ``--table`` (CSV, one row per kernel) and ``--json`` (``status``: ok, skipped or
failed; ``reason``; the rows; per-region totals; ncu's version and command). Skipped, with
the reason, where ncu is missing or refuses (no permission to read the counters,
ERR_NVGPUCTRPERM; an unsupported device; a profiler that cannot load). Metrics this ncu
does not know make it retry once with its sections instead; a metric missing from the
report leaves its cell empty.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu.ncu_workload import KERNEL_REGEX, MARKER

NCU_PLACES = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu",
              "/usr/local/NVIDIA-Nsight-Compute*/ncu", "/usr/local/cuda-*/bin/ncu")
LAUNCH_COUNT = 400
METRICS = ("gpu__time_duration.sum",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "lts__throughput.avg.pct_of_peak_sustained_elapsed",
           "lts__t_sector_hit_rate.pct",
           "sm__warps_active.avg.pct_of_peak_sustained_active",
           "sm__throughput.avg.pct_of_peak_sustained_elapsed",
           "launch__registers_per_thread",
           r"regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$")
# the same figures through ncu's sections, for an ncu that rejects a name above
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats",
            "MemoryWorkloadAnalysis")
# what ncu prints where it cannot profile this machine -> the reason given
REFUSALS = {
    "ERR_NVGPUCTRPERM": "no permission to read the GPU's performance counters "
                        "(ERR_NVGPUCTRPERM)",
    "LibraryNotLoaded": "ncu could not load its profiler library (LibraryNotLoaded)",
    "Failed to initialize the profiler": "ncu could not initialize its profiler",
    "evice not supported": "ncu does not support this device",
    "evice is not supported": "ncu does not support this device",
    "not supported on this platform": "ncu does not support this platform",
}
UNKNOWN_METRIC = ("Failed to find metric", "metric not found", "Invalid metric",
                  "unknown metric")
IMPORT_SECONDS = 25.0     # kept back from the budget for reading the report twice

# the table's figures: column -> metric names to try, in order
FIGURES = {
    "duration_us": ("gpu__time_duration.sum",),
    "dram_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                 "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    "l2_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed",),
    "l2_hit_pct": ("lts__t_sector_hit_rate.pct",),
    "occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
    "registers": ("launch__registers_per_thread",),
}
STALL = (re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$"),
         re.compile(r"^smsp__average_warp_latency_issue_stalled_(\w+?)(?:\.ratio|\.sum)?$"),
         re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+?)(?:\.sum)?$"))
NOT_STALLS = {"selected", "not_issued"}   # the issuing warp; the total, not a reason
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3,
              "msecond": 1e3, "s": 1e6, "second": 1e6}
COLUMNS = ["workload", "provider", "kernel", "id", "duration_us", "dram_pct", "l2_pct",
           "l2_hit_pct", "occupancy_pct", "sm_pct", "registers", "stall_1", "stall_2",
           "stall_3", "grid", "block"]


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in NCU_PLACES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def ncu_version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def profile_argv(exe: str, report: Path, workload: list[str], sections: bool) -> list[str]:
    what = (sum((["--section", s] for s in SECTIONS), []) if sections
            else ["--metrics", ",".join(METRICS)])
    return [exe, "--clock-control", "none", "--profile-from-start", "off", "--nvtx",
            "--kernel-name", f"regex:{KERNEL_REGEX}", "--launch-count", str(LAUNCH_COUNT),
            *what, "--export", str(report), "--force-overwrite", *workload]


def import_argv(exe: str, report: Path, nvtx_names: bool) -> list[str]:
    argv = [exe, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base",
            "--print-kernel-base", "function"]
    return argv + (["--print-nvtx-rename", "kernel"] if nvtx_names else [])


# ---------------------------------------------------------------------------------------
# Reading the CSV

def parse_raw_csv(text: str) -> list[dict]:
    """ncu's ``--page raw --csv`` output -> one dict per kernel launch: column -> (value,
    unit). Lines before the header (ncu's ==PROF== / ==WARNING== notes) are skipped; the
    row after the header holds the units."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if '"Kernel Name"' in ln), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], rows[1:]
    units = None
    if body and (not body[0] or not body[0][0].strip()):   # units: blank under "ID"
        units, body = body[0], body[1:]
    out = []
    for row in body:
        if len(row) != len(header) or not row[0].strip():
            continue   # a note or a cut line
        out.append({h: (v, units[i] if units and i < len(units) else "")
                    for i, (h, v) in enumerate(zip(header, row))})
    return out


def number(cell) -> float | None:
    if cell is None:
        return None
    value = cell[0] if isinstance(cell, tuple) else cell
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return None


def figure(row: dict, column: str) -> float | None:
    for metric in FIGURES[column]:
        if metric in row:
            value = number(row[metric])
            if value is None:
                continue
            if column == "duration_us":
                value *= TIME_UNITS.get(row[metric][1].strip(), 1e-3)   # base unit: ns
            return value
    return None


def stalls(row: dict, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` warp-stall reasons by cycles per issued instruction (or by samples)."""
    for pattern in STALL:
        found = []
        for name, cell in row.items():
            m = pattern.match(name)
            if m and m.group(1) not in NOT_STALLS:
                value = number(cell)
                if value is not None:
                    found.append((m.group(1), value))
        if found:
            return sorted(found, key=lambda kv: -kv[1])[:top]
    return []


def attribute(kernels: list[dict], renamed: dict[str, str], manifest: dict) -> None:
    """Set each kernel's workload and provider: from its NVTX range (``renamed``: launch ID
    -> the name ncu printed with --print-nvtx-rename), else from the marker kernels that
    open each region in the manifest's order."""
    regions = manifest.get("regions", [])
    by_name = {r["name"]: r for r in regions}
    if manifest.get("markers"):
        index = -1
        for k in kernels:
            if MARKER in k["kernel"]:
                index += 1
            region = regions[index] if 0 <= index < len(regions) else None
            k["workload"] = region["workload"] if region else "?"
            k["provider"] = region["provider"] if region else "?"
        return
    for k in kernels:
        name = renamed.get(k["id"], "")
        region = by_name.get(name) or next((r for n, r in by_name.items() if n in name), None)
        k["workload"] = region["workload"] if region else "?"
        k["provider"] = region["provider"] if region else "?"


def table(raw: list[dict], renamed_raw: list[dict], manifest: dict) -> list[dict]:
    kernels = []
    for row in raw:
        entry = {"id": row.get("ID", (str(len(kernels)), ""))[0],
                 "kernel": row.get("Kernel Name", ("?", ""))[0],
                 "grid": row.get("Grid Size", ("", ""))[0],
                 "block": row.get("Block Size", ("", ""))[0]}
        for column in FIGURES:
            entry[column] = figure(row, column)
        for i, (reason, value) in enumerate(stalls(row), 1):
            entry[f"stall_{i}"] = f"{reason} {value:.1f}"
        kernels.append(entry)
    renamed = {r.get("ID", (str(i), ""))[0]: r.get("Kernel Name", ("", ""))[0]
               for i, r in enumerate(renamed_raw)}
    attribute(kernels, renamed, manifest)
    return [k for k in kernels if MARKER not in k["kernel"]]


def totals(rows: list[dict]) -> list[dict]:
    """Per workload: each provider's summed duration and kernel count, and the ratio
    baseline / ours (above 1: ours takes less GPU time)."""
    out: dict[str, dict] = {}
    for r in rows:
        w = out.setdefault(r["workload"], {"workload": r["workload"]})
        w[f"{r['provider']}_us"] = w.get(f"{r['provider']}_us", 0.0) + (r["duration_us"] or 0)
        w[f"{r['provider']}_kernels"] = w.get(f"{r['provider']}_kernels", 0) + 1
    for w in out.values():
        base = next((p[:-3] for p in w if p.endswith("_us") and p != "ours_us"), None)
        if base and w.get("ours_us"):
            w["baseline"] = base
            w["ratio"] = round(w[f"{base}_us"] / w["ours_us"], 3)
        for key in list(w):
            if key.endswith("_us"):
                w[key] = round(w[key], 1)
    return list(out.values())


def write_table(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 2) if isinstance(v, float) else v)
                             for k, v in r.items()})


# ---------------------------------------------------------------------------------------
# Running ncu

def _run(argv: list[str], timeout: float, log) -> tuple[int | None, bool]:
    """(exit code, timed out): argv in a session of its own, killed whole at the timeout."""
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1.0)), False
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=5)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode, True
    except BaseException:   # the kit cut this step: ncu and its target go too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise


def _import(exe: str, report: Path, nvtx_names: bool) -> str:
    """The report as raw CSV ("" where ncu cannot read it back in time)."""
    try:
        out = subprocess.run(import_argv(exe, report, nvtx_names), capture_output=True,
                             text=True, timeout=IMPORT_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def refusal(log: str) -> str | None:
    return next((why for key, why in REFUSALS.items() if key in log), None)


def profile(work: Path, budget: float, exe: str | None, log_path: Path) -> dict:
    result = {"status": "failed", "rows": [], "totals": [], "kernel_regex": KERNEL_REGEX,
              "launch_count": LAUNCH_COUNT}
    exe = exe or find_ncu()
    if not exe:
        return {**result, "status": "skipped",
                "reason": "ncu not found (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)"}
    result.update(ncu=exe, version=ncu_version(exe))
    deadline = time.monotonic() + budget
    work.mkdir(parents=True, exist_ok=True)
    report, manifest_path = work / "ncu_report", work / "ncu_manifest.json"
    rep_file = report.with_suffix(".ncu-rep")
    text = ""
    with log_path.open("a") as log:
        for sections in (False, True):
            rep_file.unlink(missing_ok=True)
            manifest_path.unlink(missing_ok=True)
            left = deadline - time.monotonic() - IMPORT_SECONDS
            if left < 30:
                result["reason"] = "no time left to run ncu"
                break
            # the workload stops starting regions well before ncu's own timeout, so ncu
            # ends normally and writes its report
            workload = [sys.executable, "-m", "benchmarks.gpu.ncu_workload", "--device", "cuda",
                        "--manifest", str(manifest_path), "--budget", f"{left * 0.75:.0f}"]
            argv = profile_argv(exe, report, workload, sections)
            result["command"] = " ".join(argv)
            rc, timed_out = _run(argv, left, log)
            text = log_path.read_text(errors="replace")
            if timed_out:
                result["reason"] = f"ncu was cut at {left:.0f} s"
            elif (not rep_file.exists() and not sections
                  and any(u in text for u in UNKNOWN_METRIC)):
                log.write("this ncu rejected a metric name: again with its sections\n")
                log.flush()
                result["metrics"] = "sections"
                continue
            elif rc != 0:
                result["reason"] = f"ncu exited with {rc}"
            break
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    rows = []
    if rep_file.exists():
        raw = parse_raw_csv(_import(exe, rep_file, False))
        renamed = ([] if manifest.get("markers")
                   else parse_raw_csv(_import(exe, rep_file, True)))
        rows = table(raw, renamed, manifest)
    result.update(rows=rows, totals=totals(rows), regions=len(manifest.get("regions", [])),
                  left_out=manifest.get("left_out", 0), nvtx=manifest.get("nvtx"))
    if not rows:
        why = refusal(text)
        if why:
            return {**result, "status": "skipped", "reason": why}
        result["reason"] = result.get("reason") or (
            "ncu profiled no kernel" if rep_file.exists() else "ncu wrote no report")
        return result
    unattributed = sum(1 for r in rows if r["workload"] == "?")
    if unattributed:
        result["unattributed"] = unattributed
    if "reason" not in result:
        result["status"] = "ok"
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--table", type=Path, required=True, help="the per-kernel table (CSV)")
    p.add_argument("--work", type=Path, required=True, help="where ncu's report goes")
    p.add_argument("--budget", type=float, default=240.0, help="seconds in all")
    p.add_argument("--ncu", default=None, help="ncu's path (default: found on PATH or in "
                                               "CUDA's and Nsight Compute's folders)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_path = a.work / "ncu.log"
    a.work.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    try:
        result = profile(a.work, a.budget, a.ncu, log_path)
    finally:
        sys.stdout.write(log_path.read_text(errors="replace"))
    if result["rows"]:
        write_table(result["rows"], a.table)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"ncu: {result['status']}" + (f" - {result['reason']}" if result.get("reason") else "")
          + f"; {len(result['rows'])} kernel(s) in {len(result['totals'])} workload(s)")
    for t in result["totals"]:
        base = t.get("baseline", "-")
        print(f"  {t['workload']:45s} ours {t.get('ours_us', 0):9.1f} us  {base} "
              f"{t.get(f'{base}_us', 0):9.1f} us  ratio {t.get('ratio', '-')}")
    return {"ok": 0, "skipped": 0}.get(result["status"], 1)


if __name__ == "__main__":
    raise SystemExit(main())
