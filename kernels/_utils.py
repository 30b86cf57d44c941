"""Helpers shared by every op: dispatch, the value-check policy, input checks, launches.

Dispatch rule (DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run the CPU
kernels (``kernels._cpu``) or the PyTorch reference, except under ``TRITON_INTERPRET=1``
where they run the same Triton kernels on Triton's interpreter. ``reference_path()``
forces the reference (tests use it to check both paths in one process).

Value checks (batch indices, labels, finite coordinates: anything that reads tensor data)
run on CPU tensors always, and on CUDA only inside :func:`check_values` or with
``KERNELS_CHECK_VALUES=1`` in the environment: on CUDA each is a host sync, and
torchvision's CUDA kernels check none of these values. Whatever the values, no kernel
reads or writes out of bounds.

Every kernel launch goes through :func:`launch`, which guards the tensors' CUDA device and,
while recording (always under the interpreter), records the specialization it compiles to
(argument types, constexpr values, num_warps). The GPU compile check (``kernels._aot``)
compiles exactly those recorded specializations for sm_80/sm_90, each expanded over the
kernel's tuning table, so it cannot drift from what the ops launch. :func:`dry_run` sends
CPU tensors down the CUDA code path with launches observed instead of run: what
``python -m benchmarks.host`` counts on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading
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
_dry = False


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
    return t.is_cuda or ((INTERPRET or _dry) and t.is_cpu)


def gpu_path(t: torch.Tensor) -> bool:
    """True when ``t`` takes the CUDA code path: a CUDA tensor, or any tensor inside
    :func:`dry_run` (the host instrument's stand-in for a GPU)."""
    return _dry or t.is_cuda


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
    return (not _force_reference and t.is_cpu and not use_triton(t)
            and not _dry and t.dtype in FLOAT_DTYPES)


def pick_path(t: torch.Tensor, kernel: Callable, ref: Callable,
              deterministic: Callable | None = None, cpu: Callable | None = None,
              cpu_name: str = "torchvision") -> Callable:
    """The device kernel an op runs for ``t``: ``kernel`` (Triton: CUDA, the interpreter),
    ``deterministic`` (Triton without atomics, under ``torch.use_deterministic_algorithms``),
    ``cpu`` (a ``kernels._cpu`` function: see ``cpu_path``; ``cpu_name`` the path it
    records, ``"torchvision"`` where it runs torchvision's kernel, ``"torch"`` where
    PyTorch's operations) or ``ref`` (the reference: CPU otherwise, float64 on CUDA, inside
    ``reference_path()``). The custom op's body and the eager path both call it."""
    if use_triton(t):
        path = kernel
        if deterministic is not None and torch.are_deterministic_algorithms_enabled():
            path = deterministic
        record_path(kernel.__name__, "triton")
    elif cpu is not None and cpu_path(t):
        record_path(kernel.__name__, cpu_name)
        path = cpu
    else:
        record_path(kernel.__name__, "reference")
        path = ref
    return op_body(path) if _op_bodies else path


# The host instrument counts the tensor operations a call makes around its device kernel,
# as torchvision's C++ kernels keep theirs out of sight: inside ``count_op_bodies()`` the
# kernels pick_path returns run marked (``in_op_body()``).
_op_bodies = False
_BODY = threading.local()


@contextlib.contextmanager
def count_op_bodies():
    """Inside this block device kernels run marked: :func:`in_op_body` is True while one
    runs (``python -m benchmarks.host`` leaves their operations out of a call's count)."""
    global _op_bodies
    previous, _op_bodies = _op_bodies, True
    try:
        yield
    finally:
        _op_bodies = previous


def in_op_body() -> bool:
    return getattr(_BODY, "depth", 0) > 0


def op_body(fn: Callable) -> Callable:
    """``fn`` marked as a device kernel body while :func:`count_op_bodies` is on."""
    if not _op_bodies:
        return fn

    def body(*args, **kwargs):
        _BODY.depth = getattr(_BODY, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _BODY.depth -= 1
    return body


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


def check_nms_args(boxes, scores, idxs, iou_threshold, batched: bool) -> float:
    """nms and batched_nms (``batched``: ``idxs`` too): shapes, dtypes and devices, errors also of
    torchvision's classes (NMS_ERRORS); returns the threshold as a float (NaN, as in
    torchvision, suppresses nothing)."""
    e = NMS_ERRORS
    check_tensor("boxes", boxes, ndim=2, what="Tensor[N, 4]", errors=e)
    if boxes.shape[1] != 4:
        raise e.value(f"boxes must be Tensor[N, 4], got shape {tuple(boxes.shape)}")
    check_float_dtype("boxes", boxes, e)
    check_tensor("scores", scores, ndim=1, what="Tensor[N]", errors=e)
    check_float("scores", scores, e)
    if scores.shape[0] != boxes.shape[0]:
        raise e.value(f"scores must have one entry per box: got {scores.shape[0]} scores "
                      f"for {boxes.shape[0]} boxes")
    check_same_device(boxes=boxes, scores=scores)
    if batched:
        check_tensor("idxs", idxs, ndim=1, what="Tensor[N]", errors=e)
        if idxs.is_complex():      # torchvision takes any real dtype (idxs.to(boxes))
            raise e.dtype(f"idxs must be a real tensor, got {idxs.dtype}")
        if idxs.shape[0] != boxes.shape[0]:
            raise e.value(f"idxs must have one entry per box: got {idxs.shape[0]} idxs "
                          f"for {boxes.shape[0]} boxes")
        check_same_device(boxes=boxes, idxs=idxs)
    if isinstance(iou_threshold, torch.Tensor) and iou_threshold.numel() == 1:
        iou_threshold = iou_threshold.item()
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise e.dtype(f"iou_threshold must be a float, got {iou_threshold!r}")
    return float(iou_threshold)


# The mask losses' targets: float masks in [0, 1] or 0/1 uint8/bool masks.
TARGET_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.bool)


def check_labels(name: str, t, n: int) -> None:
    check_tensor(name, t, ndim=1, what="a 1-D (N,) tensor")  # no f-string: n may be symbolic
    check_integer(name, t)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per instance), got {t.shape[0]}")


