"""GPU kit step 4: the kernels launched on real data, for a memory checker.

    python -m benchmarks.gpu.launch_all --memcheck --json PATH --budget S [--sanitizer EXE]
    python -m benchmarks.gpu.launch_all --kernel ID --json PATH      # one kernel's call
    python -m benchmarks.gpu.launch_all --every-row --json PATH      # all of them, every row

``--memcheck`` is the kit's memory check. One specialization per kernel — the float32,
NCHW call in ``CALLS`` (forward and backward where one kernel does both; RoI Align also
over four levels) — each kernel in a process of its own under ``compute-sanitizer --tool
memcheck --kernel-name kns=<kernel>`` (only that kernel instrumented), with its own share of
``--budget`` seconds: what is left divided by the kernels not yet started (``--jobs`` at a
time), so a kernel that ends early leaves its time to the others and one that hangs is cut
at its share without taking the rest with it. One plain process first launches every call
once, so Triton's cache holds each kernel before the sanitizer runs (compiling under the
sanitizer outran the step on the first H200 run: one process over every specialization and
every tuning row was cut at 175 s with no output). Writes per kernel: ``passed``,
``errors`` (compute-sanitizer's error count), ``failed`` (it crashed), ``timed-out`` or
``skipped`` (no time left, or the sanitizer refused the device), with its log's last lines;
the specializations launched (expanded over each kernel's tuning table); and exits with 1
unless every kernel passed. Without ``--sanitizer`` each kernel's process runs plainly (the
kit's dry run, on Triton's CPU interpreter; or a GPU machine without the tool, where only
the plain pass runs).

``--every-row`` launches every specialization the ops use once per tuning-row index under
``kernels._launch.forced_tuning_row`` (each module's ``_compile_examples``) and checks
that every GPU row of every kernel ran: a recording for the static report, too slow to run
under the sanitizer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

import kernels
from kernels import _aot, _launch
from kernels._utils import deterministic_algorithms


# ---------------------------------------------------------------------------------------
# One call per kernel: tiny float32 inputs, NCHW

def _roi_align(device: str) -> None:
    x = torch.randn(2, 8, 12, 16, device=device, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 7.0], [1, 0.0, 2.0, 12.5, 10.0],
                         [0, -3.0, -2.0, 20.0, 15.0]], device=device)   # one past the map
    kernels.roi_align(x, rois, 3, 0.5, 2).sum().backward()
    # the multi-level launch: four maps of a 128x192 image, boxes 16 to 400 px (P2-P5)
    feats = OrderedDict((str(i), torch.randn(1, 8, 32 >> i, 48 >> i, device=device,
                                             requires_grad=True)) for i in range(4))
    boxes = torch.tensor([[2.0, 3.0, 18.0, 19.0], [10.0, 10.0, 122.0, 100.0],
                          [0.0, 0.0, 190.0, 127.0], [-50.0, -60.0, 350.0, 300.0]],
                         device=device)
    pooler = kernels.MultiScaleRoIAlign(list(feats), 2, 2)
    pooler(feats, [boxes], [(128, 192)]).sum().backward()


def _roi_align_deterministic(device: str) -> None:
    x = torch.randn(2, 8, 12, 16, device=device, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 7.0], [1, 0.0, 2.0, 12.5, 10.0]], device=device)
    with deterministic_algorithms():
        kernels.roi_align(x, rois, 3, 0.5, 2).sum().backward()


def _nms(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(70, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(70, 2, generator=g) * 30], 1).to(device)
    scores = torch.rand(70, generator=g).to(device)
    idxs = torch.randint(0, 3, (70,), generator=g).to(device)
    kernels.batched_nms(boxes, scores, idxs, 0.5)


def _loss_inputs(channels: int, device: str):
    from kernels.ops.mask_loss import loss_examples
    return next(loss_examples(channels, device))   # float32, NCHW, float targets


def _mask_loss(device: str) -> None:
    logits, targets, _, (labels, _, _) = _loss_inputs(3, device)
    kernels.mask_loss(logits, targets, labels).backward()


def _maskrcnn_loss(device: str) -> None:
    logits, _, gt, (labels, boxes, matched) = _loss_inputs(3, device)
    kernels.maskrcnn_loss(logits, boxes, [gt], [labels], matched).backward()


def _mask_predictor_loss(device: str) -> None:
    features, targets, _, (labels, _, _) = _loss_inputs(5, device)
    weight = torch.randn(3, 5, 1, 1, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    kernels.mask_predictor_loss(features, weight, bias, targets, labels).backward()


def _paste(device: str) -> None:
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.0], [-3.0, 4.0, 5.5, 12.0]], device=device)
    kernels.paste_masks_in_image(torch.rand(2, 1, 5, 5, device=device), boxes, (10, 12))


# kernel id -> the call that launches it (other kernels may run too; the sanitizer checks
# only this one in its process). tests/test_gpu_kit.py checks every kernel has one.
CALLS = {
    "kernels.ops.roi_align:_roi_align_kernel": _roi_align,
    "kernels.ops.roi_align:_roi_align_bwd_deterministic_kernel": _roi_align_deterministic,
    "kernels.ops.nms:_nms_prep_kernel": _nms,
    "kernels.ops.nms:_nms_mask_kernel": _nms,
    "kernels.ops.nms:_nms_greedy_kernel": _nms,
    "kernels.ops.mask_loss:_mask_loss_fwd_kernel": _mask_loss,
    "kernels.ops.mask_loss:_mask_loss_bwd_kernel": _mask_loss,
    "kernels.ops.mask_loss:_maskrcnn_loss_fwd_kernel": _maskrcnn_loss,
    "kernels.ops.mask_predictor_loss:_mask_predictor_loss_fwd_kernel": _mask_predictor_loss,
    "kernels.ops.mask_predictor_loss:_mask_predictor_loss_bwd_kernel": _mask_predictor_loss,
    "kernels.ops.paste_masks_in_image:_paste_masks_in_image_kernel": _paste,
}


def launch_kernels(device: str, kernel_ids: list[str]) -> dict:
    """Each kernel's call once (a call shared by several kernels once), recorded; a call
    that raises is reported and the others still run."""
    _launch.LAUNCHES.clear()
    done, errors = [], {}
    with _launch.record_launches():
        for kid in kernel_ids:
            if CALLS[kid] in done:
                continue
            done.append(CALLS[kid])
            try:
                CALLS[kid](device)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # a crash is this kernel's result, not the end
                errors[kid] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                print(f"{kid}: {errors[kid]}", flush=True)
    launched = [s.as_json() for s in _launch.LAUNCHES]
    seen = {d["kernel"] for d in launched}
    return {"device": device, "kernels": kernel_ids, "launches": len(launched),
            "missing": [k for k in kernel_ids if k not in seen], "errors": errors,
            "specs": _aot.expand(launched)}


# ---------------------------------------------------------------------------------------
# Every specialization x every tuning row

def launch_every_row(device: str, modules: list[str] | None = None) -> dict:
    _launch.LAUNCHES.clear()
    modules = modules or _aot.op_modules()
    expected = {k for k in _aot.launched_kernels() if k.split(":")[0] in modules}
    depth = max(len(_launch.gpu_rows(k)) for k in _launch.TUNING_TABLES)
    with _launch.record_launches():
        for index in range(depth):
            with _launch.forced_tuning_row(index):
                _aot.run_examples(device, modules)
    if device == "cuda":
        torch.cuda.synchronize()
    launched = [s.as_json() for s in _launch.LAUNCHES]
    rows_seen = {(d["kernel"], json.dumps(sorted(d["tunables"]))) for d in launched}
    missing = []
    for kernel in sorted(expected):
        for row in _launch.gpu_rows(kernel) if kernel in _launch.TUNING_TABLES else [None]:
            key = json.dumps(sorted([list(kv) for kv in row.items()])) if row else None
            if row is None or (kernel, key) not in rows_seen:
                missing.append(f"{kernel} {row or '(no tuning table)'}")
    return {"device": device, "modules": modules, "launches": len(launched),
            "kernels": len({d["kernel"] for d in launched}), "missing": missing,
            "specs": _aot.expand(launched)}


# ---------------------------------------------------------------------------------------
# The memory check: one process per kernel

# compute-sanitizer's words where it cannot check this device (seen on gVisor machines)
REFUSALS = ("Device not supported", "device is not supported", "Unable to find injection",
            "Target application terminated before first instrumented API call",
            "Could not attach", "not supported on this platform")
KILL_GRACE = 3.0
MIN_SHARE = 5.0     # seconds: below this a kernel's process is not started
TAIL_LINES = 40     # of a kernel's log, printed when it did not pass


def short_name(kid: str) -> str:
    return kid.split(":")[-1]


def sanitizer_argv(tool: str, kid: str) -> list[str]:
    return [tool, "--tool", "memcheck", "--kernel-name", f"kns={short_name(kid)}",
            "--error-exitcode", "3", "--print-limit", "20"]


def verdict(rc: int | None, log: str, result: dict | None, sanitized: bool) -> tuple[str, str]:
    """(status, detail) of one kernel's process from its exit code, log and JSON."""
    errors = None
    for line in log.splitlines():
        if "ERROR SUMMARY:" in line:
            try:
                errors = int(line.split("ERROR SUMMARY:")[1].split()[0])
            except (IndexError, ValueError):
                pass
    refused = next((r for r in REFUSALS if r in log), None) if sanitized else None
    if errors:
        return "errors", f"{errors} memory error(s)"
    if refused and not result:
        return "skipped", f"compute-sanitizer refused the device: {refused!r}"
    if rc != 0 or not result:
        return "failed", f"exit code {rc}" + ("" if result else ", no result written")
    if result.get("errors"):
        return "failed", "; ".join(result["errors"].values())
    if result.get("missing"):
        return "failed", f"never launched: {', '.join(result['missing'])}"
    return "passed", f"{result['launches']} specialization(s)" + (
        ", 0 memcheck errors" if sanitized else "")


