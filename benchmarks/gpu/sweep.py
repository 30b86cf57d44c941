"""The sweep: every GPU tuning row of each kernel with candidates, timed at the report's
workloads; the fastest row per device and workload key is that key's winner.

    python -m benchmarks.gpu.sweep --out DIR [--device cuda] [--budget 160] [--only TEXT ...]
    TRITON_INTERPRET=1 python -m benchmarks.gpu.sweep --out DIR --dry-run --device cpu
    python -m benchmarks.gpu.sweep --apply DIR/sweep.json [--winners kernels/tuned.json]

Each workload (the benchmarks' shapes: ``bench_roi_align``'s P2 level, the multi-level
training cases, the mask losses at N in {128, 512}, NMS at 1k-100k boxes, paste of 100
masks) runs once with the launchers' own rules to learn which workload keys its launches
pass (``kernels._launch.watched_tuning``) and what they compute. Then, for each key of a
kernel with candidates, every GPU row of that kernel's table in turn is forced for that
key alone (``forced_tuning_row``): its launch is checked in the launch record, its result
against the rules' result, and on a GPU it is timed (``triton.testing.do_bench``, median
and 20/80 quantiles) with the rest of the call. A row that fails, mismatches or never
launches is recorded as such and never wins. A key's winner is the row with the least
time summed over the workloads that pass that key, where it beats the launcher's own row
by more than ``MARGIN`` (else the own row: noise does not move the table).

``DIR/sweep.json`` holds every row's outcome per workload, the winners and the
environment (device name, torch/triton versions, git sha); it is rewritten after each
workload, so a run cut short keeps what it measured. Workloads take turns op by op and
none starts past ``--budget`` seconds. ``--dry-run`` runs the same plan at tiny sizes on
Triton's CPU interpreter: every row launched and compared, nothing timed, no winner.
``--apply`` merges a GPU run's winners into the committed winners file under the run's
device name and prints what changed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

import kernels
from benchmarks import (bench_mask_loss, bench_multiscale_roi_align, bench_nms,
                        bench_paste_masks_in_image, bench_roi_align)
from benchmarks._common import DTYPES, IMAGE, environment
from kernels import _launch
from kernels._utils import INTERPRET

RESULT_NAME = "sweep.json"
BUDGET_S = 160.0   # the kit caps the step near 200 s: start-up and the last workload fit
DRY_RUN_BUDGET_S = 150.0
# A row other than the launcher's own wins only when faster by more than this fraction.
MARGIN = 0.03
# do_bench's warm-up and measuring time per row (ms): a workload's rows in well under a
# second each, so the report's workloads fit the budget
WARMUP_MS, REP_MS = 10, 40
# Rows add in another order than the rules' rows (atomics, per-block partial sums): the
# tests' tolerances (tests/conftest.py), float32's loosened tenfold, on values scaled by
# the largest expected magnitude.
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
       torch.float64: 1e-7}


@dataclass(frozen=True)
class Workload:
    name: str
    # (device, tiny) -> a call of the op; each call returns the tensors to compare
    build: Callable[[str, bool], Callable[[], Any]]
    # what the tiny build depends on: the dry run runs one workload per value (the sizes
    # that tell the others apart are tiny sizes there)
    tiny: tuple = ()


def _grads(out: torch.Tensor, inputs, grad: torch.Tensor | None = None):
    """A backward-only call: the gradients of ``out`` (kept alive) for ``inputs``."""
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


# Tiny (the interpreter pays about 60 ms a RoI Align program): 3x3 outputs with one sample
# per bin stand in for both heads' 7x7 and 14x14, a few classes for 91
_TINY_SIZE = {7: 3, 14: 3}
_TINY_CLASSES = {91: 5}


def _roi_align(dtype, layout, size, backward, device, tiny):
    x, rois = bench_roi_align.make_inputs(
        4, DTYPES[dtype], device, 1 if tiny else 512, channels=8 if tiny else 256,
        channels_last=layout == "channels_last", image=(64, 96) if tiny else IMAGE)
    args = (_TINY_SIZE[size], 0.25, 1, False) if tiny else (size, 0.25, 2, False)
    if not backward:
        return lambda: kernels.roi_align(x, rois, *args)
    x.requires_grad_()
    out = kernels.roi_align(x, rois, *args)
    return _grads(out, x, torch.randn_like(out))


def _multiscale(case, dtype, layout, backward, device, tiny):
    images, per_image, size, _ = bench_multiscale_roi_align.CASES[case]
    if tiny:
        images, per_image, size = 1, 3, _TINY_SIZE[size]
    x, boxes, shapes = bench_multiscale_roi_align.make_inputs(
        images, per_image, DTYPES[dtype], device, 8 if tiny else 256,
        channels_last=layout == "channels_last", image=(128, 192) if tiny else IMAGE)
    pooler = kernels.MultiScaleRoIAlign(bench_multiscale_roi_align.NAMES, size,
                                        1 if tiny else 2)
    if not backward:
        return lambda: pooler(x, boxes, shapes)
    for t in x.values():
        t.requires_grad_()
    out = pooler(x, boxes, shapes)
    return _grads(out, list(x.values()), torch.randn_like(out))


def _loss_inputs(n, k, dtype, device, tiny):
    logits, targets, labels, inst = bench_mask_loss.make_instances(
        4 if tiny else n, _TINY_CLASSES.get(k, k) if tiny else k, DTYPES[dtype], device,
        image=(48, 64) if tiny else IMAGE)
    return logits.requires_grad_(), targets, labels, inst


def _mask_loss(n, k, dtype, backward, device, tiny):
    x, targets, labels, _ = _loss_inputs(n, k, dtype, device, tiny)
    if not backward:   # the training forward: it writes the gradient too
        return lambda: kernels.mask_loss(x, targets, labels)
    return _grads(kernels.mask_loss(x, targets, labels), x)


def _maskrcnn_loss(n, dtype, device, tiny):
    x, _, _, inst = _loss_inputs(n, 91, dtype, device, tiny)
    return lambda: kernels.maskrcnn_loss(x, *inst)


def _predictor_backward(n, dtype, device, tiny):
    _, targets, labels, _ = _loss_inputs(n, 91, dtype, device, tiny)
    g = torch.Generator().manual_seed(1)
    k, channels, m = _TINY_CLASSES[91] if tiny else 91, 8 if tiny else 256, bench_mask_loss.M
    feats = torch.randn(targets.shape[0], channels, m, m, generator=g)
    weight = torch.randn(k, channels, 1, 1, generator=g) / 16
    params = [t.to(device, DTYPES[dtype]).requires_grad_()
              for t in (feats, weight, torch.zeros(k))]
    return _grads(kernels.mask_predictor_loss(*params, targets, labels), params)


def _nms(op, classes, n, device, tiny):
    boxes, scores, idxs = bench_nms.make_inputs(
        120 if tiny else n, min(classes, 5) if tiny else classes, torch.float32, device)
    if op == "nms":
        return lambda: kernels.nms(boxes, scores, bench_nms.THRESHOLD)
    return lambda: kernels.batched_nms(boxes, scores, idxs, bench_nms.THRESHOLD)


def _paste(mode, dtype, device, tiny):
    image = (20, 40) if tiny else IMAGE
    masks, boxes = bench_paste_masks_in_image.make_inputs(
        2 if tiny else bench_paste_masks_in_image.MASKS, image, DTYPES[dtype], device)
    threshold = bench_paste_masks_in_image.THRESHOLD if mode == "threshold" else None
    return lambda: kernels.paste_masks_in_image(masks, boxes, image, 1, threshold=threshold)


def _direction(backward: bool) -> str:
    return "backward" if backward else "forward"


def workloads() -> list[Workload]:
    """The report's workloads (or a representative subset), op by op in turn: where the
    budget runs out, every op has had its first ones."""
    dtypes, layouts = ("float32", "bfloat16"), ("NCHW", "channels_last")
    both = (False, True)
    product = itertools.product
    per_op = [
        [Workload(f"roi_align {_direction(b)} {d} {lay} {s}x{s}",
                  partial(_roi_align, d, lay, s, b), (d, lay, b))
         for d, lay, b, s in product(dtypes, layouts, both, (7, 14))],
        [Workload(f"multiscale_roi_align {c} {_direction(b)} {d} {lay}",
                  partial(_multiscale, c, d, lay, b), (d, lay, b))
         for d, lay, c, b in product(dtypes, layouts, ("train box", "train mask"), both)],
        [Workload(f"mask_loss forward N={n} {d}", partial(_mask_loss, n, 91, d, False), (d,))
         for d, n in product(dtypes, (128, 512))]
        + [Workload(f"mask_loss backward N={n} K={k} {d}", partial(_mask_loss, n, k, d, True),
                    (d, k)) for d, n, k in product(dtypes, (128, 512), (2, 91))],
        [Workload(f"maskrcnn_loss forward N={n} {d}", partial(_maskrcnn_loss, n, d), (d,))
         for d, n in product(dtypes, (128, 512))],
        [Workload(f"{op} classes={c} boxes={n}", partial(_nms, op, c, n), (op, min(c, 5)))
         for n, (op, c) in product(bench_nms.SIZES, bench_nms.CASES)],
        [Workload(f"paste_masks_in_image {mode} {d}", partial(_paste, mode, d), (mode, d))
         for d, mode in product(dtypes, ("float", "threshold"))],
        [Workload(f"mask_predictor_loss backward N={n} {d}", partial(_predictor_backward, n, d),
                  (d,)) for d, n in product(dtypes, (128, 512))],
    ]
    return [w for w in itertools.chain(*itertools.zip_longest(*per_op)) if w is not None]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


def mismatch(got, expected) -> str | None:
    """Why ``got`` differs from ``expected`` (the launcher's own rows' result), or None:
    integers and booleans exactly, floats within ``TOL`` after scaling both by the largest
    expected magnitude (loss gradients are of order 1 / (N * M * M))."""
    got, expected = _tensors(got), _tensors(expected)
    if len(got) != len(expected):
        return f"{len(got)} tensors, expected {len(expected)}"
    for g, e in zip(got, expected):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"got {g.dtype}{tuple(g.shape)}, expected {e.dtype}{tuple(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(g, e):
                return f"{int((g != e).sum())} of {e.numel()} elements differ"
            continue
        scale = e.detach().float().abs().max().clamp(min=1e-30) if e.numel() else 1.0
        try:
            torch.testing.assert_close(g.detach().float() / scale, e.detach().float() / scale,
                                       rtol=TOL[e.dtype], atol=TOL[e.dtype])
        except AssertionError as err:
            return " ".join(str(err).split())[:300]
    return None


@contextlib.contextmanager
def _launches():
    """The specializations launched inside the block (recorded; LAUNCHES keeps its own)."""
    saved = set(_launch.LAUNCHES)
    _launch.LAUNCHES.clear()
    seen: set = set()
    try:
        with _launch.record_launches():
            yield seen
    finally:
        seen.update(_launch.LAUNCHES)
        _launch.LAUNCHES.update(saved)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_row(step, expected, kid: str, key: tuple, row: dict, own: dict, device: str,
            timed: bool) -> dict:
    """One row forced for one (kernel, key): launched? same result? time (GPU)."""
    out = {"row": row, "own": row == own, "candidate": row in _launch.CANDIDATE_ROWS[kid],
           "status": None, "error": None, "ms": None, "ms_p20": None, "ms_p80": None}
    try:
        with _launch.forced_tuning_row(row, kid, key):
            with _launches() as seen:
                got = step()
                _sync(device)
            if not any(s.kernel == kid and dict(s.tunables) == row for s in seen):
                out["status"] = "not launched"
                return out
            why = mismatch(got, expected)
            if why is not None:
                out.update(status="mismatch", error=why)
                return out
            del got
            if timed:
                import triton.testing
                out["ms"], out["ms_p20"], out["ms_p80"] = triton.testing.do_bench(
                    step, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5, 0.2, 0.8])
        out["status"] = "ok"
    except Exception as e:   # recorded per row: one failing row must not end the sweep
        out.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
    return out


def sweep_workload(w: Workload, device: str, tiny: bool, timed: bool) -> list[dict]:
    """Every GPU row of every (kernel with candidates, key) the workload's launches pass."""
    step = w.build(device, tiny)
    with _launch.watched_tuning() as picks:
        expected = step()
        _sync(device)
    keys: dict[tuple[str, tuple], dict] = {}
    for kid, key, own in picks:
        if key is not None and _launch.CANDIDATE_ROWS.get(kid):
            keys.setdefault((kid, key), own)
    entries = []
    for (kid, key), own in keys.items():
        rows = [run_row(step, expected, kid, key, row, own, device, timed)
                for row in _launch.gpu_rows(kid)]
        entries.append({"kernel": kid, "key": _launch.key_text(key), "own_row": own,
                        "rows": rows})
    return entries


