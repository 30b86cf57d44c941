"""Host cost of each public op call, ours beside torchvision's (or PyTorch's) same call.

    python -m benchmarks.host [--calls roi_align,nms] [--repeats 200] [--device cpu]
                              [--json PATH]

On a GPU a call of ours should cost the host what torchvision's same call costs
(DESIGN.md): no host sync unless the result's size needs one, no tensor operation beyond
what the op needs (each is a kernel launch, 5-10 us of host time), Triton launches with
few runtime arguments. For every call, forward and forward+backward where there is a
gradient, on tiny inputs (where host cost is all there is), this reads:

* host microseconds per call: the median over up to ``repeats`` calls, each timed alone,
  with no sync inside the timed loop (on CUDA, ``torch.cuda.synchronize()`` only before
  and after it), after a warm-up call;
* host syncs, tensor operations (every aten op the call dispatches, views included: each
  costs dispatcher time; the op names are kept) and, for ours, Triton launches and their
  runtime-argument counts — one counted call after the warm-up.

Two readings:

* on the CPU (no GPU), ours runs on the CUDA code path under ``kernels._utils.dry_run``:
  the Triton launchers, the CUDA value-check policy, no CPU kernels, and no kernel runs —
  each launch is observed instead, so ours' host time excludes the Triton launch itself
  (and includes zero-filling each fresh integer tensor: no kernel writes them, and host
  code may index with what a kernel would have written). The baseline runs for real on CPU tensors, on
  one thread: its time includes its CPU kernels' compute (small at these sizes). A host
  sync is a read of tensor data by the host — a syncing aten op (``_local_scalar_dense``,
  ``nonzero``, boolean-mask indexing, ...) or ``tolist()``, ``numpy()``, ``cpu()`` — of a
  tensor that would live on the GPU: one built by the host from Python numbers
  (``torch.tensor(2.0)``), and what is computed from such tensors alone, stays on the
  host and is read for free.
* on a GPU, both run for real on CUDA tensors; syncs are what
  ``torch.cuda.set_sync_debug_mode("warn")`` reports, and launches come from the dry run
  on CPU tensors (a real launch has no observer).

The op itself — ``torchvision::*`` and ``maskrcnn_triton::*``, the one dispatched op a
drop-in call amounts to, or in eager code our device kernel, which the public functions
call without the dispatcher (``kernels._utils.count_op_bodies`` marks it) — is not counted
as an extra operation, nor is what runs inside it, as torchvision's C++ kernels keep their
allocations out of sight; a sync inside it is counted. :func:`over_budget` holds each call to its budget (syncs:
none, one for NMS; operations: the baseline's plus two); ``tests/test_host.py`` checks it
on the CPU reading.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models.detection import roi_heads

import kernels
from benchmarks._common import default_device, environment, format_table
from benchmarks.bench_mask_loss import torch_mask_loss
from benchmarks.bench_mask_predictor_loss import (torch_predictor_loss,
                                                  torchvision_predictor_loss)
from kernels._utils import (count_op_bodies, dry_run, in_op_body)

# ---------------------------------------------------------------------------------------
# Counting host work

# The namespaces of "the op": one dispatched call, what a drop-in call amounts to.
OP_NAMESPACES = ("torchvision", "maskrcnn_triton")

# aten ops that read tensor values on the host (on CUDA: a sync): the first argument's
# values, or the value of a Python scalar. Composite ones (item, is_nonzero, argwhere, the
# one-argument where) reach a dispatch mode unexpanded below autograd, inside an op.
_READS_FIRST = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "argwhere", "nonzero_numpy",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount"})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_SYNC_WARNING = "called a synchronizing CUDA operation"


def op_name(func) -> str:
    """``empty.memory_format``, ``_local_scalar_dense``, ``torchvision::roi_align``."""
    name = func._schema.name
    if func._schema.overload_name:
        name += "." + func._schema.overload_name
    return name.removeprefix("aten::")


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


def synced_tensors(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors whose values ``func`` needs on the host (to size its output, or as a
    Python value): on CUDA, what it syncs on. Empty for an op that syncs on nothing."""
    name = func._schema.name.removeprefix("aten::")
    overload = func._schema.overload_name
    if name in _READS_FIRST or (name == "where" and overload == ""):
        return [args[0]]
    if name in ("equal", "allclose"):
        return [args[0], args[1]]
    if name == "masked_select":
        return [args[1]]
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        return {"Tensor": [args[0]], "self_Tensor": [args[1]]}.get(overload, [])
    if name == "histc":          # the range is read from the data when not given
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return [args[0]] if lo == hi else []
    if name in _INDEX_OPS:       # a boolean mask index: its count sizes the result
        return [i for i in args[1]
                if i is not None and i.dtype in (torch.bool, torch.uint8)]
    return []


