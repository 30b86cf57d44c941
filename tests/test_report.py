"""`python -m benchmarks --quick` on the CPU writes a complete JSON, Markdown and PNG report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from benchmarks.__main__ import OPS


def test_report_writes_json_markdown_and_plots(tmp_path):
    # the CPU report times our PyTorch path against torchvision's C++ kernels: no interpreter.
    # --tiny: the smallest shapes; the report's code is the same. --no-static: its static
    # section is checked by the compile check, from the specializations it compiles
    # (tests/test_gpu_compile.py), not compiled a second time here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--dtype", "float32",
                    "--device", "cpu", "--no-static", "--out", str(tmp_path)], env=env,
                   check=True, capture_output=True, text=True, timeout=900)
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
        # the profile's fields come with --profile only (tests/test_profile.py)
        assert not [k for r in rows for k in r
                    if k.endswith(("_kernel_ms", "_host_us", "_syncs", "kernel_speedup"))], op
        with Image.open(section["plot"]) as png:
            assert png.format == "PNG" and png.width > 100 and png.height > 100
            png.verify()
    assert "static" not in data and "Static kernel report" not in markdown
    assert data["profile"] is False and "Profile (`--profile`)" not in markdown


def test_each_op_runs_in_a_process_of_its_own_and_a_failure_stays_in_its_section():
    # the report measures each op in a fresh process (one op's allocator and OpenMP state
    # must not time the next); its rows come back, and an op whose process fails or whose
    # benchmark raises gets an error in its section instead of rows
    from benchmarks.__main__ import _in_own_process, _op_section
    env_before = dict(os.environ)
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        section = _in_own_process("nms", ["--tiny", "--device", "cpu", "--dtype", "float32"])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert section["rows"] and all(r["parity"] == "ok" for r in section["rows"])
    crashed = _in_own_process("no_such_op", ["--tiny", "--device", "cpu"])
    assert "exit code 2" in crashed["error"]

    class Raises:
        @staticmethod
        def run(**kwargs):
            raise RuntimeError("boom")
    assert _op_section(Raises, "nms", True, "cpu", True, ["float32"]) == {
        "error": "RuntimeError: boom"}