def winners(results: list[dict]) -> list[dict]:
    """Per (kernel, key): the row with the least time summed over the workloads passing
    that key, among rows ok and timed in all of them; the launcher's own row unless
    another is faster by more than MARGIN. None where nothing was timed (a dry run)."""
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for w in results:
        for e in w.get("entries", []):
            groups.setdefault((e["kernel"], e["key"]), []).append((w["name"], e))
    out = []
    for (kid, key), entries in groups.items():
        totals: dict[str, float] = {}
        rows: dict[str, dict] = {}
        for _, e in entries:
            for r in e["rows"]:
                rows[json.dumps(r["row"], sort_keys=True)] = r["row"]
        for text in rows:
            times = [r["ms"] for _, e in entries for r in e["rows"]
                     if json.dumps(r["row"], sort_keys=True) == text and r["status"] == "ok"]
            if len(times) == len(entries) and all(t is not None for t in times):
                totals[text] = sum(times)
        own = entries[0][1]["own_row"]
        own_text = json.dumps(own, sort_keys=True)
        best = min(totals, key=totals.get) if totals else None
        if best is not None and own_text in totals and \
                totals[best] >= totals[own_text] * (1 - MARGIN):
            best = own_text
        out.append({"kernel": kid, "key": key, "own_row": own,
                    "row": rows[best] if best else None,
                    "changed": best is not None and best != own_text,
                    "speedup": (totals[own_text] / totals[best]
                                if best and own_text in totals else None),
                    "workloads": [name for name, _ in entries]})
    return out