@dataclass
class HostWork:
    """What a counted block did on the host: every aten op it dispatched outside the op
    itself (``ops``, with ``views`` among them), the op calls themselves (``op_calls``) and
    its host syncs, each named by what made it."""
    ops: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    op_calls: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)


class _Counter(TorchDispatchMode):
    """Records each dispatched op into a :class:`HostWork`. An op of ``op_namespaces`` is
    sent straight to its backend kernel with this mode pushed again, so a sync inside it
    (NMS reading its result size) is seen while its inner ops are not counted.

    Without ``cuda``, it also tracks which tensors live on the host whatever the device
    (``torch.tensor`` of Python numbers and what is computed from such tensors alone):
    reading those is no sync."""

    def __init__(self, work: HostWork, cuda: bool, op_namespaces: tuple[str, ...]):
        super().__init__()
        self.work = work
        self.cuda = cuda
        self.op_namespaces = op_namespaces
        self.caught: list[warnings.WarningMessage] = []
        self._labelled = 0
        self._inside = 0
        self._host: dict[int, Tensor] = {}  # id -> tensor, kept alive so ids stay unique

    def on_host(self, t: Tensor) -> bool:
        return id(t) in self._host

    def mark_host(self, t: Tensor) -> None:
        self._host[id(t)] = t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        if not self.cuda and any(not self.on_host(t)
                                 for t in synced_tensors(func, args, kwargs)):
            self.work.syncs.append(name)
        if func.namespace in self.op_namespaces:
            if not self._inside:
                self.work.op_calls.append(name)
            device = next((t.device for t in inputs if t.device.type != "cpu"),
                          inputs[0].device)   # a CPU scalar may ride along a CUDA op
            backend = torch._C.DispatchKeySet(
                getattr(torch._C.DispatchKey, device.type.upper()))
            self._inside += 1
            try:
                with self:
                    out = func.redispatch(backend, *args, **kwargs)
            finally:
                self._inside -= 1
        else:
            if not self._inside and not in_op_body():
                self.work.ops.append(name)
                if _is_view(func):
                    self.work.views.append(name)
            out = func(*args, **kwargs)
        if not self.cuda and (name == "lift_fresh" or (
                inputs and all(self.on_host(t) for t in inputs))):
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.mark_host(t)
        if self.cuda:
            self.label_syncs(name)
        return out

    def label_syncs(self, name: str) -> None:
        """Name the sync warnings caught since the last label after ``name``: the op that
        was running (the innermost one labels first)."""
        for w in self.caught[self._labelled:]:
            if _SYNC_WARNING in str(w.message):
                self.work.syncs.append(name)
        self._labelled = len(self.caught)


@contextlib.contextmanager
def _patched(owner, names: tuple[str, ...], wrap: Callable) -> Iterator[None]:
    """``owner.<name> = wrap(original, name)`` for each name inside the block (a method
    ``owner`` inherits is deleted again after, not copied onto it)."""
    saved = {name: vars(owner).get(name) for name in names}
    for name in names:
        setattr(owner, name, wrap(getattr(owner, name), name))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _host_reads(counter: _Counter):
    """Count the reads of tensor data that dispatch no syncing op on a CPU tensor:
    ``tolist()``, ``numpy()``; and ``cpu()``, which gives a host copy (a GPU's D2H copy:
    one sync, one op) whose later reads are free."""
    def reading(original: Callable, method: str) -> Callable:
        def read(t, *args, **kwargs):
            if counter.on_host(t):
                return original(t, *args, **kwargs)
            counter.work.syncs.append(f"Tensor.{method}")
            out = original(t, *args, **kwargs)
            if method == "cpu":
                out = out.clone() if out is t else out
                counter.mark_host(out)
            return out
        return read
    return _patched(torch.Tensor, ("tolist", "numpy", "cpu"), reading)


