"""Helpers shared by every op: dispatch, input checks, launch recording.

Dispatch rule (DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch reference, except under ``TRITON_INTERPRET=1`` where they run the same Triton
kernels on Triton's interpreter. ``reference_path()`` forces the reference (tests use it
to check both paths in one process).

Every kernel launch goes through :func:`launch`, which guards the tensors' CUDA device and,
while recording (always under the interpreter), records the specialization it compiles to
(argument types, constexpr values, num_warps). The GPU compile check (``kernels._aot``)
compiles exactly those recorded specializations for sm_80/sm_90, each expanded over the
kernel's tuning table, so it cannot drift from what the ops launch.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from ._interpreter import patch_interpreter
    patch_interpreter()

# dtypes the Triton kernels take; float64 always runs the reference (it is the gradcheck
# dtype, and the kernels accumulate in float32).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)

_force_reference = False


@contextlib.contextmanager
def reference_path():
    """Run every op on its PyTorch reference implementation inside the block."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernels (see module docstring)."""
    if _force_reference or t.dtype not in KERNEL_DTYPES:
        return False
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


# The path each op's last call ran ("triton", "torchvision", "torch" or "reference"), by
# launcher name: the CPU benchmark report names it beside each row. pick_path records the
# custom ops' paths; the public functions that take kernels._cpu's autograd forms record
# theirs.
last_path: dict[str, str] = {}


def record_path(launcher: str, path: str) -> None:
    """``last_path[launcher] = path`` from a public function; skipped while torch.compile
    traces (a write to a global dict there would guard on it and recompile each call)."""
    if not torch.compiler.is_compiling():
        last_path[launcher] = path


def cpu_path(t: torch.Tensor) -> bool:
    """True when ``t`` takes an op's CPU path (``kernels._cpu``): a CPU tensor of a float
    dtype, outside the interpreter and ``reference_path()``."""
    return (not _force_reference and t.device.type == "cpu" and not use_triton(t)
            and t.dtype in FLOAT_DTYPES)


def pick_path(t: torch.Tensor, kernel: Callable, ref: Callable,
              deterministic: Callable | None = None, cpu: Callable | None = None,
              cpu_name: str = "torchvision") -> Callable:
    """The launcher a custom op's body runs for ``t``: ``kernel`` (Triton), ``deterministic``
    (Triton without atomics, under ``torch.use_deterministic_algorithms``), ``cpu`` (a
    ``kernels._cpu`` function: see ``cpu_path``; ``cpu_name`` the path it records,
    ``"torchvision"`` where it runs torchvision's kernel, ``"torch"`` where PyTorch's
    operations) or ``ref`` (the reference: CPU otherwise, float64 on CUDA, inside
    ``reference_path()``)."""
    if use_triton(t):
        path = kernel
        if deterministic is not None and torch.are_deterministic_algorithms_enabled():
            path = deterministic
        last_path[kernel.__name__] = "triton"
        return path
    if cpu is not None and cpu_path(t):
        last_path[kernel.__name__] = cpu_name
        return cpu
    last_path[kernel.__name__] = "reference"
    return ref


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reference computes (and a loss accumulates) in: float64 stays float64,
    every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(t: torch.Tensor) -> bool:
    """True for a 4-D tensor in channels_last that is not also plain contiguous."""
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


MAX_GRID_YZ = 65535   # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1)


