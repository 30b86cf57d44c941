"""Measurement and reporting shared by every benchmark.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, warm-up, median and 20/80
quantiles); on the CPU, wall-clock medians over repeats. Peak memory: the CUDA allocator's
high-water mark above what was allocated before the call (CPU: not measured, None).
Inside :func:`profiling` (``python -m benchmarks --profile``) every measured call is also
profiled: the device time of its kernels, its host time and its host syncs, apart
(:func:`read_profile`).
Results go to ``benchmarks/results/<device>.json``, one section per benchmark, with the
environment (device, torch/triton/torchvision versions, git sha).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from kernels._utils import last_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

IMAGE = (800, 1216)   # (height, width): a COCO image as Mask R-CNN's transform resizes it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Repeats per CPU timing (medians): on a shared 2-core machine 3 left +-10% between two
# identical kernels; CUDA timings are do_bench's.
CPU_REPS = 7


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def on_gpu(environment: dict) -> bool:
    """Whether a report's ``environment`` names a GPU (``device_name`` names a CPU "CPU ...")."""
    return not environment.get("device", "CPU").startswith("CPU")


def slug(name: str) -> str:
    """A device name as a file name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def device_slug(device: str) -> str:
    return slug(device_name(device))


def environment(device: str) -> dict:
    import torchvision
    import triton
    try:
        git = dict(capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        # a copied tree (a GPU machine's) can carry stale git metadata: say it differs
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                          **git).stdout.strip():
            sha += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {"device": device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "git_sha": sha,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}


def time_ms(fn: Callable[[], object], device: str, *, reps: int | None = None,
            warmup: int = 1) -> dict:
    """Median (and 20/80 quantiles) of ``fn``'s run time in milliseconds."""
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps or 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second): the
    ceiling the report's "% of copy bandwidth" is taken against."""
    n = nbytes // 4 // (16 if device == "cpu" else 1)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, reps=5)
    return 2 * src.numel() * 4 / (t["ms"] * 1e-3) / 1e9


