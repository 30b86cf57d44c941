"""`python -m benchmarks --quick` on the CPU writes a complete JSON, Markdown and PNG report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from benchmarks.__main__ import OPS
from kernels import _aot


def test_report_writes_json_markdown_and_plots(tmp_path):
    # the CPU report times our PyTorch path against torchvision's C++ kernels: no interpreter.
    # --tiny: the smallest shapes and one specialization per kernel and tuning row in the
    # static section (the compile check compiles them all); the report's code is the same.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--dtype", "float32",
                    "--device", "cpu", "--out", str(tmp_path)], env=env, check=True,
                   capture_output=True, text=True, timeout=900)
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    env_info = data["environment"]
    for key in ("device", "torch", "triton", "torchvision", "git_sha"):
        assert env_info[key], key
    assert data["copy_bandwidth_GBps"] > 0
    assert set(data["benchmarks"]) == set(OPS)
    markdown = json_path.with_suffix(".md").read_text()
    for op, section in data["benchmarks"].items():
        rows = section["rows"]
        assert rows, op
        timed = [r for r in rows if isinstance(r.get("ours_ms"), (int, float))]
        assert timed and all(r["ours_ms"] > 0 for r in timed), op
        assert any(isinstance(r.get("speedup"), (int, float)) for r in rows), op
        assert f"## {op}" in markdown
        with Image.open(section["plot"]) as png:
            assert png.format == "PNG" and png.width > 100 and png.height > 100
            png.verify()
    # the report ends with the static kernel report: every kernel compiled, or why not
    static = data["static"]
    reason = _aot.can_compile_without_gpu()
    if reason:
        assert static == {"skipped": reason}
        assert f"Skipped: {reason}" in markdown
    else:
        assert not static["failures"]
        reported = {r["kernel"] for r in static["rows"]}
        assert reported == {k.split(":")[1] for k in _aot.launched_kernels()}
        assert all(r["spill_bytes"] == 0 for r in static["rows"])
        assert "## Static kernel report" in markdown and "occupancy_sm90" in markdown
