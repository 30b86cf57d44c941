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
from kernels._launch import OCCUPANCY_TARGET
from kernels._utils import cdiv


# Constexprs that select a different program within one kernel (RoI Align's forward and
# backward): each value gets rows of its own, named in the tuning column.
SPLIT_BY = ("BACKWARD",)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (kernel, tuning row, arch) — and ``SPLIT_BY`` value: the worst case over
    dtypes and the other flags."""
    notes = _aot.occupancy_notes()
    groups = defaultdict(list)
    for r in results:
        if not r["ok"]:
            continue
        spec = r["spec"]
        constexprs = dict(spec["constexprs"])
        tuning = " ".join([f"{k}={constexprs[k]}" for k in SPLIT_BY if k in constexprs]
                          + [f"{k}={v}" for k, v in spec["tunables"]])
        groups[(spec["kernel"], tuning, bool(spec.get("interpreter_only")), r["arch"])].append(r)
    rows = []
    for (kernel, tuning, interpreter_only, arch), rs in sorted(groups.items()):
        occupancy = min(r["occupancy_sm90"] for r in rs) if arch == 90 else None
        rows.append({
            "kernel": kernel.split(":")[1], "tuning": tuning, "arch": f"sm_{arch}",
            "runs_on": "interpreter" if interpreter_only else "GPU", "variants": len(rs),
            # Triton's launch path pays per runtime argument (constexprs, ints equal to 1
            # and None are not passed): the most any variant of this row takes
            "runtime_args": max(len(r["spec"]["signature"]) for r in rs),
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


COLUMNS = ["kernel", "tuning", "arch", "runs_on", "variants", "runtime_args", "registers",
           "spill_bytes", "shared_bytes", "num_warps", "occupancy_sm90", "atomics", "fences"]


LANE_COLUMNS = ["kernel", "runs_on", "layout", "access", "tile", "lanes", "along", "needed",
                "verdict"]


def lane_summary(results: list[dict]) -> list[dict]:
    """Where warps' lanes run in each hot-loop 2-D access (sm_90 TTGIR), one row per
    distinct (kernel, layout, access, tile, lanes): ``along`` lanes x elements per thread
    on the tensor's stride-1 tile axis, ``needed`` what the tile allows there (<= 32)."""
    seen, out = set(), []
    for r in _aot.lane_rows(results):
        key = tuple(r[k] for k in ("kernel", "runs_on", "layout", "access", "tile", "lanes"))
        if key in seen:
            continue
        seen.add(key)
        verdict = "ok" if r["ok"] else (f"known: {r['note']}" if r["note"] else "WRONG AXIS")
        out.append({k: r[k] for k in LANE_COLUMNS[:-1]} | {"verdict": verdict})
    return sorted(out, key=lambda r: tuple(str(r[k]) for k in LANE_COLUMNS))


NMS_COLUMNS = ["op", "boxes", "classes", "segments", "band_words", "fly_words",
               "serial_steps", "greedy_row", "mask_MB"]
# Serial greedy steps the NMS model allows at one class (a regression fails the check):
# the 128-word steps give 11,885 at 100k boxes and 865 at 20k (16-word steps: 77k, 5.6k).
NMS_SERIAL_CEILING = {100_000: 12_500, 20_000: 950}


def nms_work_model(segment_sizes: list[int], segmented: bool = True,
               longest_known: bool = True) -> dict:
    """Step counts of NMS's Triton path for segments of these sizes (in sorted order), from
    the band and tuning rules its launcher uses (``kernels.ops.nms``): ``band_words`` the
    mask kernel computes (one per row), ``fly_words`` the greedy pass computes on the fly
    (64 rows x 64 columns of IoU each; an upper bound: every 64-box block assumed to keep a
    box), ``serial_steps`` of the longest-running greedy program of each launch, added
    (per 64-box block: the fixed point, its band steps and its on-the-fly words)."""
    from kernels.ops import nms
    n = sum(segment_sizes)
    longest = max(segment_sizes) if longest_known else None
    wcap = nms._band_words(n, longest if segmented else n)
    band = fly = serial = 0
    rows_used = set()
    for row, programs, which in nms._greedy_plan(n, segmented, interpreter=False):
        width, long_min = cdiv(n, programs), cdiv(n, nms._WIDE_SEGMENTS)
        per_program = [0] * programs
        lo = 0
        for size in segment_sizes:
            hi = lo + size
            if which == 0 or (size >= long_min) == (which == 1):
                first, nb = lo // 64, (hi - 1) // 64 - lo // 64 + 1
                steps = 0
                for bb in range(nb):
                    band_end = min(nb - bb, wcap)
                    past = nb - bb - band_end
                    rows = min(hi, (first + bb + 1) * 64) - max(lo, (first + bb) * 64)
                    band += band_end * rows
                    fly += past
                    steps += 1 + cdiv(band_end - 1, row["BLOCK_T"]) + past
                per_program[lo // width] += steps
                rows_used.add(row["BLOCK_T"])
            lo = hi
        serial += max(per_program)    # the launches run one after the other
    return {"boxes": n, "segments": len(segment_sizes), "band_words": band,
            "fly_words": fly, "serial_steps": serial, "mask_MB": n * wcap * 8 / 1e6,
            "greedy_row": "+".join(f"BLOCK_T={t}" for t in sorted(rows_used, reverse=True))}


def nms_work() -> list[dict]:
    """The NMS step-count model (:func:`nms_work_model`) on the benchmark's own boxes:
    1k-100k boxes in 1, 5 and 80 classes, for batched_nms (and nms: one class) and for
    batched_nms_mask, whose band has no sync to size it."""
    import torch

    from benchmarks.bench_nms import make_inputs
    rows = []
    for n in (1000, 5000, 20000, 100_000):
        for classes in (1, 5, 80):
            _, _, idxs = make_inputs(n, classes, torch.float32, "cpu")
            sizes = [int(c) for c in torch.bincount(idxs) if c]
            for op, known in (("batched_nms", True), ("batched_nms_mask", False)):
                rows.append({"op": op, "classes": classes}
                            | nms_work_model(sizes, longest_known=known))
    return rows


def nms_problems(rows: list[dict]) -> list[str]:
    """On-the-fly words where the op sized its band (nms, batched_nms), or their serial
    steps past the ceiling. batched_nms_mask (no sync, so a budgeted band) is reported,
    not checked: its long classes do compute words on the fly."""
    out = [f"nms: {r['fly_words']} on-the-fly words in batched_nms at {r['boxes']} boxes, "
           f"{r['classes']} classes" for r in rows if r["op"] == "batched_nms" and r["fly_words"]]
    out += [f"nms: {r['serial_steps']} serial greedy steps at {r['boxes']} boxes in one class "
            f"(ceiling {NMS_SERIAL_CEILING[r['boxes']]})" for r in rows
            if r["op"] == "batched_nms" and r["classes"] == 1
            and r["boxes"] in NMS_SERIAL_CEILING
            and r["serial_steps"] > NMS_SERIAL_CEILING[r["boxes"]]]
    return out


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
            {"rows": rows, "lanes": lane_summary(results), "nms_work": nms_work(),
             "failures": failed, "specializations": len(specs)}, indent=1) + "\n")
    return rows, results


