"""The benchmark report: every op (and the model) against torchvision, on the device present.

    python -m benchmarks [--quick | --full | --tiny] [--ops roi_align,nms]
                         [--dtype float32,bfloat16] [--out benchmarks/results] [--no-static]
                         [--no-host] [--copy-bandwidth GBPS] [--profile]

On a CUDA device the default is the full report; on the CPU it is --quick. ``--tiny`` is
the GPU kit's dry run (``python -m benchmarks.gpu --dry-run``): the smallest shapes, one
repeat, so every benchmark's code runs in seconds (through Triton's interpreter there).

Writes ``<out>/<device>.json`` (all numbers and the environment; rewritten after each op,
so a run cut short keeps what it measured), ``<out>/<device>.md`` (one table per op: ours,
the baseline, speed-up, achieved GB/s and its share of the device's measured copy
bandwidth where the op moves bytes) and ``<out>/<device>-<op>.png`` (speed-up per shape).
On the CPU each op's benchmark runs in a process of its own (what an earlier one leaves
behind — glibc's grown heap, OpenMP's spinning workers — must not time it); on a GPU, and
at --tiny sizes, whose timings mean nothing, in this one (the CUDA caching allocator
serves both sides from its cache once warmed up, and a process per op would cost the GPU
kit's capped step half a minute of start-ups). Each benchmark checks its result against
the baseline before timing; a mismatch is recorded in the rows it concerns (``parity``)
and the report goes on, as it does past an op whose benchmark raises (its section holds
the error). On a GPU the Markdown opens with
issue 18's speed targets, each met, missed or not measured (``benchmarks.targets``). After
the ops comes the host cost of each public call beside its baseline's (``python -m
benchmarks.host``: host µs, syncs, tensor operations, Triton launches; ``--no-host`` leaves
it out). The report ends with the static kernel report (``python -m benchmarks.static``:
registers, spills, shared memory and sm_90 occupancy of every kernel compiled for
sm_80/sm_90); ``--no-static`` leaves it out.

``--profile`` also profiles every timed call, ours and the baseline, after its timing
(``benchmarks._common.read_profile``): the device time of the kernels one call runs
(``*_kernel_ms``, torch.profiler's CUDA events; None on the CPU), its host time
(``*_host_us``) and host syncs (``*_syncs``), and ``kernel_speedup``, the speed-up of the
kernels alone. A wall speed-up below the kernel speed-up is host cost: launches, syncs,
Python. The tables and plots show them beside the wall speed-up.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from tqdm import tqdm

from benchmarks import host, static, targets
from benchmarks._common import (RESULTS_DIR, copy_bandwidth_gbps, default_device, environment,
                                format_table, on_gpu, profiling, slug)

# op name -> module with run(quick=, device=, write=, tiny=[, dtypes=]) -> rows; the model
# runs in float32 and takes no dtypes. The ops issue 18's targets read come first: a run
# cut short (the GPU kit's step cap) has them.
OPS = {
    "roi_align": "benchmarks.bench_roi_align",
    "nms": "benchmarks.bench_nms",
    "multiscale_roi_align": "benchmarks.bench_multiscale_roi_align",
    "mask_loss": "benchmarks.bench_mask_loss",
    "mask_predictor_loss": "benchmarks.bench_mask_predictor_loss",
    "paste_masks_in_image": "benchmarks.bench_paste_masks_in_image",
    "model": "benchmarks.bench_model",
}

# Columns never shown in the Markdown tables (kept in the JSON).
_HIDDEN = ("_p20", "_p80")
# The profile's columns (--profile), shown after the wall speed-up where some row has a
# value (on the CPU the kernel times are None: left out); the provider-named copies of the
# baseline's (torchvision_host_us, ...) stay in the JSON.
PROFILE_COLUMNS = ("kernel_speedup", "ours_kernel_ms", "baseline_kernel_ms", "ours_host_us",
                   "baseline_host_us", "ours_syncs", "baseline_syncs", "profile_error")
_PROFILE_SUFFIXES = ("_kernel_ms", "_host_us", "_syncs")
PROFILE_NOTE = (
    "Profile (`--profile`): `kernel_speedup` = baseline / ours device time of the CUDA "
    "kernels one call runs (torch.profiler: kernels, memsets and device-to-device copies, "
    "summed over a few calls and divided); `*_host_us`: host time until a call returns "
    "(CUDA: median of single calls with no sync inside the loop; CPU: the wall time); "
    "`*_syncs`: host syncs of one call (CPU: the host's reads of tensor data). A wall "
    "speed-up below the kernel speed-up is host cost: launches, syncs, Python.")


def available_ops() -> dict[str, object]:
    mods = {}
    for name, module in OPS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return mods


def _label(row: dict) -> str:
    skip = {"mode", "dtype", "parity"}
    parts = [str(v) for k, v in row.items()
             if not any(k.startswith(p) for p in ("ours", "torchvision", "torch_", "speedup",
                                                  "baseline", "size", "kernel_speedup",
                                                  "profile_error"))
             and k not in skip and not isinstance(v, float)]
    return " ".join(parts)[:40]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(op: str, rows: list[dict], path: Path, device: str) -> Path | None:
    """Speed-up per shape as a PNG, and beside it, dashed, the kernels' own speed-up where
    the rows have it (--profile on a GPU); ``device`` is the device's name for the title."""
    rows = [r for r in rows if _number(r.get("speedup"))]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, list[tuple[str, float, float | None]]] = {}
    for r in rows:
        key = " ".join(str(r[k]) for k in ("mode", "dtype") if k in r) or "speed-up"
        series.setdefault(key, []).append((_label(r), r["speedup"], r.get("kernel_speedup")))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 3), 4))
    kernels = False
    for key, pts in series.items():
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        timed = [(p[0], p[2]) for p in pts if _number(p[2])]
        if timed:
            kernels = True
            ax.plot([p[0] for p in timed], [p[1] for p in timed], marker="x", ls="--",
                    color=line.get_color(), label=f"{key}, kernels only")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("speed-up over baseline (x)")
    ax.set_title(f"{op} on {device}" + (" (dashed: kernels only)" if kernels else ""))
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _columns(rows: list[dict]) -> list[str]:
    """An op table's columns: every field in the rows' order, but the hidden ones and the
    profile's, which follow the wall speed-up where some row has a value."""
    columns = []
    for r in rows:
        for k in r:
            if k not in columns and not k.endswith(_HIDDEN + _PROFILE_SUFFIXES) \
                    and k not in PROFILE_COLUMNS:
                columns.append(k)
    at = columns.index("speedup") + 1 if "speedup" in columns else len(columns)
    columns[at:at] = [c for c in PROFILE_COLUMNS if any(r.get(c) is not None for r in rows)]
    return columns