def torchvision_as_autocast(device: str, dtype: torch.dtype, provider: str = "torchvision"):
    """Where torchvision's CUDA kernels refuse ``dtype`` (roi_align with bfloat16 maps and
    float32 boxes, nms on bfloat16), time it as torchvision runs under autocast: its
    autocast wrappers cast to float32 and back. Elsewhere, and for any other provider, a
    no-op context."""
    if provider == "torchvision" and device != "cpu" and dtype == torch.bfloat16:
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def ieee_float32():
    """float32 convolutions and matmuls in IEEE float32 while checking parity: cuDNN's
    default TF32 rounds a reference's inputs to 10 mantissa bits (about 1e-3 off), more than
    the float32 tolerance. Timings keep the defaults users run with."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def parity(check: Callable[[], object]) -> str:
    """Run a benchmark's check of ours against the baseline: "ok", or "MISMATCH: <why>".

    A mismatch is recorded in the rows it concerns (``row["parity"]``) and the benchmark
    goes on: one wrong op must not cost the rest of a GPU run's report.
    """
    try:
        check()
    except AssertionError as e:
        first = " ".join(str(e).split())
        return f"MISMATCH: {first[:300]}"
    return "ok"


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Extra memory ``fn`` allocates at its peak (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def measure(row: dict, provider: str, fn: Callable[[], object], device: str,
            nbytes: int | None, reps: int | None = None, warmup: int = 1) -> None:
    """Time ``fn`` and record, under ``<provider>_``: ms, 20/80 quantiles, peak bytes, GB/s;
    and the row's ``min_MB``: the bytes the op must move at least (outputs written, inputs
    read once), from which GB/s and the share of the copy bandwidth are taken (``nbytes``
    None: a whole model, no byte count). Inside :func:`profiling`, also the profile fields
    (:func:`record_profile`)."""
    last_path.clear()
    t = time_ms(fn, device, reps=reps, warmup=warmup)
    if provider == "ours":
        row["ours_path"] = ran_path()
    row[f"{provider}_ms"] = t["ms"]
    row[f"{provider}_ms_p20"] = t["ms_p20"]
    row[f"{provider}_ms_p80"] = t["ms_p80"]
    row[f"{provider}_peak_bytes"] = peak_memory_bytes(fn, device)
    if nbytes is not None:
        row["min_MB"] = nbytes / 1e6
        row[f"{provider}_GBps"] = gbps(nbytes, t["ms"])
    if _profiling:
        record_profile(row, provider, fn, device, t["ms"])


def ran_path() -> str:
    """The paths our ops ran since ``last_path`` was cleared: triton, torchvision (its C++
    CPU kernel) or reference (our PyTorch path), joined when a call ran several."""
    return "+".join(sorted(set(last_path.values()))) or "-"


# ---------------------------------------------------------------------------------------
# The profile step (python -m benchmarks --profile)

_profiling = False

# What a profile reads of one call, recorded as ``<provider>_<field>`` and, for the
# row's baseline, ``baseline_<field>`` too.
PROFILE_FIELDS = ("kernel_ms", "host_us", "syncs")
# Calls per reading: at most PROFILE_CALLS, fewer where they would pass PROFILE_BUDGET_MS
# (torchvision's deterministic RoI Align backward takes 75-350 ms a call on an H200), so
# a GPU report's profile costs a handful of calls per provider and row.
PROFILE_CALLS = 5
PROFILE_BUDGET_MS = 50.0
# torch.cuda._sleep's kernel: the pad that opens each profiler session (kernel_ms).
_PAD_KERNEL = "spin_kernel"
_sessions = 0


@contextlib.contextmanager
def profiling(enabled: bool = True) -> Iterator[None]:
    """Inside the block, :func:`measure` profiles every call it times: a switch, so a
    report without ``--profile`` pays nothing for it."""
    global _profiling
    outer, _profiling = _profiling, enabled
    try:
        yield
    finally:
        _profiling = outer


def record_profile(row: dict, provider: str, fn: Callable[[], object], device: str,
                   wall_ms: float) -> None:
    """Profile ``fn`` into ``row`` (:func:`read_profile`): ``<provider>_kernel_ms``,
    ``_host_us``, ``_syncs``. Every provider but ours is the row's baseline (each benchmark
    times ours against one), whose fields are also recorded as ``baseline_*``; a row whose
    baseline does not run keeps those None. ``kernel_speedup``: baseline kernel ms / ours,
    where both were read (None on the CPU).

    A profile that raises leaves the fields it did not read None and its error in
    ``profile_error``: a diagnostic must not cost the row its timings."""
    got = dict.fromkeys(PROFILE_FIELDS)
    try:
        read_profile(fn, device, wall_ms, got)
    except Exception as e:
        error = f"{provider}: {type(e).__name__}: {e}"[:500]
        row["profile_error"] = "; ".join(filter(None, [row.get("profile_error"), error]))
    for side in (provider,) if provider == "ours" else (provider, "baseline"):
        for name, value in got.items():
            row[f"{side}_{name}"] = value
    for name in PROFILE_FIELDS:
        row.setdefault(f"baseline_{name}", None)
    ours, base = row.get("ours_kernel_ms"), row["baseline_kernel_ms"]
    row["kernel_speedup"] = base / ours if ours and base else None


def read_profile(fn: Callable[[], object], device: str, wall_ms: float, into: dict) -> None:
    """Read one warm call of ``fn`` (timed already, ``wall_ms`` a call) into ``into``, in
    this order (a reading that raises leaves the earlier ones):

    * ``syncs``: its host syncs, one call counted by ``benchmarks.host.count_host_work``
      (on CUDA, what ``torch.cuda.set_sync_debug_mode("warn")`` reports; on the CPU, reads
      of tensor data by the host: the CPU path's own reads, such as its value checks,
      which its CUDA path does not make);
    * ``host_us``: the host time until the call returns. On CUDA, the median of single
      calls timed with no sync inside the loop (``benchmarks.host``'s reading: synchronized
      before and after the loop only), so a call that syncs includes its wait for the GPU;
      on the CPU, where everything is host time, the wall median just measured;
    * ``kernel_ms``: on CUDA, the device time of the work one call runs (:func:`kernel_ms`);
      on the CPU, None.

    At most PROFILE_CALLS calls per reading, fewer for a long call."""
    from benchmarks.host import _host_us, count_host_work   # benchmarks.host imports us
    cuda = device == "cuda"
    calls = max(1, min(PROFILE_CALLS, int(PROFILE_BUDGET_MS / max(wall_ms, 1e-3))))
    with count_host_work(cuda=cuda) as work:
        fn()
    into["syncs"] = len(work.syncs)
    into["host_us"] = _host_us(fn, calls, cuda) if cuda else wall_ms * 1e3
    if cuda:
        into["kernel_ms"] = kernel_ms(fn, calls)


def kernel_ms(fn: Callable[[], object], calls: int) -> float:
    """Device milliseconds of the CUDA work one call of ``fn`` runs: torch.profiler's CUDA
    events over ``calls`` calls, summed and divided by ``calls``. Counted: kernels,
    memsets and device-to-device copies (a fill or a clone by another API); not copies
    between host and device, transfers whose cost a call pays as a sync and in host time.
    Events on several streams are summed, not their span. The calls run back to back
    without do_bench's cache flush: inputs that fit the L2 cache are read warm.

    Each reading is a profiler session of its own (one left open would tax the wall
    timings between readings), opened by pad kernels: kineto drops the first kernel
    records of a session, more with each session in a process (pytorch/pytorch#192021).
    The pad takes the loss; a session that lost all of it may have lost the call's
    kernels too, and raises rather than read low."""
    global _sessions
    from torch.profiler import ProfilerActivity, profile
    _sessions += 1
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(16 + _sessions):
            torch.cuda._sleep(1)
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    work = [e for e in prof.profiler.kineto_results.events() if device_work(e)]
    if not any(_PAD_KERNEL in e.name() for e in work):
        raise RuntimeError("the profiler recorded none of its session's opening kernels "
                           "(no CUPTI, or pytorch/pytorch#192021): kernel time not read")
    return sum(e.duration_ns() for e in work if _PAD_KERNEL not in e.name()) / calls / 1e6


# kineto's activity types counted as device work (kernel_ms)
_DEVICE_WORK = frozenset({"kernel", "gpu_memset", "gpu_memcpy"})


def device_work(event) -> bool:
    """Whether a profiler event (``torch._C._autograd._KinetoEvent``) is device work that
    :func:`kernel_ms` counts: a kernel, a memset or a device-to-device copy on the GPU. A
    GPU user annotation spans kernels already counted; a host-device copy is a transfer.
    Torch versions whose events carry no activity type are read by device and name."""
    if event.device_type() != torch.autograd.DeviceType.CUDA:
        return False
    if hasattr(event, "activity_type"):
        if event.activity_type() not in _DEVICE_WORK:
            return False
    elif event.is_user_annotation():
        return False
    name = event.name()
    return not name.startswith("Memcpy") or name.startswith("Memcpy DtoD")


def write_results(section: str, rows: list[dict], config: dict, device: str,
                  path: Path | None = None) -> Path:
    """Merge ``rows`` under ``section`` into the device's results JSON; return its path."""
    path = path or RESULTS_DIR / f"{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data["environment"] = environment(device)
    data.setdefault("benchmarks", {})[section] = {"config": config, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``columns`` (floats with 3 significant digits)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cli(doc: str, run: Callable[..., list[dict]], columns: list[str], *,
        dtype: str | None = "float32,bfloat16", quick_help: str = "fewer shapes and repeats",
        channels_last: bool = False, layouts: tuple[str, ...] = (),
        shown: Callable[[dict], dict] = lambda r: r):
    """The ``main(argv)`` of a benchmark module: --quick, --dtype, --device (and
    --channels-last or --layout where the op takes layouts: ``run``'s ``channels_last`` or
    ``layouts``), then ``run`` and a table of ``columns``."""
    def main(argv=None):
        p = argparse.ArgumentParser(description=doc.splitlines()[0])
        p.add_argument("--quick", action="store_true", help=quick_help)
        p.add_argument("--dtype", default=dtype, help="comma-separated: float32,bfloat16,float16")
        p.add_argument("--device", default=None)
        if channels_last:
            p.add_argument("--channels-last", action="store_true")
        if layouts:
            p.add_argument("--layout", default=",".join(layouts),
                           help=f"comma-separated subset of {','.join(layouts)}")
        a = p.parse_args(argv)
        extra = {"channels_last": a.channels_last} if channels_last else {}
        if layouts:
            unknown = set(a.layout.split(",")) - set(layouts)
            if unknown:
                p.error(f"--layout: unknown layout(s) {sorted(unknown)}")
            extra["layouts"] = tuple(a.layout.split(","))
        rows = run(a.quick, a.dtype.split(",") if a.dtype else None, a.device, **extra)
        print(format_table([shown(r) for r in rows], columns))
    return main