def markdown(rows: list[dict], failures: list[dict], lanes: list[dict] | None = None,
             nms_rows: list[dict] | None = None) -> str:
    """The table, the notes on rows below the occupancy target, the lane table, the NMS
    step counts, and any compile failure."""
    out = format_table(rows, COLUMNS)
    notes = notes_text(rows)
    if notes:
        out += "\n\n" + notes
    if lanes:
        out += ("\n\nWarp lanes along the stride-1 dimension (hot-loop 2-D accesses, sm_90 "
                "TTGIR):\n\n" + format_table(lanes, LANE_COLUMNS))
    if nms_rows:
        out += ("\n\nNMS work at the benchmark's shapes (nms_work_model; nms is batched_nms "
                "with one class):\n\n" + format_table(nms_rows, NMS_COLUMNS))
    for r in failures:
        out += f"\n\nFAILED {r['spec']['kernel']} sm_{r['arch']}: {r['error']}"
    return out


def report_section(sampled: bool = False, results: list[dict] | None = None) -> dict:
    """The benchmark report's static section: rows and failures, or why it was skipped.
    ``sampled``: one specialization per kernel and tuning row (the --tiny report's);
    ``results``: compile results already at hand (the compile check's), summarized as
    they are."""
    if results is None:
        reason = _aot.can_compile_without_gpu()
        if reason:
            return {"skipped": reason}
        specs = sample(_aot.record_in_subprocess()) if sampled else None
        _, results = run(write=False, specs=specs)
    return {"rows": summarize(results), "failures": [r for r in results if not r["ok"]],
            "sampled": sampled}


def problems(rows: list[dict], results: list[dict]) -> list[str]:
    """What fails the compile check: compile errors, spills on sm_90, rows a GPU runs below
    the occupancy target with no stated reason, fenced atomics, hot-loop accesses whose
    lanes miss the stride-1 dimension with no stated reason."""
    out = [f"compile failed: {r['spec']['kernel']} sm_{r['arch']}" for r in results
           if not r["ok"]]
    out += [f"spills: {r['kernel']} ({r['tuning']}) {r['spill_bytes']} bytes" for r in rows
            if r["arch"] == "sm_90" and r["spill_bytes"]]
    out += [f"occupancy: {r['kernel']} ({r['tuning']}) {r['occupancy_sm90']}" for r in rows
            if r["note"] == _aot.UNJUSTIFIED]
    out += [f"fenced atomics: {r['kernel']} ({r['tuning']}) {r['fences']} MEMBAR" for r in rows
            if r["fences"]]
    out += [f"lanes: {r['kernel']} [{r['spec']}] {r['layout']} {r['access']}: {r['along']} "
            f"of {r['needed']} along the stride-1 axis ({r['note'] or 'no rule'})"
            for r in _aot.lane_rows(results) if not r["ok"] and not r["note"]]
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
    nms_rows = nms_work()
    table = markdown(rows, failed, lane_summary(results), nms_rows)
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.report:
        from benchmarks.__main__ import write_report
        report = json.loads(a.report.read_text())
        report["static"] = {"rows": rows, "failures": failed}
        write_report(report, a.report.parent, plots=False)
        print(f"added to {a.report} and its Markdown")
    found = problems(rows, results) + nms_problems(nms_rows)
    for line in found:
        print(line)
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
