"""GPU kit step 4: launch every kernel specialization the ops use, once, for a memory checker.

    compute-sanitizer --tool memcheck python -m benchmarks.gpu.launch_all --json PATH
    python -m benchmarks.gpu.launch_all --json PATH --device cpu    # the dry run's stand-in

Runs each op module's ``_compile_examples(device)`` — the launches the GPU compile check
records — once per tuning-row index under ``kernels._launch.forced_tuning_row``, so every
row of every kernel's GPU tuning table is launched on real data, not only the row each
launcher would pick. Writes what was launched (the specializations, expanded over the tuning
tables in the compile check's format, so the static step can compile them without
recording again) and exits with 1 if a kernel or a GPU row was never launched.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kernels import _aot, _launch


def launch_all(device: str, modules: list[str] | None = None) -> dict:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modules", default=None,
                   help="comma-separated op modules (default: all, e.g. kernels.ops.nms)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    result = launch_all(a.device, a.modules.split(",") if a.modules else None)
    result["seconds"] = time.perf_counter() - t0
    a.json.write_text(json.dumps(result))
    print(f"launched {result['launches']} specializations of {result['kernels']} kernels "
          f"(every GPU tuning row) on {a.device} in {result['seconds']:.1f} s")
    for m in result["missing"]:
        print(f"never launched: {m}")
    return 1 if result["missing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
