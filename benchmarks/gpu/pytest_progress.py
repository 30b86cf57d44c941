"""pytest plugin of the GPU kit's test step: one JSON line per finished test, as it finishes.

    GPU_KIT_TESTS_JSON=PATH python -m pytest -p benchmarks.gpu.pytest_progress ...

pytest writes its own reports (JUnit XML, the summary line) only when the session ends; a
step cut at its time cap would leave nothing. These lines survive a cut: the kit counts
passed, failed and skipped tests and finds the slowest ones from them.
"""
from __future__ import annotations

import json
import os


_worker = False


def pytest_configure(config):
    # an xdist worker of this run (not an inherited PYTEST_XDIST_WORKER: the kit's dry run
    # may itself run inside a worker of the project's test suite)
    global _worker
    _worker = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_KIT_TESTS_JSON")
    if not path or _worker:
        return   # under pytest-xdist the controller records each worker's reports
    if report.when != "call" and report.outcome == "passed":
        return   # one line per test: its call, or a setup/teardown that failed or skipped it
    outcome = report.outcome
    if report.when != "call" and outcome == "failed":
        outcome = "error"
    reason = None
    if outcome == "skipped" and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
    elif outcome in ("failed", "error") and report.longrepr:
        reason = str(report.longrepr).strip().splitlines()[-1][:300]
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": outcome, "when": report.when,
                            "seconds": round(report.duration, 3), "reason": reason}) + "\n")