@contextlib.contextmanager
def count_host_work(cuda: bool = False,
                    op_namespaces: tuple[str, ...] = OP_NAMESPACES) -> Iterator[HostWork]:
    """Count the host work of the block: its tensor operations and host syncs.

    ``cuda``: the block runs on CUDA tensors, and its syncs are what
    ``torch.cuda.set_sync_debug_mode("warn")`` reports (the mode is restored after).
    Otherwise its tensors stand for CUDA ones and a sync is a read of their data.
    ``op_namespaces``: whose ops are "the op", not extra work (ops inside them neither).
    """
    work = HostWork()
    counter = _Counter(work, cuda, op_namespaces)
    with contextlib.ExitStack() as stack:
        if cuda:
            counter.caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        else:
            stack.enter_context(_host_reads(counter))
        stack.enter_context(count_op_bodies())
        stack.enter_context(counter)
        yield work
    if cuda:   # syncs outside any op: C++ copies, the autograd engine
        counter.label_syncs("(outside an aten op)")


# ---------------------------------------------------------------------------------------
# The calls


@dataclass(frozen=True)
class Call:
    """One public call and its baseline. ``inputs(device, grad)`` builds the arguments
    (the same values for every build; with ``grad``, the differentiable ones require it);
    ``ours`` and ``theirs`` bind them into a call with no arguments."""
    name: str
    baseline: str
    inputs: Callable[[str, bool], dict]
    ours: Callable[[dict], Callable[[], Tensor]]
    theirs: Callable[[dict], Callable[[], Tensor]]
    backward: bool = False


OUTPUT = (4, 4)     # RoI Align output
NAMES = ["0", "1", "2"]
CLASSES, M = 3, 8   # mask classes and mask size of the losses


def _boxes(g: torch.Generator, count: int, size: int) -> Tensor:
    xy = torch.rand(count, 2, generator=g) * size * 0.6
    return torch.cat([xy, xy + 1 + torch.rand(count, 2, generator=g) * size * 0.4], 1)


def _roi_inputs(device: str, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    boxes = [_boxes(g, 3, 16), _boxes(g, 2, 16)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate(boxes)])
    return {"x": x.to(device).requires_grad_(grad), "rois": rois.to(device),
            "boxes": [b.to(device) for b in boxes]}


def _pyramid_inputs(device: str, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 16 >> i, 16 >> i, generator=g) for i in range(len(NAMES))]
    x = {name: m.to(device).requires_grad_(grad) for name, m in zip(NAMES, maps)}
    return {"x": x, "boxes": [_boxes(g, 3, 64).to(device), _boxes(g, 2, 60).to(device)],
            "image_shapes": [(64, 64), (64, 60)]}


def _loss_inputs(device: str, grad: bool) -> dict:
    """Five instances over two 32x32 images: logits, the 1x1 predictor's features, weight
    and bias, soft targets and labels, and maskrcnn_loss's per-image arguments."""
    g = torch.Generator().manual_seed(0)
    n = 5

    def t(x: Tensor, differentiable: bool = False) -> Tensor:
        return x.to(device).requires_grad_(grad and differentiable)
    return {
        "logits": t(torch.randn(n, CLASSES, M, M, generator=g), True),
        "features": t(torch.randn(n, 4, M, M, generator=g), True),
        "weight": t(torch.randn(CLASSES, 4, 1, 1, generator=g), True),
        "bias": t(torch.randn(CLASSES, generator=g), True),
        "targets": t(torch.rand(n, M, M, generator=g)),
        "labels": t(torch.randint(0, CLASSES, (n,), generator=g)),
        "proposals": [t(_boxes(g, 3, 32)), t(_boxes(g, 2, 32))],
        "gt_masks": [t(torch.randint(0, 2, (2, 32, 32), generator=g, dtype=torch.uint8))
                     for _ in range(2)],
        "gt_labels": [t(torch.randint(1, CLASSES, (2,), generator=g)) for _ in range(2)],
        "matched": [t(torch.randint(0, 2, (3,), generator=g)),
                    t(torch.randint(0, 2, (2,), generator=g))],
    }


