"""Kernel launches: every launch goes through :func:`launch`, which guards the tensors' CUDA
device and, while recording (always under the interpreter), records the specialization it
compiles to (argument types, constexpr values, num_warps). The GPU compile check
(``kernels._aot``) compiles exactly those recorded specializations for sm_80/sm_90, each
expanded over the kernel's registered tuning table, so it cannot drift from what the ops
launch. Inside ``_utils.dry_run`` a launch is observed instead of run.

Which row a launch takes is :func:`pick_tuning`'s answer: the launcher's own rule, unless
the winners file (``kernels/tuned.json``, written by ``python -m benchmarks.gpu.sweep``)
names another row of the same table for this device and the workload key the launcher
passes; ``forced_tuning_row`` overrides both.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import _utils
from ._utils import INTERPRET, MAX_GRID_YZ

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
    torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: what `triton.compile` needs, and nothing else."""
    kernel: str                            # "module:function"
    signature: tuple[tuple[str, str], ...]  # (arg name, triton type) of runtime args
    constexprs: tuple[tuple[str, Any], ...]  # non-tunable constexpr values (and ints == 1)
    tunables: tuple[tuple[str, Any], ...]    # the tuning-table row used (incl. num_warps)
    divisible: tuple[str, ...] = ()          # args the JIT marks divisible by 16

    def as_json(self) -> dict:
        return {"kernel": self.kernel, "signature": [list(s) for s in self.signature],
                "constexprs": [list(c) for c in self.constexprs],
                "tunables": [list(t) for t in self.tunables],
                "divisible": list(self.divisible)}

    @classmethod
    def from_json(cls, d: dict) -> "Specialization":
        return cls(d["kernel"], tuple(tuple(s) for s in d["signature"]),
                   tuple(tuple(c) for c in d["constexprs"]),
                   tuple(tuple(t) for t in d["tunables"]), tuple(d.get("divisible", ())))


LAUNCHES: set[Specialization] = set()
# kernel id -> the tuning table its launcher chooses from (list of dicts; "num_warps" in each)
TUNING_TABLES: dict[str, list[dict]] = {}
# kernel id -> the rows of its table that only the interpreter launches
INTERPRETER_ROWS: dict[str, list[dict]] = {}
# kernel id -> the rows of its table that no launcher rule picks: the sweep times them
# beside the rules' rows, and a launch takes one where the winners file names it
CANDIDATE_ROWS: dict[str, list[dict]] = {}
# kernel id -> the names of the workload key its launcher passes to pick_tuning
KEY_FIELDS: dict[str, tuple[str, ...]] = {}
# kernel id -> why its sm_90 occupancy below OCCUPANCY_TARGET is the right trade
OCCUPANCY_NOTES: dict[str, str] = {}
OCCUPANCY_TARGET = 0.5