def check_targets(name: str, t, shape: tuple[int, ...] | None) -> None:
    check_tensor(name, t, dtypes=TARGET_DTYPES)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_list(name: str, value, length: int | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per image), "
                        f"got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per image ({length}), got {len(value)}")
    return list(value)


def check_images(lead: dict[str, torch.Tensor], k: int, proposals, gt_masks, gt_labels,
                 mask_matched_idxs) -> tuple[list, list, list, list]:
    """Check torchvision's per-image loss arguments against the (N, ...) tensor ``lead``
    (its name and value) of K classes — shapes, dtypes and devices always; values (labels,
    matched indices, mask ranges, finite proposals) where :func:`values_checked` says —
    and return them as lists."""
    (name, t), = lead.items()
    proposals = _check_list("proposals", proposals, None)
    images = len(proposals)
    gt_masks = _check_list("gt_masks", gt_masks, images)
    gt_labels = _check_list("gt_labels", gt_labels, images)
    idxs = _check_list("mask_matched_idxs", mask_matched_idxs, images)
    for i in range(images):
        check_tensor(f"proposals[{i}]", proposals[i], ndim=2)
        if proposals[i].shape[1] != 4 or not proposals[i].is_floating_point():
            raise ValueError(f"proposals[{i}] must be a float Tensor[L, 4], got "
                             f"{proposals[i].dtype} of shape {tuple(proposals[i].shape)}")
        check_tensor(f"gt_masks[{i}]", gt_masks[i], ndim=3, dtypes=TARGET_DTYPES,
                     what="a 3-D (G, H, W) tensor")
        check_labels(f"gt_labels[{i}]", gt_labels[i], gt_masks[i].shape[0])
        check_labels(f"mask_matched_idxs[{i}]", idxs[i], proposals[i].shape[0])
        check_same_device(**{name: t}, **{
            f"proposals[{i}]": proposals[i], f"gt_masks[{i}]": gt_masks[i],
            f"gt_labels[{i}]": gt_labels[i], f"mask_matched_idxs[{i}]": idxs[i]})
    n = t.shape[0]
    if torch.compiler.is_compiling():
        torch._check(sum(p.shape[0] for p in proposals) == n,
                     lambda: f"{name} has one row per proposal")
    elif sum(p.shape[0] for p in proposals) != n:
        raise ValueError(f"{name} has {n} rows but the proposals hold "
                         f"{sum(p.shape[0] for p in proposals)} boxes")
    if n and values_checked(t):
        check_ranges(
            indices=[(f"gt_labels[{i}]", gt_labels[i], k) for i in range(images)]
            + [(f"mask_matched_idxs[{i}]", idxs[i], gt_masks[i].shape[0])
               for i in range(images)],
            unit=[(f"gt_masks[{i}]", gt_masks[i]) for i in range(images)],
            finite=[(f"proposals[{i}]", p) for i, p in enumerate(proposals)])
    return proposals, gt_masks, gt_labels, idxs


# ---------------------------------------------------------------------------------------
# The value-check policy: which calls read tensor data to check it (module docstring).