def markdown(results: dict) -> str:
    env = results["environment"]
    bandwidth = results.get("copy_bandwidth_GBps")
    out = [f"# Benchmark report: {env['device']}", "",
           f"torch {env['torch']}, triton {env['triton']}, torchvision {env['torchvision']}, "
           f"git {env['git_sha']}. Measured copy bandwidth: {bandwidth or 0:.1f} GB/s.", ""]
    if results.get("runs"):   # a report put together from several runs says which
        out += [results["runs"], ""]
    if results.get("profile"):
        out += [PROFILE_NOTE, ""]
    if on_gpu(env):
        out += ["## Speed targets (issue 18)", "",
                "Each target's rows must all reach its minimum speed-up and match their "
                "baseline (`python -m benchmarks.targets`).", "",
                targets.markdown(targets.evaluate(results)), ""]
    for op, section in results["benchmarks"].items():
        out += [f"## {op}", ""]
        if section.get("measured"):
            out += [f"Measured: {section['measured']}.", ""]
        if "error" in section:
            out += [f"Benchmark failed: `{section['error']}`", ""]
            continue
        rows = [dict(r) for r in section["rows"]]
        for r in rows:
            if isinstance(r.get("ours_GBps"), (int, float)) and bandwidth:
                r["ours_%copy_bw"] = f"{100 * r['ours_GBps'] / bandwidth:.0f}%"
        out += [format_table(rows, _columns(rows)), ""]
        if section.get("plot"):
            out += [f"![{op}]({Path(section['plot']).name})", ""]
    host_section = results.get("host")
    if host_section:
        out += ["## Host cost per call (`python -m benchmarks.host`)", ""]
        if "error" in host_section:
            out += [f"Host reading failed: `{host_section['error']}`", ""]
        else:
            out += [host.markdown(host_section["rows"]), ""]
    static_section = results.get("static")
    if static_section:
        out += ["## Static kernel report (sm_80 / sm_90, compiled without a GPU)", ""]
        if "skipped" in static_section:
            out += [f"Skipped: {static_section['skipped']}", ""]
        else:
            if static_section.get("sampled"):
                out += ["One specialization per kernel and tuning row (--tiny).", ""]
            out += [static.markdown(static_section["rows"], static_section["failures"]), ""]
    return "\n".join(out)


def write_report(results: dict, out: Path, plots: bool = True) -> tuple[Path, Path]:
    """``<out>/<device>.json`` (atomically), its Markdown and, with ``plots``, the PNGs."""
    name = results["environment"]["device"]
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        for op, section in results["benchmarks"].items():
            png = plot(op, section.get("rows", []), out / f"{slug(name)}-{op}.png", name)
            if png:
                section["plot"] = str(png)
    json_path = out / f"{slug(name)}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results) + "\n")
    return json_path, md_path