def kernel_id(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


try:   # Triton's own argument specialization (3.6-3.9): what its JIT compiles per launch
    from triton._C.libtriton import native_specialize_impl as _native_specialize
    from triton.backends.compiler import BaseBackend as _BaseBackend
except ImportError:   # pragma: no cover - another Triton: the rule below, written out
    _native_specialize = None


def jit_specialization(value: Any, specialize: bool) -> tuple[str, Any]:
    """(type, key) of a launch argument as Triton's JIT specializes it: an int equal to 1
    becomes ("constexpr", 1), and key "D" marks a pointer or an int divisible by 16 (both
    only where the kernel's ``do_not_specialize`` does not exempt the argument)."""
    if _native_specialize is not None:
        try:
            return tuple(_native_specialize(_BaseBackend, value, False, specialize, True))
        except TypeError:   # another signature: the rule below, written out
            pass
    if value is None:
        return "constexpr", None
    kind = _triton_type(value)
    if isinstance(value, torch.Tensor):
        return kind, ("D" if value.data_ptr() % 16 == 0 else "") if specialize else None
    if isinstance(value, int) and not isinstance(value, bool) and specialize:
        return ("constexpr", 1) if value == 1 else (kind, "D" if value % 16 == 0 else "")
    return kind, None


def _triton_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "u1"   # as Triton's JIT types a Python bool
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def register_tuning(kernel, table: list[dict], interpreter: Sequence[dict] = (),
                    occupancy_note: str | None = None, candidates: Sequence[dict] = (),
                    key_fields: Sequence[str] = ()) -> list[dict]:
    """Declare the rows a launcher may pick for ``kernel``; the compile check builds all.

    ``interpreter``: rows only the interpreter launches (it pays per op, so bigger tiles
    make the tests faster); they are compiled too, but no GPU runs them, so the sm_90
    occupancy target does not apply to them. ``occupancy_note``: why occupancy below
    ``OCCUPANCY_TARGET`` is the right trade for this kernel (the static report prints it;
    a GPU row below the target without one fails the compile check). ``candidates``: GPU
    rows no launcher rule picks, which the sweep (``benchmarks.gpu.sweep``) times beside
    the rules' rows; they are compiled, held to the occupancy target and launched by the
    memory check as every GPU row is, and a launch takes one only where the winners file
    names it. ``key_fields``: the names of the workload key the launcher passes to
    :func:`pick_tuning` (a kernel with candidates needs one).
    """
    rows = list(table) + list(candidates) + list(interpreter)
    for row in rows:
        if "num_warps" not in row:
            raise ValueError("every tuning row needs num_warps")
    kid = kernel_id(kernel)
    for i, row in enumerate(rows):
        if row in rows[:i]:
            raise ValueError(f"{kid}: tuning row {row} is listed twice")
    if candidates and not key_fields:
        raise ValueError(f"{kid}: candidates need key_fields (winners are kept per "
                         "workload key)")
    TUNING_TABLES[kid] = rows
    INTERPRETER_ROWS[kid] = list(interpreter)
    CANDIDATE_ROWS[kid] = list(candidates)
    KEY_FIELDS[kid] = tuple(key_fields)
    if occupancy_note:
        OCCUPANCY_NOTES[kid] = occupancy_note
    return rows


# kernel id -> rule(constexprs and tuning) -> {input layout: {access: tile axis that must
# carry the warp's lanes, or ("flat", inner) for a flat vector}}; kernel id -> {layout:
# why that layout's lanes are knowingly elsewhere}
LANE_RULES: dict[str, Callable[[dict], dict[str, dict[str, Any]]]] = {}
LANE_NOTES: dict[str, dict[str, str]] = {}


def register_lanes(kernel, rule: Callable[[dict], dict[str, dict[str, Any]]],
                   notes: dict[str, str] | None = None) -> None:
    """Declare, for the compile check's lane test, which axis of ``kernel``'s 2-D tiles is
    the stride-1 dimension of the tensor each hot-loop access touches (``load``, ``store``,
    ``atomic_rmw``), per input layout the launcher sends to that specialization: ``rule``
    maps the specialization's constexprs and tuning row to ``{layout: {access: axis}}``,
    the axis ``("flat", inner)`` for a flat vector whose fast index walks the stride-1
    dimension ``inner`` elements at a time. ``notes``: a layout whose lanes are knowingly
    elsewhere, and why (the report prints it)."""
    kid = kernel_id(kernel)
    LANE_RULES[kid] = rule
    LANE_NOTES[kid] = dict(notes or {})


def gpu_rows(kid: str) -> list[dict]:
    """The rows of a kernel's tuning table that a GPU launches (interpreter-only ones out):
    the launcher's rules' rows, then its candidates."""
    return [r for r in TUNING_TABLES[kid] if r not in INTERPRETER_ROWS.get(kid, [])]


# ---------------------------------------------------------------------------------------
# Workload keys and the winners file

# Key parts name dtypes so (the file stays readable, a dict lookup at the launch)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16", torch.float64: "float64", torch.uint8: "uint8",
               torch.bool: "bool"}


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 and 1 kept): a key part for sizes that vary
    call to call (instances, boxes), so nearby sizes share a winner."""
    return 1 << (n - 1).bit_length() if n > 1 else n


def key_text(key: Sequence) -> str:
    """A workload key as the winners file writes it: its parts joined by ``|``. Parts are
    ints and strings (a string that reads as an int would come back as one: refused)."""
    parts = []
    for p in key:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise TypeError(f"workload key parts must be int or str, got {p!r} in {key}")
        if isinstance(p, str) and ("|" in p or p.lstrip("-").isdigit()):
            raise ValueError(f"workload key string {p!r} would not read back as itself")
        parts.append(str(p))
    return "|".join(parts)


def parse_key(text: str) -> tuple:
    """The inverse of :func:`key_text`."""
    return tuple(int(p) if p.lstrip("-").isdigit() else p for p in text.split("|"))


WINNERS_PATH = Path(__file__).with_name("tuned.json")
WINNERS_FORMAT = 1


def read_winners(path: Path | str | None) -> dict[str, dict[str, dict[tuple, dict]]]:
    """{device name: {kernel id: {workload key: row}}} from a winners file (None or a
    missing file: none). The file: ``{"format": 1, "devices": {name: {"source": {...},
    "kernels": {kernel id: {key text: row}}}}}``."""
    if path is None or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    if data.get("format") != WINNERS_FORMAT:
        raise ValueError(f"{path}: winners file format {data.get('format')!r}, this code "
                         f"reads format {WINNERS_FORMAT}")
    return {device: {kid: {parse_key(text): dict(row) for text, row in keyed.items()}
                     for kid, keyed in entry.get("kernels", {}).items()}
            for device, entry in data.get("devices", {}).items()}


_winners = read_winners(WINNERS_PATH)   # every device's winners, read once at import
_here: dict[int, dict[tuple, dict]] = {}   # id(kernel) -> this device's winners for it
_UNREAD = object()
_device: Any = _UNREAD


def tuning_device() -> str | None:
    """The device whose winners :func:`pick_tuning` applies: the current CUDA device's
    name, read once per process on the first keyed launch (a process whose GPUs differ
    takes the first one's winners); None under the interpreter."""
    global _device
    if _device is _UNREAD:
        _device = (None if INTERPRET or not torch.cuda.is_available()
                   else torch.cuda.get_device_name())
    return _device


def _winners_here(kernel) -> dict[tuple, dict]:
    """This device's winners for ``kernel``, each the registered row itself; a row its
    table no longer lists (a winners file older than the table) is left out."""
    kid = kernel_id(kernel)
    rows = gpu_rows(kid) if kid in TUNING_TABLES else []
    table = {}
    for key, row in _winners.get(tuning_device(), {}).get(kid, {}).items():
        match = next((r for r in rows if r == row), None)
        if match is None:
            warnings.warn(f"{WINNERS_PATH.name}: {kid} {key}: row {row} is not in the "
                          "kernel's tuning table; the launcher's own pick is used")
        else:
            table[key] = match
    _here[id(kernel)] = table
    return table


@contextlib.contextmanager
def winners_file(path: Path | str | None):
    """Inside the block :func:`pick_tuning` reads the winners in ``path`` (None: none)
    instead of the committed file (the sweep times the launchers' own rules so)."""
    global _winners
    previous, _winners = _winners, read_winners(path)
    _here.clear()
    try:
        yield
    finally:
        _winners = previous
        _here.clear()


@contextlib.contextmanager
def simulated_device(name: str | None):
    """Inside the block :func:`pick_tuning` takes ``name``'s winners, whatever the device
    (tests, on a machine without that GPU)."""
    global _device
    previous, _device = _device, name
    _here.clear()
    try:
        yield
    finally:
        _device = previous
        _here.clear()


# ---------------------------------------------------------------------------------------
# Picking a row

# (kernel, launcher's row, key) -> the row to take, or None to leave the pick alone:
# forced_tuning_row and watched_tuning, innermost first
_steer: Callable[[Any, dict, Any], dict | None] | None = None


@contextlib.contextmanager
def _steering(fn: Callable[[Any, dict, Any], dict | None]):
    global _steer
    previous = _steer

    def steer(kernel, row, key):
        taken = fn(kernel, row, key)
        return taken if taken is not None or previous is None else previous(kernel, row, key)

    _steer = steer
    try:
        yield
    finally:
        _steer = previous


@contextlib.contextmanager
def forced_tuning_row(index: int | dict, kernel=None, key: tuple | None = None):
    """Inside the block every launcher takes row ``index`` of its kernel's GPU rows (the
    last row when the table is shorter) instead of its own pick or the winners file's.
    Any row computes the same result; one pass per index launches every row (the GPU kit's
    memory check does this). With ``kernel``, only that kernel's launches are forced — with
    ``key`` too, only those for that workload key — and ``index`` may be the row itself
    (the sweep times each row so)."""
    kid = kernel if kernel is None or isinstance(kernel, str) else kernel_id(kernel)
    if isinstance(index, dict) and (kid is None or index not in gpu_rows(kid)):
        raise ValueError(f"forced row {index} is not a GPU row of "
                         f"{kid or 'a named kernel'}")

    def forced(k, row, k_key):
        k_id = kernel_id(k)
        if (kid is not None and k_id != kid) or (key is not None and k_key != key):
            return None
        if isinstance(index, dict):
            return index
        rows = gpu_rows(k_id)
        return rows[min(index, len(rows) - 1)]

    with _steering(forced):
        yield


@contextlib.contextmanager
def watched_tuning():
    """Inside the block every :func:`pick_tuning` call is listed as (kernel id, workload
    key, the launcher's own row): the sweep reads which keys an op's launches pass."""
    seen: list[tuple[str, Any, dict]] = []

    def watch(kernel, row, key):
        seen.append((kernel_id(kernel), key, row))
        return None

    with _steering(watch):
        yield seen


def pick_tuning(kernel, row: dict, key: tuple | None = None) -> dict:
    """The row a launcher launches: the winners file's row for this device and workload
    ``key`` (a tuple of ints and strings, the fields its ``register_tuning`` names) where
    it has one, else the launcher's own pick ``row``; ``forced_tuning_row`` overrides both.
    With no winner for this device this costs a dict lookup or two."""
    if _steer is not None:
        taken = _steer(kernel, row, key)
        if taken is not None:
            return taken
    if key is None or not _winners:
        return row
    table = _here.get(id(kernel))
    if table is None:
        table = _winners_here(kernel)
    return table.get(key, row)


# Launch records cost host time, so they are kept only while recording is on: always under
# the interpreter (a test session's launches feed the GPU compile check), elsewhere inside
# record_launches() (the GPU kit's launch_all).
_recording = INTERPRET
_ARG_NAMES: dict[str, list[str]] = {}   # kernel id -> its parameter names, read once
_UNSPECIALIZED: dict[str, set[str]] = {}  # kernel id -> its do_not_specialize names


@contextlib.contextmanager
def record_launches():
    """Record every launch's specialization into LAUNCHES inside the block."""
    global _recording
    previous, _recording = _recording, True
    try:
        yield
    finally:
        _recording = previous


def _arg_names(kernel) -> tuple[list[str], set[str]]:
    """A kernel's parameter names and its do_not_specialize names, read once."""
    kid = kernel_id(kernel)
    names = _ARG_NAMES.get(kid)
    if names is None:
        names = _ARG_NAMES[kid] = list(
            inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        # the compiled kernel's decorator keeps them; the interpreter's, its arguments
        listed = getattr(kernel, "do_not_specialize", None)
        if listed is None:
            listed = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
        _UNSPECIALIZED[kid] = {names[a] if isinstance(a, int) else a for a in listed}
    return names, _UNSPECIALIZED[kid]


def _specialize(kernel, args: tuple) -> tuple[list, dict, list]:
    """What the JIT compiles for these arguments: the runtime (name, type) signature, the
    arguments it folds into constants (ints equal to 1, None) and the pointers and ints it
    marks divisible by 16 (the compile check builds exactly that)."""
    names, unspecialized = _arg_names(kernel)
    signature, ones, divisible = [], {}, []
    for n, a in zip(names, args):
        kind, key = jit_specialization(a, n not in unspecialized)
        if kind == "constexpr":
            ones[n] = key
            continue
        signature.append((n, kind))
        if isinstance(key, str) and "D" in key:
            divisible.append(n)
    return signature, ones, divisible


def runtime_args(kernel, args: tuple) -> int:
    """How many of a launch's arguments are runtime arguments (what Triton's launch path
    pays for per call); constexprs, ints specialized to 1 and None are not."""
    return len(_specialize(kernel, args)[0])


def _record(kernel, args: tuple, tuning: dict, constexprs: dict) -> None:
    kid = kernel_id(kernel)
    if kid in TUNING_TABLES and tuning not in TUNING_TABLES[kid]:
        raise RuntimeError(f"{kid}: tuning row {tuning} is not in its registered table")
    signature, ones, divisible = _specialize(kernel, args)
    LAUNCHES.add(Specialization(
        kid, tuple(signature), tuple(sorted({**constexprs, **ones}.items())),
        tuple(sorted(tuning.items())), tuple(divisible)))


def launch_device(args: Sequence[Any]) -> torch.device | None:
    """The CUDA device of a launch: its first tensor argument's (None off CUDA)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device if a.device.type == "cuda" else None
    return None


def launch(kernel, grid, *args, tuning: dict, **constexprs) -> None:
    """Launch ``kernel[grid](*args, **tuning, **constexprs)`` on its tensors' device.

    ``tuning`` is a row of the kernel's registered tuning table (block sizes, num_warps);
    ``constexprs`` are the mode switches and shape constants the call fixes. Triton
    launches on the current CUDA device, so the launch is guarded to the tensors' device
    (tensors on cuda:1 with cuda:0 current would otherwise be read from the wrong GPU), as
    torchvision's kernels guard theirs. While recording, the specialization is kept for the
    GPU compile check.
    """
    if grid[0] >= 2**31 or max(grid[1:], default=0) > MAX_GRID_YZ:
        raise ValueError(f"{kernel_id(kernel)}: the inputs need a grid of {tuple(grid)} "
                         "programs, past CUDA's limits (2**31 - 1 on axis 0, 65,535 on "
                         "axes 1 and 2)")
    if _utils._dry:
        if _utils.observer is not None:
            _utils.observer(kernel_id(kernel), tuple(grid), runtime_args(kernel, args))
        return
    if _recording:
        _record(kernel, args, tuning, constexprs)
    device = launch_device(args)
    # (entering torch.cuda.device costs microseconds: only where it changes the device)
    if device is None or device.index == torch.cuda.current_device():
        kernel[grid](*args, **tuning, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel[grid](*args, **tuning, **constexprs)