def _paste_inputs(device: str, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"masks": torch.rand(5, 1, M, M, generator=g).to(device),
            "boxes": _boxes(g, 5, 32).to(device)}


def _nms_inputs(device: str, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"boxes": _boxes(g, 32, 64).to(device),
            "scores": torch.rand(32, generator=g).to(device),
            "idxs": torch.randint(0, 3, (32,), generator=g).to(device)}


def _roi_align(fn, key: str):
    return lambda i: partial(fn, i["x"], i[key], OUTPUT, 1.0, 2, False)


def _pooler(cls):
    return lambda i: partial(cls(NAMES, OUTPUT, 2), i["x"], i["boxes"], i["image_shapes"])


def _mask_loss(fn):
    return lambda i: partial(fn, i["logits"], i["targets"], i["labels"])


def _maskrcnn_loss(fn):
    return lambda i: partial(fn, i["logits"], i["proposals"], i["gt_masks"], i["gt_labels"],
                             i["matched"])


def _predictor_loss(fn):
    return lambda i: partial(fn, i["features"], i["weight"], i["bias"], i["targets"],
                             i["labels"])


def _maskrcnn_predictor_loss(fn):
    return lambda i: partial(fn, i["features"], i["weight"], i["bias"], i["proposals"],
                             i["gt_masks"], i["gt_labels"], i["matched"])


def _paste(fn):
    return lambda i: partial(fn, i["masks"], i["boxes"], (32, 32))


def _with_grad(name: str, baseline: str, inputs, ours, theirs) -> list[Call]:
    return [Call(f"{name}.fwd", baseline, inputs, ours, theirs),
            Call(f"{name}.fwd_bwd", baseline, inputs, ours, theirs, backward=True)]


_TV_LOSS = "torchvision roi_heads.maskrcnn_loss"
_TV_ROI_ALIGN = "torchvision.ops.roi_align"
CALLS: list[Call] = [
    Call("roi_align.fwd", _TV_ROI_ALIGN, _roi_inputs, _roi_align(kernels.roi_align, "rois"),
         _roi_align(torchvision.ops.roi_align, "rois")),
    Call("roi_align.list.fwd", _TV_ROI_ALIGN, _roi_inputs,
         _roi_align(kernels.roi_align, "boxes"),
         _roi_align(torchvision.ops.roi_align, "boxes")),
    Call("roi_align.fwd_bwd", _TV_ROI_ALIGN, _roi_inputs,
         _roi_align(kernels.roi_align, "rois"),
         _roi_align(torchvision.ops.roi_align, "rois"), backward=True),
    *_with_grad("MultiScaleRoIAlign", "torchvision.ops.MultiScaleRoIAlign", _pyramid_inputs,
                _pooler(kernels.MultiScaleRoIAlign),
                _pooler(torchvision.ops.MultiScaleRoIAlign)),
    *_with_grad("mask_loss", "torch: gather + binary_cross_entropy_with_logits",
                _loss_inputs, _mask_loss(kernels.mask_loss), _mask_loss(torch_mask_loss)),
    *_with_grad("maskrcnn_loss", _TV_LOSS, _loss_inputs,
                _maskrcnn_loss(kernels.maskrcnn_loss),
                _maskrcnn_loss(roi_heads.maskrcnn_loss)),
    *_with_grad("mask_predictor_loss", "torch: conv2d + mask_loss's baseline", _loss_inputs,
                _predictor_loss(kernels.mask_predictor_loss),
                _predictor_loss(torch_predictor_loss)),
    *_with_grad("maskrcnn_predictor_loss", f"torch conv2d + {_TV_LOSS}", _loss_inputs,
                _maskrcnn_predictor_loss(kernels.maskrcnn_predictor_loss),
                _maskrcnn_predictor_loss(torchvision_predictor_loss)),
    Call("paste_masks_in_image", "torchvision roi_heads.paste_masks_in_image",
         _paste_inputs, _paste(kernels.paste_masks_in_image),
         _paste(roi_heads.paste_masks_in_image)),
    Call("nms", "torchvision.ops.nms", _nms_inputs,
         lambda i: partial(kernels.nms, i["boxes"], i["scores"], 0.5),
         lambda i: partial(torchvision.ops.nms, i["boxes"], i["scores"], 0.5)),
    Call("batched_nms", "torchvision.ops.batched_nms", _nms_inputs,
         lambda i: partial(kernels.batched_nms, i["boxes"], i["scores"], i["idxs"], 0.5),
         lambda i: partial(torchvision.ops.batched_nms, i["boxes"], i["scores"], i["idxs"],
                           0.5)),
]

