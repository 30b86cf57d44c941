"""Issue 18's GPU speed targets, read from a benchmark report: met, missed or not measured.

    python -m benchmarks.targets benchmarks/results/nvidia-h200.json

Each target names the report section and rows it concerns, the least speed-up over
torchvision every one of those rows must reach, and the row values that must all have been
measured (both dtypes and both layouts of RoI Align, every box count from 5k for nms, ...).
A target is *missed* when one of its rows is below the minimum or mismatches its baseline,
*not measured* when a required combination has no row, and *met* otherwise. The benchmark
report (on a GPU) and the GPU kit print the verdicts; they are the issue's GPU targets, so
a CPU report's verdicts say nothing about them.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TARGET_DTYPES = ("float32", "bfloat16")
LAYOUTS = ("NCHW", "channels_last")


@dataclass(frozen=True)
class Target:
    name: str                           # the target in the words
    section: str                        # the report section its rows are in
    minimum: float                      # the least speed-up each row must reach
    select: Callable[[dict], bool]      # which of the section's rows it concerns
    needed: dict = field(default_factory=dict)   # row key -> values that must all be measured


TARGETS = (
    Target("roi_align forward >= 1.5x, NCHW and channels_last, float32 and bfloat16",
           "roi_align", 1.5, lambda r: r.get("mode") == "forward",
           {"dtype": TARGET_DTYPES, "layout": LAYOUTS}),
    Target("roi_align forward+backward >= 2x, NCHW and channels_last, float32 and bfloat16",
           "roi_align", 2.0, lambda r: r.get("mode") == "forward+backward",
           {"dtype": TARGET_DTYPES, "layout": LAYOUTS}),
    Target("nms >= 1.5x from 5k boxes", "nms", 1.5,
           lambda r: r.get("op") == "nms" and r.get("boxes", 0) >= 5000,
           {"boxes": (5000, 20000, 100000)}),
    Target("batched_nms >= 3x at 20k boxes in 80 classes", "nms", 3.0,
           lambda r: r.get("op") == "batched_nms" and r.get("boxes") == 20000
           and r.get("classes") == 80, {"boxes": (20000,), "classes": (80,)}),
    # "never slower than torchvision for any class count": at every benchmarked size
    Target("batched_nms never slower, any class count (1, 5, 80) and size", "nms", 1.0,
           lambda r: r.get("op") == "batched_nms",
           {"classes": (1, 5, 80), "boxes": (1000, 5000, 20000, 100000)}),
)


def _label(row: dict, keys=("dtype", "layout", "level", "head", "op", "classes",
                            "boxes")) -> str:
    return " ".join(str(row[k]) for k in keys if k in row)


def evaluate(report: dict, targets=TARGETS) -> list[dict]:
    """One verdict per target: ``status`` (met, missed, not measured), ``rows`` (how many
    rows it read), ``worst`` (the least speed-up and its row), ``below`` (rows under the
    minimum), ``mismatches`` and ``missing`` (required combinations without a row)."""
    sections = report.get("benchmarks", {})
    verdicts = []
    for t in targets:
        section = sections.get(t.section, {})
        rows = [r for r in section.get("rows", []) if t.select(r)]
        timed = [r for r in rows if isinstance(r.get("speedup"), (int, float))]
        verdict = {"target": t.name, "minimum": t.minimum, "rows": len(timed)}
        if "error" in section:
            verdict["error"] = section["error"][:200]
        below = [f"{_label(r)}: {r['speedup']:.2f}x" for r in timed if r["speedup"] < t.minimum]
        mismatches = [_label(r) for r in rows if r.get("parity", "ok") != "ok"]
        missing = [dict(zip(t.needed, combo))
                   for combo in itertools.product(*t.needed.values())
                   if not any(all(r.get(k) == v for k, v in zip(t.needed, combo))
                              for r in timed)]
        if timed:
            worst = min(timed, key=lambda r: r["speedup"])
            verdict["worst"] = f"{worst['speedup']:.2f}x ({_label(worst)})"
        verdict.update(below=below, mismatches=mismatches, missing=missing)
        verdict["status"] = ("missed" if below or mismatches
                             else "not measured" if missing or not timed else "met")
        verdicts.append(verdict)
    return verdicts


def lines(verdicts: list[dict]) -> list[str]:
    """One line per target, then what missed it."""
    out = []
    for v in verdicts:
        worst = f"; worst {v['worst']}" if v.get("worst") else ""
        out.append(f"{v['status'].upper():12s} {v['target']} ({v['rows']} rows{worst})")
        if v["below"]:
            out.append(f"             below {v['minimum']:g}x: " + "; ".join(v["below"][:8])
                       + (f"; ... {len(v['below']) - 8} more" if len(v["below"]) > 8 else ""))
        if v["mismatches"]:
            out.append("             mismatching: " + "; ".join(v["mismatches"][:8]))
        if v["missing"]:
            out.append("             not measured: " + "; ".join(
                " ".join(f"{k}={val}" for k, val in m.items()) for m in v["missing"][:8]))
        if v.get("error"):
            out.append(f"             benchmark failed: {v['error']}")
    return out


def markdown(verdicts: list[dict]) -> str:
    rows = ["| target | status | rows | worst | below the minimum / not measured |",
            "|---|---|---|---|---|"]
    for v in verdicts:
        notes = v["below"] + [f"mismatch: {m}" for m in v["mismatches"]] + [
            "not measured: " + " ".join(f"{k}={val}" for k, val in m.items())
            for m in v["missing"]]
        shown = "; ".join(notes[:6]) + (f"; ... {len(notes) - 6} more" if len(notes) > 6 else "")
        rows.append(f"| {v['target']} | {v['status']} | {v['rows']} | {v.get('worst', '-')} "
                    f"| {shown or '-'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a benchmark report's JSON")
    a = p.parse_args(argv)
    report = json.loads(a.report.read_text())
    print(f"{report.get('environment', {}).get('device', '?')}: {a.report}")
    verdicts = evaluate(report)
    print("\n".join(lines(verdicts)))
    return 0 if all(v["status"] == "met" for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