CHECK_VALUES_ENV = "KERNELS_CHECK_VALUES"
_CHECKS = threading.local()   # .skip: inside skip_data_checks; .cuda: inside check_values
# CUDA tensors' values are checked by default only with KERNELS_CHECK_VALUES=1 (read once,
# at import, as PyTorch reads its own settings from the environment)
CHECK_CUDA_VALUES = os.environ.get(CHECK_VALUES_ENV, "0").strip().lower() not in (
    "", "0", "false", "no", "off")


@contextlib.contextmanager
def check_values(enabled: bool = True):
    """Inside this block the public functions check the values of CUDA tensors too (batch
    indices, labels, matched indices, finite coordinates, mask ranges): each check is one
    host sync. CPU tensors are always checked. ``KERNELS_CHECK_VALUES=1`` in the
    environment does the same for the whole process; ``check_values(False)`` turns the
    CUDA checks off inside a block whatever the environment says."""
    before = getattr(_CHECKS, "cuda", None)
    _CHECKS.cuda = bool(enabled)
    try:
        yield
    finally:
        _CHECKS.cuda = before


@contextlib.contextmanager
def skip_data_checks():
    """Within this block the public functions read no tensor values at all, on any device:
    for callers whose inputs are valid by construction. Shapes, dtypes and devices are
    still checked; invalid values then give the kernels' defined results (zeros, ignored
    rows), never an out-of-bounds access."""
    before = getattr(_CHECKS, "skip", False)
    _CHECKS.skip = True
    try:
        yield
    finally:
        _CHECKS.skip = before


def capturing() -> bool:
    """True while the current CUDA stream captures a graph (a sync there would break it)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def values_checked(t: torch.Tensor) -> bool:
    """Whether a public function reads ``t``'s values to check them: a CPU tensor always; a
    CUDA tensor (or any tensor inside :func:`dry_run`) only inside :func:`check_values` or
    with KERNELS_CHECK_VALUES=1. Never inside :func:`skip_data_checks`, while torch.compile
    traces or while a CUDA graph is being captured."""
    if getattr(_CHECKS, "skip", False) or torch.compiler.is_compiling():
        return False
    if not gpu_path(t):
        return t.is_cpu      # (meta and other devices hold no values)
    on = getattr(_CHECKS, "cuda", None)
    if on is None:
        on = CHECK_CUDA_VALUES
    return on and not capturing()


def is_tracing() -> bool:
    """True where nothing may read tensor values: while torch.compile traces, inside
    :func:`skip_data_checks`, while a CUDA graph is being captured."""
    return (torch.compiler.is_compiling() or getattr(_CHECKS, "skip", False)
            or capturing())


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# The ops' device kernels: CPU and CUDA (is_cpu, is_cuda); meta and others: the op.


def eager(*tensors) -> bool:
    """True where a public function may call its device kernel directly (through a
    ``torch.autograd.Function`` where there is a gradient) instead of the custom op: not
    while torch.compile or torch.export traces, and only plain tensors (fake, functional
    and proxy tensors are subclasses: tracing that is not dynamo's goes through the op),
    on the devices the ops have kernels for (meta tensors get the op's fake). The
    dispatcher costs tens of microseconds a call in eager code."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN_TENSORS
                                            or not (t.is_cuda or t.is_cpu)):
            return False
    return True


# How far past [0, 1] a float target may stray (float32 rounding of bilinear weights).
_UNIT_SLACK = 1e-6


def check_ranges(indices=(), unit=(), finite=()) -> None:
    """Value checks in one read of the data. Callers decide whether to check
    (:func:`values_checked`); on CUDA this is one host sync.

    indices: (name, integer tensor, bound) — every value in [0, bound);
    unit: (name, mask tensor) — float values in [0, 1]; finite: (name, tensor).
    """
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
    if type(value) is int and value >= least:
        return value, value
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
            if isinstance(a, (list, tuple)):      # (a list of boxes: one level deep)
                for x in a:
                    if isinstance(x, Proxy):
                        return x
        return None

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxy = proxy_in((*args, *kwargs.values()))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)
    return leaf


# Inside dry_run: called as observer(kernel id, grid, runtime argument count) per launch.
observer: Callable[[str, tuple, int], None] | None = None


@contextlib.contextmanager
def dry_run(observer_fn: Callable[[str, tuple, int], None] | None = None):
    """Inside this block CPU tensors take the CUDA code path — the Triton launchers, the
    CUDA value-check policy, no CPU kernels — and no kernel runs: each launch calls
    ``observer_fn(kernel id, grid, runtime argument count)`` instead (outputs stay
    unwritten). ``python -m benchmarks.host`` reads a call's host cost this way on a
    machine without a GPU."""
    global _dry, observer
    previous = _dry, observer
    _dry, observer = True, observer_fn
    try:
        yield
    finally:
        _dry, observer = previous