# ---------------------------------------------------------------------------------------
# Budgets

# Host syncs a call may make on a GPU (DESIGN.md): none, unless the result's size needs
# one — NMS reads the count of kept boxes once.
SYNCS_ALLOWED = {"nms": 1, "batched_nms": 1}
# Tensor operations a call may make beyond its baseline's: room for an output allocation
# or a cast that the baseline's C++ op makes out of the counter's sight.
EXTRA_OPS_ALLOWED = 2


def budget(row: dict) -> dict:
    """The syncs and tensor operations ``row``'s call of ours may make (None: the baseline
    could not be counted, so neither can its budget)."""
    base = row.get("baseline_ops")
    return {"syncs": SYNCS_ALLOWED.get(row["call"], 0),
            "ops": None if base is None else base + EXTRA_OPS_ALLOWED}


def over_budget(rows: list[dict]) -> list[str]:
    """One line per violation: the call, what it counted against its budget, and the
    counted syncs or operations by name. A call that could not be measured is one too."""
    out = []
    for row in rows:
        if row.get("error"):
            out.append(f"{row['call']}: not measured: {row['error']}")
            continue
        allowed = budget(row)
        if row["ours_syncs"] > allowed["syncs"]:
            out.append(f"{row['call']}: {row['ours_syncs']} host syncs, budget "
                       f"{allowed['syncs']} (baseline {row['baseline_syncs']}): "
                       f"{row['ours_sync_names']}")
        if row["ours_ops"] > allowed["ops"]:
            out.append(f"{row['call']}: {row['ours_ops']} tensor ops, budget "
                       f"{allowed['ops']} (baseline {row['baseline_ops']} + "
                       f"{EXTRA_OPS_ALLOWED}): "
                       f"{row['ours_op_names']} (baseline: {row['baseline_op_names']})")
    return out


# ---------------------------------------------------------------------------------------
# Measuring


