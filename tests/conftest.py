"""Shared test fixtures: seeding, backends, the tolerance table, poisoning."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kernels import _launch
from kernels._utils import INTERPRET, reference_path

def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# Optional packages: the ops and the model need neither; a test that needs one is skipped
# with the reason (the GPU machine has no pycocotools), never an error at collection.
requires_pycocotools = pytest.mark.skipif(
    not _importable("pycocotools"),
    reason="pycocotools is not installed (COCO data, COCO evaluation and RLE output need it)")

# One seed per session (printed in the header; set TEST_SEED to replay a run); each test
# mixes in its own node id, so every case gets fresh inputs and a failure can be replayed.
SESSION_SEED = int(os.environ.get("TEST_SEED", random.SystemRandom().randrange(2**31)))

# The one table of tolerances, by dtype.
TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """Tolerances for dtype, multiplied by ``scale`` where a reduction is long."""
    return {k: v * scale for k, v in TOL[dtype].items()}


BACKEND_NAMES = ("reference", "interpreter", "cuda")
# TEST_BACKENDS=cuda runs only the CUDA cases (the GPU kit's test step: the reference and
# interpreter backends are the CPU's job); a comma list picks several. Unset: every backend.
SELECTED_BACKENDS = tuple(b for b in os.environ.get("TEST_BACKENDS", "").split(",") if b)


def backend_selected(name: str) -> bool:
    return not SELECTED_BACKENDS or name in SELECTED_BACKENDS


def pytest_report_header(config):
    return (f"TEST_SEED={SESSION_SEED}  TRITON_INTERPRET={int(INTERPRET)}  "
            f"cuda={torch.cuda.is_available()}  "
            f"TEST_BACKENDS={','.join(SELECTED_BACKENDS) or 'all'}")


def pytest_collection_modifyitems(config, items):
    if SELECTED_BACKENDS:
        unknown = set(SELECTED_BACKENDS) - set(BACKEND_NAMES)
        if unknown:
            raise pytest.UsageError(f"TEST_BACKENDS: unknown backend(s) {sorted(unknown)}; "
                                    f"choose from {BACKEND_NAMES}")
        # keep the cases of the selected backends: tests parametrized by `backend`, tests
        # marked multi_backend that loop over the selected backends themselves, and tests
        # marked cuda when cuda is selected (the first H200 run dropped them unseen)
        keep, drop = [], []
        for item in items:
            spec = getattr(item, "callspec", None)
            backend = spec.params.get("backend") if spec else None
            chosen = (backend_selected(backend.name) if backend is not None
                      else item.get_closest_marker("multi_backend") is not None
                      or (item.get_closest_marker("cuda") is not None
                          and backend_selected("cuda")))
            (keep if chosen else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    # The GPU compile check compiles what the other tests launched: run it last.
    items.sort(key=lambda item: item.get_closest_marker("compile_check") is not None)


# `make test` runs the suite in two passes: every test but the compile check on two
# processes (pytest-xdist), then the compile check, which also compiles what the first
# pass launched: each process of the first pass leaves its launches in KERNEL_LAUNCHES_DIR.
LAUNCHES_DIR = os.environ.get("KERNEL_LAUNCHES_DIR")


def pytest_sessionfinish(session):
    if LAUNCHES_DIR and _launch.LAUNCHES:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(LAUNCHES_DIR, f"{worker}-{os.getpid()}.json").write_text(
            json.dumps([s.as_json() for s in _launch.LAUNCHES]))


def launches_of_earlier_passes() -> list[dict]:
    """The specializations the first pass's processes launched (none outside `make test`)."""
    if not LAUNCHES_DIR:
        return []
    return [spec for f in sorted(Path(LAUNCHES_DIR).glob("*.json"))
            for spec in json.loads(f.read_text())]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: every worker takes the controller's seed (one seed per run, replayable
    with TEST_SEED)."""
    node.workerinput["test_seed"] = SESSION_SEED


def pytest_configure(config):
    global SESSION_SEED
    # Oracles in IEEE float32 on a GPU: cuDNN's default TF32 rounds a reference's
    # convolution inputs to 10 mantissa bits (about 1e-3 off, measured on an H200), and in
    # a model it amplifies float32 rounding differences of the ops under test.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if hasattr(config, "workerinput"):
        SESSION_SEED = config.workerinput["test_seed"]
        # two workers share two cores: one torch thread each, no oversubscription
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (model, CLI): on a shared 2-core
    CPU, multi-threaded kernels on tiny tensors mostly wait at barriers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Backend:
    """Where an op runs: the device of its tensors and whether the reference is forced."""
    name: str
    device: str
    reference: bool

    def __call__(self):
        return reference_path() if self.reference else contextlib.nullcontext()

    @property
    def triton(self) -> bool:
        return not self.reference


_BACKENDS = [
    pytest.param(Backend("reference", "cpu", True), id="reference"),
    pytest.param(Backend("interpreter", "cpu", False), id="interpreter",
                 marks=pytest.mark.skipif(not INTERPRET,
                                          reason="Triton kernels on CPU need TRITON_INTERPRET=1")),
    pytest.param(Backend("cuda", "cuda", False), id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                          reason="no CUDA device")),
]


@pytest.fixture(params=_BACKENDS)
def backend(request) -> Backend:
    """Each op test runs on the reference path, on the Triton interpreter and on CUDA."""
    with request.param():
        yield request.param


@pytest.fixture
def poison(monkeypatch):
    """Make freshly allocated outputs NaN so an element a kernel forgets to write fails.

    Patches torch.empty/empty_like/new_empty for the duration of the test.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))
    yield