def row_chunks(k: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most MAX_GRID_YZ rows: one launch each, when a kernel puts
    its rows (RoIs) on grid axis 2 and its big dimension on axis 0."""
    return [(s, min(k, s + MAX_GRID_YZ)) for s in range(0, k, MAX_GRID_YZ)]


# ---------------------------------------------------------------------------------------
# Input checks: every message names the argument and says what was expected.
#
# Bad input raises ValueError or TypeError; where torchvision raises another class for the
# same input (torch._assert's AssertionError, TORCH_CHECK's RuntimeError, or whatever its
# Python code trips over), the error is an instance of that class too, so handlers written
# for either keep working. Each op passes the Errors torchvision's version would raise.


class ValueAssertionError(ValueError, AssertionError):
    """Bad value where torchvision asserts (``torch._assert``): RoI boxes' shape."""


class TypeAssertionError(TypeError, AssertionError):
    """Wrong type where torchvision asserts: RoI boxes that are not a tensor or a list."""


class ValueRuntimeError(ValueError, RuntimeError):
    """Bad value where torchvision's C++ check (``TORCH_CHECK``) raises RuntimeError."""


class TypeRuntimeError(TypeError, RuntimeError):
    """Wrong dtype or argument type where torchvision's C++ check raises RuntimeError."""


class ValueIndexError(ValueError, IndexError):
    """Bad shape where torchvision's Python code indexes a missing dimension."""


class TypeAttributeError(TypeError, AttributeError):
    """Not a tensor where torchvision's Python code reads a tensor attribute."""


class Errors(NamedTuple):
    """The classes one argument's checks raise: not a tensor, bad shape or value, bad dtype."""
    missing: type = TypeError
    value: type = ValueError
    dtype: type = TypeError


PLAIN = Errors()
# torchvision's ops.nms / batched_nms (TORCH_CHECK in C++, attribute reads in Python)
NMS_ERRORS = Errors(TypeAttributeError, ValueRuntimeError, TypeRuntimeError)
# torchvision's ops.roi_align input and scalar arguments (TORCH_CHECK, schema checks)
ROI_INPUT_ERRORS = Errors(TypeAttributeError, ValueRuntimeError, TypeRuntimeError)
# torchvision's check_roi_boxes_shape (torch._assert); dtypes are checked in C++
ROI_BOXES_ERRORS = Errors(TypeAssertionError, ValueAssertionError, TypeRuntimeError)

def check_tensor(name: str, t: Any, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, what: str = "",
                 errors: Errors = PLAIN) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise errors.missing(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            shape = what or " or ".join(f"{d}-D" for d in allowed)
            raise errors.value(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise errors.dtype(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_float(name: str, t: torch.Tensor, errors: Errors = PLAIN) -> None:
    if not t.is_floating_point():
        raise errors.dtype(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_float_dtype(name: str, t: torch.Tensor, errors: Errors = PLAIN) -> None:
    """One of the dtypes the ops take: the kernels' three and float64 (reference path)."""
    if t.dtype not in FLOAT_DTYPES:
        raise errors.dtype(f"{name} must be float32, float16, bfloat16 or float64, "
                           f"got {t.dtype}")


def check_integer(name: str, t: torch.Tensor, errors: Errors = PLAIN) -> None:
    """An integer dtype other than bool (labels, class indices)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise errors.dtype(f"{name} must be an integer tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device")


# How far past [0, 1] a float target may stray (float32 rounding of bilinear weights).
_UNIT_SLACK = 1e-6


def check_values(indices=(), unit=(), finite=()) -> None:
    """Value checks in one host sync (skipped while tracing).

    indices: (name, integer tensor, bound) — every value in [0, bound);
    unit: (name, mask tensor) — float values in [0, 1]; finite: (name, tensor).
    """
    if is_tracing():
        return
    stats, checks = [], []       # stats: two float64 values per check
    for name, t, bound in indices:
        if t.numel():
            stats.append(torch.stack(torch.aminmax(t)).double())
            checks.append(("index", name, bound))
    for name, t in unit:
        if t.numel() and t.is_floating_point():
            stats.append(torch.stack(torch.aminmax(t)).double())
            checks.append(("unit", name, None))
    for name, t in finite:
        if t.numel():
            stats.append(torch.isfinite(t).all().double().expand(2))
            checks.append(("finite", name, None))
    if not stats:
        return
    values = torch.cat(stats).tolist()
    for i, (kind, name, bound) in enumerate(checks):
        lo, hi = values[2 * i], values[2 * i + 1]
        if kind == "index" and not (lo >= 0 and hi < bound):
            raise ValueError(f"{name} must be in [0, {bound}), got values in [{lo:g}, {hi:g}]")
        # a few ulps of slack: bilinear targets (RoI Align of 0/1 masks) can round past 1
        if kind == "unit" and not (lo >= -_UNIT_SLACK and hi <= 1 + _UNIT_SLACK):
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo!r}, {hi!r}]")
        if kind == "finite" and not lo:
            raise ValueError(f"{name} must be finite, got NaN or infinite values")


def pair(name: str, value: Any, errors: Errors = PLAIN, least: int = 1) -> tuple[int, int]:
    """An int or a pair of ints >= ``least``, as torchvision's ``output_size``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise errors.dtype(f"{name} must be an int or a pair of ints, got {value!r}")
    if value[0] < least or value[1] < least:
        raise errors.value(f"{name} must be >= {least}, got {tuple(value)}")
    return int(value[0]), int(value[1])


_CHECKS = threading.local()


@contextlib.contextmanager
def skip_data_checks():
    """Within this block the public wrappers read no tensor values (no host sync): for
    callers whose inputs are valid by construction, such as the model's static mode, which
    must not sync from images in to detections out. Shapes, dtypes and devices are still
    checked; invalid values then give unspecified results (never an out-of-bounds access)."""
    before = getattr(_CHECKS, "skip", False)
    _CHECKS.skip = True
    try:
        yield
    finally:
        _CHECKS.skip = before


def is_tracing() -> bool:
    """True where a data check must not read values: under torch.compile / fake tensors
    and torch.fx, while a CUDA stream is capturing a graph (a sync would break it), and
    inside :func:`skip_data_checks`."""
    return (torch.compiler.is_compiling() or getattr(_CHECKS, "skip", False)
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def fx_leaf(fn: Callable) -> Callable:
    """Make ``fn`` a leaf of ``torch.fx`` tracing, as torchvision's ops are: called with a
    Proxy among its arguments (or inside a list argument) it records one call node instead
    of running its checks on the Proxy; called with tensors it is ``fn``."""
    import functools

    from torch.fx import Proxy

    def proxy_in(args) -> Proxy | None:
        for a in args:
            if isinstance(a, Proxy):
                return a
            if isinstance(a, (list, tuple)):
                found = proxy_in(a)
                if found is not None:
                    return found
        return None

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxy = proxy_in((*args, *kwargs.values()))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)
    return leaf


# ---------------------------------------------------------------------------------------
# Launch recording for the ahead-of-time GPU compile check.

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


def _record(kernel, args: tuple, tuning: dict, constexprs: dict) -> None:
    kid = kernel_id(kernel)
    if kid in TUNING_TABLES and tuning not in TUNING_TABLES[kid]:
        raise RuntimeError(f"{kid}: tuning row {tuning} is not in its registered table")
    names = _ARG_NAMES.get(kid)
    if names is None:
        names = _ARG_NAMES[kid] = list(
            inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        # the compiled kernel's decorator keeps them; the interpreter's, its arguments
        listed = getattr(kernel, "do_not_specialize", None)
        if listed is None:
            listed = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
        _UNSPECIALIZED[kid] = {names[a] if isinstance(a, int) else a for a in listed}
    # what the JIT compiles for these arguments: ints equal to 1 as constants, pointers
    # and ints divisible by 16 marked so (the compile check builds exactly that)
    signature, ones, divisible = [], {}, []
    for n, a in zip(names, args):
        kind, key = jit_specialization(a, n not in _UNSPECIALIZED[kid])
        if kind == "constexpr":
            ones[n] = key
            continue
        signature.append((n, kind))
        if isinstance(key, str) and "D" in key:
            divisible.append(n)
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
    if grid[0] >= 2**31 or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(f"{kernel_id(kernel)}: the inputs need a grid of {tuple(grid)} "
                         "programs, past CUDA's limits (2**31 - 1 on axis 0, 65,535 on "
                         "axes 1 and 2)")
    if _recording:
        _record(kernel, args, tuning, constexprs)
    device = launch_device(args)
    if device is None:
        kernel[grid](*args, **tuning, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel[grid](*args, **tuning, **constexprs)