class _Job:
    """One kernel's process, in a session of its own (the sanitizer and its target die
    together when it is cut)."""

    def __init__(self, kid: str, argv: list[str], env: dict, work: Path, cap: float):
        self.kid, self.cap = kid, cap
        name = short_name(kid)
        self.json_path = work / f"memcheck-{name}.json"
        self.log_path = work / f"memcheck-{name}.log"
        self.json_path.unlink(missing_ok=True)
        self.t0 = time.monotonic()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(argv + ["--json", str(self.json_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=KILL_GRACE)
                return
            except subprocess.TimeoutExpired:
                continue

    def outcome(self, timed_out: bool, sanitized: bool) -> tuple[dict, dict | None, str]:
        log = self.log_path.read_text(errors="replace")
        out = _read(self.json_path)
        if timed_out:
            status, detail = "timed-out", f"cut at its {self.cap:.0f} s share"
        else:
            status, detail = verdict(self.proc.returncode, log, out, sanitized)
        entry = {"status": status, "seconds": round(self.elapsed(), 1),
                 "cap_s": round(self.cap, 1), "detail": detail}
        return entry, out, log


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def memcheck(kernel_ids: list[str], device: str, budget: float, work: Path,
             sanitizer: str | None, jobs: int = 1, plain_pass: bool = True) -> dict:
    """Each kernel in its own process under ``sanitizer``, ``jobs`` at a time, each with its
    share of what is left of ``budget`` seconds, after a plain pass over every call in this
    process. Without a sanitizer: the plain pass alone, or with ``plain_pass=False`` (the
    dry run) each kernel's process run plainly. Cut from outside (SIGTERM: SystemExit), it
    ends its processes and returns what it has."""
    start = time.monotonic()
    result = {"device": device, "sanitizer": sanitizer, "budget_s": budget, "jobs": jobs,
              "kernels": {}}
    kernels_done = result["kernels"]
    if plain_pass:   # fills Triton's cache, and shows that every call runs at all
        plain = launch_kernels(device, kernel_ids)
        result["plain"] = {"seconds": round(time.monotonic() - start, 1),
                           "launches": plain["launches"], "missing": plain["missing"],
                           "errors": plain["errors"]}
        result["specs"] = plain["specs"]
        print(f"plain pass: {plain['launches']} specialization(s) of {len(kernel_ids)} "
              f"kernel(s) in {result['plain']['seconds']:.1f} s", flush=True)
        if not sanitizer:
            for kid in kernel_ids:
                status, detail = (("failed", plain["errors"][kid]) if kid in plain["errors"]
                                  else ("failed", "never launched") if kid in plain["missing"]
                                  else ("skipped", "launched without compute-sanitizer"))
                kernels_done[kid] = {"status": status, "seconds": 0.0, "detail": detail}
            result["seconds"] = round(time.monotonic() - start, 1)
            return result
    me = [sys.executable, "-m", "benchmarks.gpu.launch_all", "--device", device]
    env = dict(os.environ)
    if sanitizer:   # one cudaMalloc per tensor: the caching allocator would hide overruns
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    deadline = start + budget
    pending, running, specs = list(kernel_ids), [], []

    def finish(job: _Job, timed_out: bool) -> None:
        entry, out, log = job.outcome(timed_out, bool(sanitizer))
        kernels_done[job.kid] = entry
        specs.extend((out or {}).get("specs", []))
        print(f"{entry['status'].upper()} {job.kid} in {entry['seconds']:.1f} s "
              f"(share {job.cap:.0f} s): {entry['detail']}", flush=True)
        if entry["status"] != "passed":
            for line in log.splitlines()[-TAIL_LINES:]:
                print(f"    {line}", flush=True)

    try:
        while pending or running:
            while pending and len(running) < jobs:
                kid = pending.pop(0)
                # its share: what is left over the rounds of `jobs` kernels still to run
                rounds = math.ceil((len(pending) + 1 + len(running)) / jobs)
                cap = (deadline - time.monotonic()) / rounds
                if cap < MIN_SHARE:
                    kernels_done[kid] = {"status": "skipped", "seconds": 0.0,
                                         "detail": "no time left in the step"}
                    print(f"SKIPPED {kid}: no time left in the step", flush=True)
                    continue
                argv = me + ["--kernel", kid]
                running.append(_Job(kid, sanitizer_argv(sanitizer, kid) + argv
                                    if sanitizer else argv, env, work, cap))
            time.sleep(0.2)
            for job in list(running):
                ended = job.proc.poll() is not None
                if not ended and job.elapsed() <= job.cap:
                    continue
                if not ended:
                    job.kill()
                running.remove(job)
                finish(job, timed_out=not ended)
    except SystemExit:
        for job in running:
            job.kill()
            kernels_done[job.kid] = {"status": "timed-out", "seconds": round(job.elapsed(), 1),
                                     "cap_s": round(job.cap, 1),
                                     "detail": "cut with the step"}
        for kid in pending:
            kernels_done[kid] = {"status": "skipped", "seconds": 0.0,
                                 "detail": "the step was cut first"}
    result["kernels"] = {k: kernels_done[k] for k in kernel_ids if k in kernels_done}
    result.setdefault("specs", _aot.expand(specs))
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--memcheck", action="store_true",
                      help="one process per kernel (under --sanitizer when given)")
    mode.add_argument("--kernel", default=None, help="launch this kernel's call, e.g. "
                                                     "kernels.ops.nms:_nms_mask_kernel")
    mode.add_argument("--every-row", action="store_true",
                      help="every specialization once per tuning row")
    p.add_argument("--kernels", default=None,
                   help="--memcheck: comma-separated kernel ids (default: every kernel)")
    p.add_argument("--modules", default=None,
                   help="--every-row: comma-separated op modules (default: all)")
    p.add_argument("--sanitizer", default=None, help="--memcheck: compute-sanitizer's path")
    p.add_argument("--budget", type=float, default=300.0, help="--memcheck: seconds in all")
    p.add_argument("--jobs", type=int, default=1, help="--memcheck: kernels at a time")
    p.add_argument("--no-plain-pass", action="store_true",
                   help="--memcheck: no plain pass first; without --sanitizer, each kernel's "
                        "process runs plainly (the dry run)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    # SIGTERM (the kit cutting the step) unwinds, so memcheck() ends its children first
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.memcheck:
        ids = a.kernels.split(",") if a.kernels else list(CALLS)
        unknown = [k for k in ids if k not in CALLS]
        if unknown:
            p.error(f"--kernels: unknown kernel(s) {unknown}")
        result = memcheck(ids, a.device, a.budget, a.json.parent, a.sanitizer,
                          max(a.jobs, 1), plain_pass=not a.no_plain_pass)
        a.json.write_text(json.dumps(result))
        counts = {}
        for entry in result["kernels"].values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        print(f"memcheck of {len(ids)} kernel(s) in {result['seconds']:.0f} s: "
              + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        return 0 if counts.get("passed", 0) + counts.get("skipped", 0) == len(ids) else 1
    if a.kernel:
        if a.kernel not in CALLS:
            p.error(f"--kernel: unknown kernel {a.kernel!r} (known: {', '.join(CALLS)})")
        result = launch_kernels(a.device, [a.kernel])
        what = f"{a.kernel}'s call"
    else:
        result = launch_every_row(a.device, a.modules.split(",") if a.modules else None)
        what = "every kernel, every GPU tuning row"
    result["seconds"] = time.perf_counter() - t0
    a.json.write_text(json.dumps(result))
    print(f"launched {result['launches']} specialization(s) ({what}) on {a.device} in "
          f"{result['seconds']:.1f} s")
    for m in result["missing"]:
        print(f"never launched: {m}")
    return 1 if result["missing"] or result.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
