"""Kernel launches: every launch goes through :func:`launch`, which guards the tensors' CUDA
device and, while recording (always under the interpreter), records the specialization it
compiles to (argument types, constexpr values, num_warps). The GPU compile check
(``kernels._aot``) compiles exactly those recorded specializations for sm_80/sm_90, each
expanded over the kernel's registered tuning table, so it cannot drift from what the ops
launch. Inside ``_utils.dry_run`` a launch is observed instead of run.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
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
                    occupancy_note: str | None = None) -> list[dict]:
    """Declare the rows a launcher may pick for ``kernel``; the compile check builds all.

    ``interpreter``: rows only the interpreter launches (it pays per op, so bigger tiles
    make the tests faster); they are compiled too, but no GPU runs them, so the sm_90
    occupancy target does not apply to them. ``occupancy_note``: why occupancy below
    ``OCCUPANCY_TARGET`` is the right trade for this kernel (the static report prints it;
    a GPU row below the target without one fails the compile check).
    """
    rows = list(table) + list(interpreter)
    for row in rows:
        if "num_warps" not in row:
            raise ValueError("every tuning row needs num_warps")
    kid = kernel_id(kernel)
    TUNING_TABLES[kid] = rows
    INTERPRETER_ROWS[kid] = list(interpreter)
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


_forced_row: int | None = None


def gpu_rows(kid: str) -> list[dict]:
    """The rows of a kernel's tuning table that a GPU launches (interpreter-only ones out)."""
    return [r for r in TUNING_TABLES[kid] if r not in INTERPRETER_ROWS.get(kid, [])]


@contextlib.contextmanager
def forced_tuning_row(index: int):
    """Inside the block every launcher takes row ``index`` of its kernel's GPU rows (the
    last row when the table is shorter) instead of its own pick. Any row computes the same
    result; one pass per index launches every row (the GPU kit's memory check does this)."""
    global _forced_row
    previous, _forced_row = _forced_row, index
    try:
        yield
    finally:
        _forced_row = previous


def pick_tuning(kernel, row: dict) -> dict:
    """The row a launcher launches: its own pick ``row``, unless ``forced_tuning_row`` is on."""
    if _forced_row is None:
        return row
    rows = gpu_rows(kernel_id(kernel))
    return rows[min(_forced_row, len(rows) - 1)]


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
