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


def summarize(results: list[dict]) -> list[dict]:
    """One row per (kernel, tuning row, arch): the worst case over dtypes and flags."""
    groups = defaultdict(list)
    for r in results:
        if not r["ok"]:
            continue
        tuning = " ".join(f"{k}={v}" for k, v in r["spec"]["tunables"])
        groups[(r["spec"]["kernel"].split(":")[1], tuning, r["arch"])].append(r)
    rows = []
    for (kernel, tuning, arch), rs in sorted(groups.items()):
        rows.append({
            "kernel": kernel, "tuning": tuning, "arch": f"sm_{arch}", "variants": len(rs),
            "registers": max(r["registers"] for r in rs),
            "spill_bytes": max(r["spill_bytes"] for r in rs),
            "shared_bytes": max(r["shared_bytes"] for r in rs),
            "num_warps": rs[0]["num_warps"],
            "occupancy_sm90": (f"{min(r['occupancy_sm90'] for r in rs):.0%}"
                               if arch == 90 else None),
        })
    return rows


COLUMNS = ["kernel", "tuning", "arch", "variants", "registers", "spill_bytes", "shared_bytes",
           "num_warps", "occupancy_sm90"]


def run(write: bool = True) -> tuple[list[dict], list[dict]]:
    reason = _aot.can_compile_without_gpu()
    if reason:
        raise SystemExit(reason)
    specs = _aot.record_in_subprocess()
    results = _aot.compile_in_subprocess(specs)
    rows = summarize(results)
    if write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        failed = [r for r in results if not r["ok"]]
        (RESULTS_DIR / "static.json").write_text(json.dumps(
            {"rows": rows, "failures": failed, "specializations": len(specs)}, indent=1) + "\n")
    return rows, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    a = p.parse_args(argv)
    rows, results = run()
    table = format_table(rows, COLUMNS)
    print(table)
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['spec']['kernel']} sm_{r['arch']}: {r['error']}")
    if a.markdown:
        a.markdown.write_text(table + "\n")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