def problems(results: list[dict]) -> list[str]:
    """Every row that failed, mismatched or never launched, and every workload that
    raised before its rows ran."""
    found = [f"{w['name']}: {w['error']}" for w in results if w.get("error")]
    for w in results:
        for e in w.get("entries", []):
            for r in e["rows"]:
                if r["status"] != "ok":
                    found.append(f"{w['name']} {e['kernel']} [{e['key']}] {r['row']}: "
                                 f"{r['status']} {r['error'] or ''}".rstrip())
    return found


def sweep(device: str, dry_run: bool, budget: float, only: list[str] | None = None,
          out: Path | None = None) -> dict:
    """Run the workloads (those whose name contains one of ``only``) until ``budget``
    seconds have passed; write the result to ``out`` after each workload."""
    t0 = time.perf_counter()
    report = {"sweep": "python -m benchmarks.gpu.sweep", "dry_run": dry_run,
              "environment": environment(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "budget_s": budget, "margin": MARGIN,
              "kernels": {kid: {"key_fields": list(_launch.KEY_FIELDS[kid]),
                                "rows": _launch.gpu_rows(kid),
                                "candidates": rows}
                          for kid, rows in sorted(_launch.CANDIDATE_ROWS.items()) if rows},
              "workloads": [], "winners": [], "problems": []}
    todo = [w for w in workloads() if not only or any(o in w.name for o in only)]
    tiny_runs: dict[tuple, str] = {}   # a tiny build -> the workload that ran it
    with _launch.winners_file(None):   # the launchers' own rules, whatever is committed
        for w in todo:
            same = tiny_runs.setdefault((w.build.func, w.tiny), w.name) if dry_run else w.name
            if same != w.name:
                report["workloads"].append({"name": w.name, "skipped": f"dry run: {same}"})
                continue
            if time.perf_counter() - t0 > budget:
                report["workloads"].append({"name": w.name, "skipped": "budget"})
                continue
            started = time.perf_counter()
            entry = {"name": w.name}
            try:
                entry["entries"] = sweep_workload(w, device, tiny=dry_run, timed=not dry_run)
            except Exception as e:   # the workload's own setup or rules' run
                entry["error"] = f"{type(e).__name__}: {e}"[:500]
            entry["seconds"] = time.perf_counter() - started
            report["workloads"].append(entry)
            _print_workload(entry)
            if device == "cuda":
                torch.cuda.empty_cache()
            report["winners"] = winners(report["workloads"])
            report["problems"] = problems(report["workloads"])
            report["seconds"] = time.perf_counter() - t0
            if out is not None:
                _write(out, report)
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        _write(out, report)
    return report


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _short(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items())


def _print_workload(entry: dict) -> None:
    print(f"{entry['name']}: {entry['seconds']:.1f} s" + (f"  ERROR {entry['error']}"
                                                          if "error" in entry else ""))
    for e in entry.get("entries", []):
        print(f"  {e['kernel'].split(':')[1]} [{e['key']}]")
        for r in e["rows"]:
            mark = "*" if r["own"] else "c" if r["candidate"] else " "
            ms = f"{r['ms']:.4f} ms" if r["ms"] is not None else "-"
            print(f"    {mark} {_short(r['row']):45s} {r['status']:12s} {ms}"
                  + (f"  {r['error']}" if r["error"] else ""))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# --apply: a GPU run's winners into the committed winners file

def key_fields() -> dict[str, list[str]]:
    """kernel id -> its workload key's field names, for every kernel with candidates."""
    return {kid: list(_launch.KEY_FIELDS[kid])
            for kid, rows in sorted(_launch.CANDIDATE_ROWS.items()) if rows}


def _block(items: list[tuple[str, str]], indent: int) -> list[str]:
    """``"name": value`` lines (values already JSON), commas between."""
    pad = " " * indent
    return [f"{pad}{json.dumps(k)}: {v}" + ("," if i < len(items) - 1 else "")
            for i, (k, v) in enumerate(items)]


def dump_winners(data: dict) -> str:
    """The winners file as JSON with one row a line (a change is a one-line diff)."""
    devices = []
    for name, entry in sorted(data["devices"].items()):
        keyed = [(kid, "{\n" + "\n".join(_block(
            [(k, json.dumps(row)) for k, row in sorted(rows.items())], 10)) + "\n        }")
                 for kid, rows in sorted(entry.get("kernels", {}).items())]
        body = _block([("source", json.dumps(entry.get("source", {}), sort_keys=True)),
                       ("kernels", "{\n" + "\n".join(_block(keyed, 8)) + "\n      }"
                        if keyed else "{}")], 6)
        devices.append((name, "{\n" + "\n".join(body) + "\n    }"))
    fields = [(kid, json.dumps(f)) for kid, f in sorted(data.get("key_fields", {}).items())]
    top = [("format", json.dumps(data["format"])), ("about", json.dumps(data.get("about", ""))),
           ("key_fields", "{\n" + "\n".join(_block(fields, 4)) + "\n  }" if fields else "{}"),
           ("devices", "{\n" + "\n".join(_block(devices, 4)) + "\n  }" if devices else "{}")]
    return "{\n" + "\n".join(_block(top, 2)) + "\n}\n"


def apply(results_path: Path, winners_path: Path = _launch.WINNERS_PATH) -> list[str]:
    """Merge ``results_path``'s winners into ``winners_path`` under its device name;
    returns the changes, one line each. A dry run's (untimed) results are refused."""
    results = json.loads(Path(results_path).read_text())
    device = results["environment"]["device"]
    if results.get("dry_run") or device.startswith("CPU"):
        raise ValueError(f"{results_path}: a dry run's results ({device}) carry no timings")
    data = (json.loads(winners_path.read_text()) if winners_path.exists() else
            {"format": _launch.WINNERS_FORMAT, "devices": {}})
    if data.get("format") != _launch.WINNERS_FORMAT:
        raise ValueError(f"{winners_path}: format {data.get('format')!r}, expected "
                         f"{_launch.WINNERS_FORMAT}")
    entry = data["devices"].setdefault(device, {"source": {}, "kernels": {}})
    changes = []
    for w in results["winners"]:
        kid, key, row = w["kernel"], w["key"], w["row"]
        if row is None:
            continue
        if kid not in _launch.TUNING_TABLES or row not in _launch.gpu_rows(kid):
            raise ValueError(f"{results_path}: {kid} [{key}]: {row} is not a GPU row of "
                             "its tuning table (results older than the tables?)")
        _launch.parse_key(key)
        keyed = entry["kernels"].setdefault(kid, {})
        if keyed.get(key) != row:
            was = (_short(keyed[key]) if key in keyed
                   else f"launcher's rule ({_short(w['own_row'])})")
            changes.append(f"{device} {kid.split(':')[1]} [{key}]: {was} -> {_short(row)}")
            keyed[key] = row
    env = results["environment"]
    entry["source"] = {"git_sha": env.get("git_sha"), "torch": env.get("torch"),
                       "triton": env.get("triton"), "date": results.get("date")}
    data["key_fields"] = {**data.get("key_fields", {}), **key_fields()}
    winners_path.write_text(dump_winners(data))
    return changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for sweep.json")
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes, no timing (on the CPU: TRITON_INTERPRET=1)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds after which no workload starts (default {BUDGET_S:.0f}, "
                        f"{DRY_RUN_BUDGET_S:.0f} with --dry-run)")
    p.add_argument("--only", action="append", default=None,
                   help="only workloads whose name contains this (repeatable)")
    p.add_argument("--apply", type=Path, metavar="RESULTS",
                   help="merge a GPU run's sweep.json into the winners file")
    p.add_argument("--winners", type=Path, default=_launch.WINNERS_PATH,
                   help="the winners file --apply writes (default kernels/tuned.json)")
    a = p.parse_args(argv)
    if a.apply:
        changes = apply(a.apply, a.winners)
        print("\n".join(changes) if changes else "no change")
        print(f"{len(changes)} winner(s) changed in {a.winners}")
        return 0
    if a.out is None:
        p.error("--out is required (or --apply RESULTS)")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not INTERPRET:
        p.error("on the CPU the kernels run only on Triton's interpreter: "
                "set TRITON_INTERPRET=1 (and use --dry-run)")
    if device == "cpu" and not a.dry_run:
        p.error("the CPU only rehearses the sweep: add --dry-run")
    a.out.mkdir(parents=True, exist_ok=True)
    budget = a.budget if a.budget is not None else DRY_RUN_BUDGET_S if a.dry_run else BUDGET_S
    report = sweep(device, a.dry_run, budget, a.only, a.out / RESULT_NAME)
    ran = [w for w in report["workloads"] if "entries" in w]
    changed = [w for w in report["winners"] if w["changed"]]
    print(f"{len(ran)} of {len(report['workloads'])} workloads in {report['seconds']:.0f} s; "
          f"{len(report['winners'])} keys, {len(changed)} with a winner other than the "
          f"launcher's rule; {len(report['problems'])} problem(s); {a.out / RESULT_NAME}")
    for line in report["problems"]:
        print(f"PROBLEM {line}")
    return 1 if report["problems"] or not ran else 0


if __name__ == "__main__":
    raise SystemExit(main())