def _op_section(module, op: str, quick: bool, device: str, tiny: bool,
                dtypes: list[str], profile: bool = False) -> dict:
    """One op's report section: its rows, or the error its benchmark raised (one op's
    failure must not cost the others' numbers). ``profile``: every timed call profiled."""
    try:
        kwargs = {} if op == "model" else {"dtypes": dtypes}
        with profiling(profile):
            return {"rows": module.run(quick=quick, device=device, write=False, tiny=tiny,
                                       **kwargs)}
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def _in_own_process(op: str, argv: list[str]) -> dict:
    """``op``'s section, measured in a process of its own: what an op's earlier neighbours
    leave behind — the allocator's grown heap (after the roi_align benchmark, torch's
    36 MB mask-loss gradient came from retained heap instead of fresh pages: 2.5 ms, not
    13), OpenMP's spinning workers, warm caches — must not time the next op. Its output goes
    to this process's; a crash leaves an error in its section."""
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        path = Path(tmp) / "section.json"
        rest = [x for i, x in enumerate(argv) if not (
            x.startswith("--ops") or (i and argv[i - 1] == "--ops"))]
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "benchmarks", *rest, "--ops", op,
                               "--rows-out", str(path)], cwd=root, env=env)
        if path.exists():
            return json.loads(path.read_text())
        return {"error": f"the benchmark's process ended with exit code {proc.returncode} "
                         "and no result (see the output above)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--full", action="store_true",
                   help="full shapes on the CPU too (the CPU default is --quick)")
    p.add_argument("--tiny", action="store_true",
                   help="the smallest shapes, one repeat, a sampled static section (the GPU "
                        "kit's dry run, the report's test)")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-static", action="store_true",
                   help="leave out the static kernel report (registers, spills, occupancy)")
    p.add_argument("--no-host", action="store_true",
                   help="leave out the host cost per call (syncs, tensor ops, launches)")
    p.add_argument("--copy-bandwidth", type=float, default=None, metavar="GBPS",
                   help="the device's copy bandwidth, already measured (default: measure it)")
    p.add_argument("--profile", action="store_true",
                   help="also profile every timed call: kernel device time, host time and "
                        "host syncs, ours and the baseline's")
    p.add_argument("--rows-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = a.device or default_device()
    quick = a.quick or a.tiny or (device == "cpu" and not a.full)
    if quick and not (a.quick or a.tiny or a.rows_out):
        print("no GPU: running the --quick report on the CPU (--full for all shapes)")
    mods = available_ops()
    wanted = a.ops.split(",") if a.ops else list(mods)
    unknown = [o for o in wanted if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown op(s) {unknown}; choose from {list(OPS)}")
    missing = [o for o in wanted if o not in mods]
    if missing:
        p.error(f"--ops: benchmark module(s) not present: {missing}")
    dtypes = a.dtype.split(",")
    if a.rows_out and len(wanted) != 1:
        p.error("--rows-out takes one op (--ops)")
    if a.rows_out:      # one op, for the report's own process (below)
        (op,) = wanted
        a.rows_out.write_text(json.dumps(_op_section(mods[op], op, quick, device, a.tiny,
                                                     dtypes, a.profile), default=str))
        return 0
    results = {"environment": environment(device), "quick": quick, "tiny": a.tiny,
               "profile": a.profile, "benchmarks": {}}
    results["copy_bandwidth_GBps"] = a.copy_bandwidth or copy_bandwidth_gbps(device)
    failed = []
    for op in tqdm(wanted, desc="benchmarks", unit="op"):
        section = (_in_own_process(op, argv if argv is not None else sys.argv[1:])
                   if device == "cpu" and not a.tiny
                   else _op_section(mods[op], op, quick, device, a.tiny, dtypes, a.profile))
        if "error" in section:
            failed.append(op)
        results["benchmarks"][op] = section
        write_report(results, a.out, plots=False)   # a run cut short keeps what it measured
    if not a.no_host:
        print("reading the host cost of each call (benchmarks.host)")
        results["host"] = host.report_section(device, tiny=a.tiny)
    if not a.no_static:
        print("compiling every kernel for sm_80/sm_90 (static kernel report"
              + (", one specialization per kernel and tuning row)" if a.tiny else ")"))
        results["static"] = static.report_section(sampled=a.tiny)
    json_path, md_path = write_report(results, a.out)
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}")
    mismatches = [r for s in results["benchmarks"].values() for r in s.get("rows", [])
                  if r.get("parity", "ok") != "ok"]
    if failed or mismatches:
        print(f"benchmark errors in {failed or 'no op'}; {len(mismatches)} row(s) mismatch "
              "their baseline")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
