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
            "shared_bytes": max(r["shared_bytes"] for r in rs),
            "num_warps": rs[0]["num_warps"],
            "occupancy_sm90": f"{occupancy:.0%}" if occupancy is not None else None,
            "note": _aot.occupancy_note(rs[0]["spec"], occupancy, notes),
        })
    return rows


COLUMNS = ["kernel", "tuning", "arch", "runs_on", "variants", "registers", "spill_bytes",
           "shared_bytes", "num_warps", "occupancy_sm90"]


def notes_text(rows: list[dict]) -> str:
    """The sm_90 rows below the occupancy target, each with why (Markdown list)."""
    lines = [f"- `{r['kernel']}` ({r['tuning']}, {r['occupancy_sm90']}): {r['note']}"
             for r in rows if r["arch"] == "sm_90" and r["note"]]
    if not lines:
        return ""
    return (f"Below {OCCUPANCY_TARGET:.0%} theoretical occupancy on sm_90:\n"
            + "\n".join(lines))


def run(write: bool = True) -> tuple[list[dict], list[dict]]:
    """Record, compile and summarize (the caller checks can_compile_without_gpu first)."""
    specs = _aot.record_in_subprocess()
    results = _aot.compile_in_subprocess(specs)
    rows = summarize(results)
    if write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        failed = [r for r in results if not r["ok"]]
        (RESULTS_DIR / "static.json").write_text(json.dumps(
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    a = p.parse_args(argv)
    reason = _aot.can_compile_without_gpu()
    if reason:
        raise SystemExit(reason)
    rows, results = run()
    failed = [r for r in results if not r["ok"]]
    table = markdown(rows, failed)
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
