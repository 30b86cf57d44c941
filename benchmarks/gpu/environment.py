"""GPU kit step 1: what machine this is, and its measured copy bandwidth.

    python -m benchmarks.gpu.environment --json PATH [--device cuda]

Writes the GPU's name, compute capability, multiprocessors and memory, the driver,
torch / triton / torchvision / CUDA / Python / NumPy versions, which optional tools are
present (pycocotools, pytest-xdist, compute-sanitizer) and the device-to-device copy
bandwidth (bytes read + written per second: the ceiling the benchmark report's
"% of copy bandwidth" uses). Exits with 1 when the device asked for is not there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from benchmarks._common import copy_bandwidth_gbps, environment

SANITIZER_PLACES = ("/usr/local/cuda/bin/compute-sanitizer",
                    "/opt/nvidia/compute-sanitizer/compute-sanitizer")


def compute_sanitizer() -> str | None:
    """The compute-sanitizer executable: on PATH, or where CUDA installs it."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    return next((p for p in SANITIZER_PLACES if Path(p).is_file()), None)


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def describe(device: str) -> dict:
    info = environment(device)
    info.update(numpy=importlib.import_module("numpy").__version__,
                cuda_runtime=torch.version.cuda, platform=platform.platform(),
                pycocotools=importlib.util.find_spec("pycocotools") is not None,
                pytest_xdist=importlib.util.find_spec("xdist") is not None,
                compute_sanitizer=compute_sanitizer())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(driver=driver_version(), capability=f"sm_{props.major}{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        a.json.write_text(json.dumps({"error": "torch sees no CUDA device"}))
        print("error: torch sees no CUDA device")
        return 1
    info = describe(a.device)
    info["copy_bandwidth_GBps"] = copy_bandwidth_gbps(a.device)
    a.json.write_text(json.dumps(info, indent=1))
    for k, v in info.items():
        print(f"{k:20s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
