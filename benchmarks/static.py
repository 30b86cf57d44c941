"""Static kernel report: registers, spills, shared memory, warps and sm_90 occupancy.

Compiles, without a GPU, every specialization the ops launch (recorded from each op's
``_compile_examples()``, expanded over the tuning tables) for sm_80 and sm_90, and
writes ``benchmarks/results/static.json`` and a Markdown table.

    python -m benchmarks.static [--markdown PATH]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks._common import RESULTS_DIR, format_table
from kernels import _aot
from kernels._utils import OCCUPANCY_TARGET


def summarize(results: list[dict]) -> list[dict]:
    """One row per (kernel, tuning row, arch): the worst case over dtypes and flags."""
    notes = _aot.occupancy_notes()
    groups = defaultdict(list)
    for r in results:
        if not r["ok"]:
            continue
        spec = r["spec"]
        tuning = " ".join(f"{k}={v}" for k, v in spec["tunables"])
        groups[(spec["kernel"], tuning, bool(spec.get("interpreter_only")), r["arch"])].append(r)
    rows = []
    for (kernel, tuning, interpreter_only, arch), rs in sorted(groups.items()):
        occupancy = min(r["occupancy_sm90"] for r in rs) if arch == 90 else None
        rows.append({
            "kernel": kernel.split(":")[1], "tuning": tuning, "arch": f"sm_{arch}",
            "runs_on": "interpreter" if interpreter_only else "GPU", "variants": len(rs),
            "registers": max(r["registers"] for r in rs),
            "spill_bytes": max(r["spill_bytes"] for r in rs),
            "atomics": max(r.get("atomics", 0) for r in rs),
            "fences": max(r.get("fences", 0) for r in rs),
            "shared_bytes": max(r["shared_bytes"] for r in rs),
            "num_warps": rs[0]["num_warps"],
            "occupancy_sm90": f"{occupancy:.0%}" if occupancy is not None else None,
            "note": _aot.occupancy_note(rs[0]["spec"], occupancy, notes),
        })
    return rows


COLUMNS = ["kernel", "tuning", "arch", "runs_on", "variants", "registers", "spill_bytes",
           "shared_bytes", "num_warps", "occupancy_sm90", "atomics", "fences"]


def notes_text(rows: list[dict]) -> str:
    """The sm_90 rows below the occupancy target, each with why (Markdown list)."""
    lines = [f"- `{r['kernel']}` ({r['tuning']}, {r['occupancy_sm90']}): {r['note']}"
             for r in rows if r["arch"] == "sm_90" and r["note"]]
    if not lines:
        return ""
    return (f"Below {OCCUPANCY_TARGET:.0%} theoretical occupancy on sm_90:\n"
            + "\n".join(lines))


def sample(specs: list[dict]) -> list[dict]:
    """One specialization per kernel and tuning row (the GPU kit's dry run compiles these)."""
    seen, out = set(), []
    for spec in specs:
        key = (spec["kernel"], json.dumps(spec["tunables"]))
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def run(write: bool = True, specs: list[dict] | None = None, archs=_aot.ARCHS,
        out_dir: Path = RESULTS_DIR) -> tuple[list[dict], list[dict]]:
    """Record (unless ``specs`` are given), compile and summarize; write ``static.json``
    into ``out_dir``. The caller checks can_compile_without_gpu first."""
    specs = _aot.record_in_subprocess() if specs is None else specs
    results = _aot.compile_in_subprocess(specs, archs)
    rows = summarize(results)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        failed = [r for r in results if not r["ok"]]
        (out_dir / "static.json").write_text(json.dumps(
            {"rows": rows, "failures": failed, "specializations": len(specs)}, indent=1) + "\n")
    return rows, results


def markdown(rows: list[dict], failures: list[dict]) -> str:
    """The table, the notes on rows below the occupancy target, and any compile failure."""
    out = format_table(rows, COLUMNS)
    notes = notes_text(rows)
    if notes:
        out += "\n\n" + notes
    for r in failures:
        out += f"\n\nFAILED {r['spec']['kernel']} sm_{r['arch']}: {r['error']}"
    return out


def report_section() -> dict:
    """The benchmark report's static section: rows and failures, or why it was skipped."""
    reason = _aot.can_compile_without_gpu()
    if reason:
        return {"skipped": reason}
    rows, results = run(write=False)
    return {"rows": rows, "failures": [r for r in results if not r["ok"]]}


def problems(rows: list[dict], results: list[dict]) -> list[str]:
    """What fails the compile check: compile errors, spills on sm_90, rows a GPU runs below
    the occupancy target with no stated reason."""
    out = [f"compile failed: {r['spec']['kernel']} sm_{r['arch']}" for r in results
           if not r["ok"]]
    out += [f"spills: {r['kernel']} ({r['tuning']}) {r['spill_bytes']} bytes" for r in rows
            if r["arch"] == "sm_90" and r["spill_bytes"]]
    out += [f"occupancy: {r['kernel']} ({r['tuning']}) {r['occupancy_sm90']}" for r in rows
            if r["note"] == _aot.UNJUSTIFIED]
    out += [f"fenced atomics: {r['kernel']} ({r['tuning']}) {r['fences']} MEMBAR" for r in rows
            if r["fences"]]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    p.add_argument("--specs", type=Path,
                   help="compile these specializations (JSON, as `kernels._aot record` or "
                        "`benchmarks.gpu.launch_all` write them) instead of recording")
    p.add_argument("--sample", action="store_true",
                   help="one specialization per kernel and tuning row (a quick check)")
    p.add_argument("--arch", type=int, nargs="+", default=list(_aot.ARCHS))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where static.json goes")
    p.add_argument("--report", type=Path,
                   help="a benchmark report's JSON: add this table to it (beside the measured "
                        "times) and rewrite its Markdown")
    a = p.parse_args(argv)
    reason = _aot.can_compile_without_gpu()
    if reason:
        raise SystemExit(reason)
    specs = None
    if a.specs:
        data = json.loads(a.specs.read_text())
        specs = data["specs"] if isinstance(data, dict) else data
    if a.sample:
        specs = sample(_aot.record_in_subprocess() if specs is None else specs)
    rows, results = run(specs=specs, archs=a.arch, out_dir=a.out_dir)
    failed = [r for r in results if not r["ok"]]
    table = markdown(rows, failed)
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.report:
        from benchmarks.__main__ import write_report
        report = json.loads(a.report.read_text())
        report["static"] = {"rows": rows, "failures": failed}
        write_report(report, a.report.parent, plots=False)
        print(f"added to {a.report} and its Markdown")
    found = problems(rows, results)
    for line in found:
        print(line)
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
