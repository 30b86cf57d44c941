"""The kernels package's shape (issue 31): no file over 600 lines, and nothing that reaches
outside PyTorch (ctypes, /proc, raw mmap) to win a benchmark."""
from __future__ import annotations

import re
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
MAX_LINES = 600
OUTSIDE = re.compile(r"^\s*(import|from)\s+(ctypes|mmap)\b|/proc/", re.MULTILINE)


def _sources() -> list[Path]:
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 15, files          # the package was found
    return files


def test_no_file_in_kernels_is_over_600_lines():
    long = {str(f.relative_to(KERNELS)): n for f in _sources()
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_nothing_in_kernels_reaches_outside_pytorch():
    found = {str(f.relative_to(KERNELS)): m.group(0).strip() for f in _sources()
             if (m := OUTSIDE.search(f.read_text()))}
    assert not found, found


def test_the_outside_pattern_catches_what_it_names():
    for line in ("import ctypes", "from mmap import mmap", "open('/proc/self/maps')"):
        assert OUTSIDE.search(line), line
    assert not OUTSIDE.search("# glibc's mmap threshold")