def _step(call: Call, bind: Callable[[dict], Callable[[], Tensor]],
          inputs: dict) -> Callable[[], object]:
    """The counted and timed unit: the call, then with ``backward`` ``.sum().backward()``
    (a loss's own ``.backward()``) from gradients reset to None, so every step's backward
    is the first (no accumulation into .grad)."""
    fn = bind(inputs)
    if not call.backward:
        return fn
    leaves = [t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        (out if out.dim() == 0 else out.sum()).backward()
    return step


def _host_us(step: Callable[[], object], repeats: int, cuda: bool,
             seconds: float = 1.0) -> float:
    """Median host microseconds of ``step``, each call timed alone, over ``repeats`` calls
    or as many as fit ``seconds`` (at least 5); no sync inside the loop."""
    gc.collect()
    gc.disable()
    try:
        if cuda:
            torch.cuda.synchronize()
        times, stop = [], time.perf_counter() + seconds
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            if t0 > stop and len(times) >= 5:
                break
        if cuda:
            torch.cuda.synchronize()
    finally:
        gc.enable()
    return statistics.median(times) * 1e6


def _launch_observer(launches: list[dict]) -> Callable[[str, tuple, int], None]:
    def observe(kernel: str, grid: tuple, runtime_args: int) -> None:
        launches.append({"kernel": kernel, "grid": list(grid),
                         "runtime_args": runtime_args})
    return observe


@contextlib.contextmanager
def _dry(observer: Callable[[str, tuple, int], None] | None = None) -> Iterator[None]:
    """``dry_run(observer)`` with every fresh integer tensor zero-filled: no kernel writes
    its outputs, and host code that indexes with one (``mask_predictor_loss``'s backward
    index_adds by the labels its forward kernel wrote) must find valid values, not garbage
    that fails one run in many (float garbage indexes nothing). The fill is hidden from the
    counter; the wrapper costs ours' µs about 0.3 µs per integer allocation on this CPU."""
    def zeroed(allocate: Callable, _name: str) -> Callable:
        def allocate_zeroed(*args, **kwargs):
            t = allocate(*args, **kwargs)
            if t.is_floating_point():
                return t
            if torch._C._len_torch_dispatch_stack():    # the counter is on: hide the fill
                with torch._C._DisableTorchDispatch():
                    t.zero_()
            else:
                t.zero_()
            return t
        return allocate_zeroed

    with (_patched(torch, ("empty", "empty_like", "empty_strided"), zeroed),
          _patched(torch.Tensor, ("new_empty", "new_empty_strided"), zeroed),
          dry_run(observer)):
        yield


def _dry_launches(step: Callable[[], object]) -> list[dict]:
    """The Triton launches of one call of ``step`` (on CPU tensors) on the dry run's CUDA
    code path, after a warm-up call."""
    launches: list[dict] = []
    with _dry(_launch_observer(launches)):
        step()
        launches.clear()
        step()
    return launches


def _side(call: Call, side: str, device: str, repeats: int) -> dict:
    """One side's reading of ``call``: counts of one call after a warm-up, then its time.
    Ours' launches come from its dry run, that of the CPU reading or one of its own."""
    cuda = device == "cuda"
    step = _step(call, call.ours if side == "ours" else call.theirs,
                 call.inputs(device, call.backward))
    dry = side == "ours" and not cuda
    launches: list[dict] = []
    with _dry(_launch_observer(launches)) if dry else contextlib.nullcontext():
        step()
        launches.clear()
        with count_host_work(cuda) as work:
            step()
    out = {"syncs": len(work.syncs), "ops": len(work.ops),
           "ops_no_views": len(work.ops) - len(work.views), "sync_names": work.syncs,
           "op_names": work.ops, "op_calls": work.op_calls}
    if side == "ours":
        out["launch_list"] = launches if dry else _dry_launches(
            _step(call, call.ours, call.inputs("cpu", call.backward)))
    if repeats:
        with _dry() if dry else contextlib.nullcontext():
            out["us"] = _host_us(step, repeats, cuda)
    return out


_ROOT = Path(__file__).resolve().parents[1]


def _error(side: str, e: BaseException) -> str:
    """``side: Error: message (file:line)``, at the innermost frame in this repository
    (where the call went wrong, not the library frame that raised)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_ROOT)
            and "site-packages" not in Path(f.filename).parts]
    frame = (ours or frames)[-1]
    where = Path(frame.filename).resolve()
    where = where.relative_to(_ROOT) if where.is_relative_to(_ROOT) else where.name
    return f"{side}: {type(e).__name__}: {e} ({where}:{frame.lineno})"[:1000]


def measure(calls: list[str] | None = None, repeats: int = 200,
            device: str | None = None) -> list[dict]:
    """One row per call: host µs (``repeats`` 0: not timed), syncs, tensor ops (all, and
    without views) and their names for ours and the baseline, and ours' Triton launches
    (count, the most runtime arguments of one, each launch). ``calls``: names or families
    (``roi_align`` selects every ``roi_align.*`` call); default all. ``device``: "cpu" (the
    dry-run reading) or "cuda"; default "cuda" when present. A call that raises gets an
    ``error`` instead of counts."""
    device = device or default_device()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available")
    if not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats must be an int >= 0, got {repeats!r}")
    chosen = select(calls)
    # One CPU thread on the CPU reading: at these sizes the baseline's kernels gain nothing
    # from OpenMP's team, and on a shared CPU its barriers turned 15 µs into 6 ms.
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return [_row(call, device, repeats) for call in chosen]
    finally:
        torch.set_num_threads(threads)


def _row(call: Call, device: str, repeats: int) -> dict:
    row: dict = {"call": call.name, "baseline": call.baseline,
                 "reading": "dry run" if device == "cpu" else "cuda"}
    for side, key in (("ours", "ours"), ("theirs", "baseline")):
        try:
            got = _side(call, side, device, repeats)
        except Exception as e:
            row["error"] = "; ".join(filter(None, [row.get("error"), _error(key, e)]))
            continue
        for k, v in got.items():
            row[f"{key}_{k}"] = v
    launches = row.pop("ours_launch_list", None)
    if launches is not None:
        row["launches"] = len(launches)
        row["runtime_args"] = max((x["runtime_args"] for x in launches), default=0)
        row["launch_list"] = launches
    if row.get("ours_us") and row.get("baseline_us"):
        row["ratio"] = row["ours_us"] / row["baseline_us"]
    return row


def select(names: list[str] | None) -> list[Call]:
    """The calls named (a family name, the text before the first dot, selects them all)."""
    if names is None:
        return list(CALLS)
    known = {c.name for c in CALLS} | {c.name.split(".")[0] for c in CALLS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown call(s) {unknown}; choose from {sorted(known)}")
    return [c for c in CALLS if c.name in names or c.name.split(".")[0] in names]


# ---------------------------------------------------------------------------------------
# Reporting

COLUMNS = {"call": "call", "ours_us": "ours µs", "baseline_us": "baseline µs",
           "ratio": "ratio", "ours_syncs": "ours syncs", "baseline_syncs": "baseline syncs",
           "ours_ops": "ours ops", "baseline_ops": "baseline ops", "launches": "launches",
           "runtime_args": "runtime args (max)"}


def notes(reading: str) -> list[str]:
    """How the numbers of a reading were taken (the report prints them above the table)."""
    if reading == "dry run":
        how = ["No GPU: ours ran on the CUDA code path as a dry run "
               "(kernels._utils.dry_run): its µs exclude the Triton launch itself and "
               "include zero-filling each fresh integer tensor; the baseline ran "
               "for real on CPU tensors, its µs include its CPU kernels.",
               "Syncs: reads of tensor data by the host (syncing aten ops, "
               "tolist/numpy/cpu) of tensors that would live on the GPU."]
    else:
        how = ["Both ran on CUDA; µs with no sync inside the timed loop. Syncs: what "
               "torch.cuda.set_sync_debug_mode('warn') reports. Launches: from the dry run "
               "on CPU tensors."]
    return how + ["Ops: every aten op dispatched outside the op itself (torchvision::*, "
                  "maskrcnn_triton::*), views included (the JSON also has them without: "
                  "`*_ops_no_views`, and each op's name); budget: syncs 0 (NMS 1), ops the "
                  f"baseline's + {EXTRA_OPS_ALLOWED}. Ratio: ours µs / baseline µs."]


def markdown(rows: list[dict]) -> str:
    """The table, its notes, the calls over budget and the calls that raised."""
    out = [f"- {n}" for n in notes(rows[0]["reading"] if rows else "dry run")] + [""]
    out.append(format_table([{COLUMNS[k]: r.get(k) for k in COLUMNS} for r in rows],
                            list(COLUMNS.values())))
    over = over_budget(rows)
    if over:
        out += ["", "Over budget:", ""] + [f"- {line}" for line in over]
    return "\n".join(out)


def report_section(device: str, tiny: bool = False) -> dict:
    """The benchmark report's host section (``python -m benchmarks``): rows, or the error
    that stopped the reading. ``tiny``: one timed repeat."""
    try:
        return {"rows": measure(repeats=1 if tiny else 200, device=device)}
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", default=None,
                   help="comma-separated calls or families (the text before the first dot) "
                        f"of {','.join(c.name for c in CALLS)}")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per side, at most")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = p.parse_args(argv)
    device = a.device or default_device()
    try:
        rows = measure(a.calls.split(",") if a.calls else None, a.repeats, device)
    except ValueError as e:
        p.error(str(e))
    env = environment(device)
    print(f"# Host cost per call: {env['device']}\n\ntorch {env['torch']}, triton "
          f"{env['triton']}, torchvision {env['torchvision']}, git {env['git_sha']}\n")
    print(markdown(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=1,
                                     default=str) + "\n")
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
