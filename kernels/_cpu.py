"""The CPU path: where a faster CPU kernel computes our op's result, it runs instead of the
reference (decided per op and dtype from the CPU benchmark; the references stay the oracle).

* torchvision's C++ kernels, which compute in float32/float64 (float16/bfloat16 inputs are
  upcast to float32 and the result rounded once, as our kernels and references do): RoI
  Align forward and backward (``pick_path(cpu=...)`` in its custom ops: their loops beat our
  sparse matrix product at every benchmarked shape), run from a thread pool (torchvision's
  runs on one thread): the forward on slices of the RoIs, the backward on groups of
  images and ranges of channels, each part copied into the gradient by its thread;
  MultiScaleRoIAlign as torchvision computes it, roi_align per level, every
  level's parts in one pass over the pool forward and backward (no flat gradient buffer:
  that buffer serves the GPU's single launch and costs a copy here); NMS on chunks of its
  score order, each cleared first of what the boxes already kept suppress (its result:
  ``_chunked_nms``), and batched_nms's calls (offset boxes or per class, as torchvision
  makes them) from the same pool.
* PyTorch's operations for ``mask_loss`` / ``maskrcnn_loss`` (targets: torchvision's
  roi_align of the gt masks, by chunks of masks from the pool): the BCE's terms from
  vectorized sigmoid and log (PyTorch's own ``log_sigmoid`` runs a scalar ``log1p``), its
  backward after the forward (no gradient-in-forward, which saves the GPU a pass but
  wastes one here when only the forward runs). The public functions call these autograd
  forms instead of the custom op.
* The fused predictor losses: the reference's products on chunks of instances in one
  reused buffer (no map-sized float32 copy of the features, no map-sized float32 gradient).

The one-pass paste has no faster CPU form with the same result: it stays on the reference.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from . import reference
from ._boxes import IoUWork, iou_over, iou_rows
from ._sampling import Pyramid, image_rows
from ._utils import compute_dtype, is_channels_last, is_tracing, memory_format, record_path


# torchvision's CPU RoI Align runs on one thread. Ours runs the same kernel from a thread
# pool (its C++ releases the GIL) on up to ROI_CHUNKS parts of the work at once: the
# forward on slices of the RoIs, the backward on groups of images, split by channels where
# there are fewer images than parts (a RoI adds only into its own image, and each
# channel's sums only into that channel). Either way each part
# is torchvision's own computation, so the result is torchvision's, bit for bit, with any
# number of threads.
ROI_CHUNKS = 4
# Bilinear samples below which a part is not worth a thread: 8 RoIs of a box head (256
# channels, 7x7 bins of 2x2 samples), 2 of a mask head (14x14). Counted in samples, not
# RoIs: a level of 11 mask-head RoIs in one part made MultiScaleRoIAlign's 16-RoI inference
# 0.7x torchvision, and mask targets (1 channel, adaptive grids) are cheap per RoI.
PART_SAMPLES = 8 * 256 * 7 * 7 * 4
# A sample's position and weights cost torchvision's kernel about what two channels' reads
# cost (measured here: 8 ns a sample at one channel, 3 ns more a channel), so a sample counts
# channels + SAMPLE_WEIGHTS: mask targets (one channel) take two threads at 64 RoIs an image.
SAMPLE_WEIGHTS = 2
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _in_pool(fn: Callable, items) -> list:
    """``[fn(item) for item in items]``, from the thread pool where torch may use more than
    one thread (torchvision's kernels release the GIL).

    Callers run below autograd (custom-op bodies, NMS); the pool's threads do not inherit
    that thread-local state, so ``fn`` runs there without grad (else torchvision's kernels
    would record a graph nobody uses). A forked child inherits the pool object but not its
    threads: it gets a pool of its own."""
    global _pool, _pool_pid
    items = list(items)
    if min(len(items), torch.get_num_threads()) < 2:
        return [fn(item) for item in items]
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=max(ROI_CHUNKS, NMS_GROUPS),
                                   thread_name_prefix="kernels-cpu", initializer=_one_thread)
        _pool_pid = os.getpid()

    def no_grad(item):
        with torch.no_grad():
            return fn(item)
    return list(_pool.map(no_grad, items))


@functools.cache
def _openmp():
    """The OpenMP runtime torch runs on (ctypes; found among the process's mapped
    libraries, Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    for name in ("libgomp", "libiomp5", "libomp"):
        for path in sorted(paths):
            if os.path.basename(path).startswith(name + "."):
                return ctypes.CDLL(path)
    return None


def _one_thread() -> None:
    """A pool thread's start: its torch operations run on one OpenMP thread. Left at the
    default, each pool thread's first parallel operation builds an OpenMP team of its own;
    libgomp then manages more threads than there are CPUs and makes every team sleep
    between parallel regions instead of spinning: the main thread's small parallel
    operations ran 6x slower for the rest of the process (a 400 x 256 elementwise op 0.02
    -> 0.12 ms; the CPU nms at 1,000 boxes 2 -> 4 ms once roi_align had run). Set on this
    thread only (torch.set_num_threads would change the count every new thread starts
    with)."""
    torch.get_num_threads()     # torch's own per-thread set-up first: it sets the count
    omp = _openmp()
    if omp is not None:
        omp.omp_set_num_threads(1)


def _samples(rois: Tensor, channels: int, pooled_h: int, pooled_w: int,
             spatial_scale: float, sampling_ratio: int) -> int:
    """About how many bilinear samples torchvision's kernel takes over ``rois`` (finite:
    after :func:`_safe_rois`; its adaptive grid: the bin size rounded up)."""
    if sampling_ratio > 0:
        grid = sampling_ratio * sampling_ratio * rois.shape[0]
    else:
        size = ((rois[:, 3:5] - rois[:, 1:3]) * spatial_scale).clamp(min=1)
        grid = int((torch.ceil(size[:, 0] / pooled_w) * torch.ceil(size[:, 1] / pooled_h)).sum())
    return grid * (channels + SAMPLE_WEIGHTS) * pooled_h * pooled_w


def _part_count(samples: int) -> int:
    """How many parts work of ``samples`` samples goes into: up to ROI_CHUNKS and torch's
    thread count, each of at least PART_SAMPLES samples; at least one."""
    return max(1, min(ROI_CHUNKS, torch.get_num_threads(), samples // PART_SAMPLES))


def _ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` [lo, hi) ranges splitting ``total`` rows evenly, in order."""
    return [(total * i // count, total * (i + 1) // count) for i in range(count)]


def _nchw(maps: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``maps`` in ``dtype`` and contiguous (NCHW), as torchvision's CPU kernels read them:
    they copy a channels_last map to that on every call, so calls on RoI slices would copy
    it once per slice, and a call in the pool on one thread. Copied here once, by channel
    ranges, in one pass over the pool (a parallel copy on the main thread would leave its
    OpenMP workers spinning on the pool's cores: see _target_chunks)."""
    copy = [not x.is_contiguous() for x in maps]
    out = [torch.empty(x.shape, dtype=dtype) if c else x.to(dtype) for x, c in zip(maps, copy)]
    width = min(ROI_CHUNKS, torch.get_num_threads())
    tasks = [(i, lo, hi) for i, x in enumerate(maps) if copy[i]
             for lo, hi in _ranges(x.shape[1], width)]

    def part(task) -> None:
        i, lo, hi = task
        out[i][:, lo:hi].copy_(maps[i][:, lo:hi])
    if tasks:
        _in_pool(part, tasks)
    return out


def _safe_rois(rois: Tensor, images: int) -> tuple[Tensor, Tensor | None]:
    """RoIs torchvision's kernel can take, and the rows that were not (None: every row is):
    a non-finite value or a batch index outside [0, images), which only the skipped data
    checks (skip_data_checks, direct custom-op calls) let through, crash its kernel (NaN
    sizes its sampling grid) or read out of bounds. They become empty boxes on image 0, and
    pool nothing, as on the Triton path."""
    bad = ~torch.isfinite(rois).all(1) | (rois[:, 0] < 0) | (rois[:, 0] >= images)
    if not bool(bad.any()):
        return rois, None
    return rois.masked_fill(bad[:, None], 0.0), bad


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    cdt = compute_dtype(input.dtype)
    (x,), (r, bad) = _nchw([input], cdt), _safe_rois(rois.to(cdt), input.shape[0])
    count = _part_count(_samples(r, x.shape[1], pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio))
    if count == 1:
        out = torch.ops.torchvision.roi_align(x, r, spatial_scale, pooled_h, pooled_w,
                                              sampling_ratio, aligned)
    else:
        out = x.new_empty(r.shape[0], x.shape[1], pooled_h, pooled_w)

        def part(lo_hi: tuple[int, int]) -> None:     # each thread copies its slice in
            out[lo_hi[0]:lo_hi[1]] = torch.ops.torchvision.roi_align(
                x, r[lo_hi[0]:lo_hi[1]], spatial_scale, pooled_h, pooled_w, sampling_ratio,
                aligned)
        _in_pool(part, _ranges(r.shape[0], count))
    if bad is not None:
        out[bad] = 0
    return out.to(input.dtype)


def _image_backward(grad: Tensor, rois: Tensor, rows: Tensor | None, images: tuple[int, int],
                    channels: tuple[int, int], n: int, spatial_scale: float, pooled_h: int,
                    pooled_w: int, sampling_ratio: int, aligned: bool,
                    shape: tuple[int, int]) -> Tensor:
    """torchvision's backward into images [lo, hi) of n and channels [c0, c1) of an (H, W)
    ``shape`` map, from the RoIs ``rois[rows]`` (every row when None) and their output
    gradients ``grad[rows]``: a RoI adds only into its own image, and each channel's sums
    only into that channel, so this is torchvision's own sums, in its order (the same
    bits)."""
    (lo, hi), (c0, c1) = images, channels
    g = grad[:, c0:c1]                      # a view: torchvision's kernel reads strides
    g, r = (g, rois) if rows is None else (g[rows], rois[rows])
    if (lo, hi) != (0, n):
        on = torch.where((r[:, 0] >= lo) & (r[:, 0] < hi))[0]
        g, r = g[on], r[on]                 # copies: the shift is theirs
        r[:, 0] -= lo
    return torch.ops.torchvision._roi_align_backward(
        g, r, spatial_scale, pooled_h, pooled_w, hi - lo, c1 - c0, *shape, sampling_ratio,
        aligned)


def _backward_parts(n: int, c: int, count: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(images, channels) ranges of ``count`` parts of an (n, c, H, W) gradient: groups of
    images, each split by channels where there are fewer images than parts (one image:
    torchvision's scatter on one thread was the whole backward)."""
    groups = min(n, count)
    return [(images, channels) for images in _ranges(n, groups)
            for channels in _ranges(c, max(1, count // groups))]


def _map_gradients(maps: list[tuple], jobs: list[tuple], part: Callable) -> list[Tensor]:
    """Each map's gradient, in the map's dtype and layout, from the pool: ``maps`` holds
    each map's ((n, c, h, w), dtype, channels_last), ``jobs`` (map, images, channels)
    ranges and ``part(job)`` computes one job's float gradient. A map of several parts gets
    its buffer here, and each thread copies its part in (no cat of the parts on the main
    thread, whose parallel copy left OpenMP workers spinning on the pool's cores)."""
    counts = [sum(1 for job in jobs if job[0] == i) for i in range(len(maps))]
    outs = [None if k == 1 else torch.empty(shape, dtype=dtype, memory_format=(
        torch.channels_last if channels_last else torch.contiguous_format))
        for k, (shape, dtype, channels_last) in zip(counts, maps)]

    def run(job) -> Tensor | None:
        i, (lo, hi), (c0, c1) = job
        g = part(job)
        if outs[i] is None:     # the map's one part: its dtype and layout, in the pool
            _, dtype, channels_last = maps[i]
            g = g.to(dtype)
            return g.contiguous(memory_format=torch.channels_last) if channels_last else g
        outs[i][lo:hi, c0:c1] = g
        return None
    done = _in_pool(run, jobs)
    for job, g in zip(jobs, done):
        if g is not None:
            outs[job[0]] = g
    return outs


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    """torchvision's backward in parts of images and channels (:func:`_image_backward`):
    the parts' gradients never overlap (no buffer per part of the map's size to add up)."""
    n, c, h, w = input_shape
    cdt = compute_dtype(grad.dtype)
    g, (r, bad) = grad.to(cdt).contiguous(), _safe_rois(rois.to(cdt), n)
    if bad is not None:
        g = g.masked_fill(bad[:, None, None, None], 0.0)
    count = _part_count(_samples(r, c, pooled_h, pooled_w, spatial_scale, sampling_ratio))
    (out,) = _map_gradients(
        [(input_shape, grad.dtype, channels_last)],
        [(0, *part) for part in _backward_parts(n, c, count)],
        lambda job: _image_backward(g, r, None, job[1], job[2], n, spatial_scale, pooled_h,
                                    pooled_w, sampling_ratio, aligned, (h, w)))
    return out


def multiscale_roi_align(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                         pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """torchvision's MultiScaleRoIAlign computation: levels, then roi_align per level, half
    types upcast to float32 and the result rounded once. Eager, by :class:`_MultiScale`
    (every level at once over the pool, forward and backward); while tracing, per level
    through our op (torch.compile traces the op, not a pool)."""
    dtype = features[0].dtype
    cdt = compute_dtype(dtype)
    levels = pyramid.levels(rois, cdt)
    if not is_tracing():
        return _MultiScale.apply(rois, levels, pyramid.scales, pooled_h, pooled_w,
                                 sampling_ratio, *features)
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], pooled_h, pooled_w,
                                dtype=cdt)
    for lvl, f in enumerate(features):
        idx = torch.where(levels == lvl)[0]
        out[idx] = torch.ops.maskrcnn_triton.roi_align(      # in place, as torchvision
            f.to(cdt), rois[idx].to(cdt), pyramid.scales[lvl], pooled_h, pooled_w,
            sampling_ratio, False)
    return out.to(dtype)


class _MultiScale(torch.autograd.Function):
    """MultiScaleRoIAlign as torchvision's, each level's part torchvision's kernel (its
    bits), every level's parts in one pass over the pool: forward, slices of each level's
    RoIs (each thread writes its rows in); backward, each level's gradient per group of
    images (:func:`_image_backward`). torchvision's runs the levels one after another on one
    thread, and its autograd, level by level, the same."""

    @staticmethod
    def forward(ctx, rois: Tensor, levels: Tensor, scales: tuple[float, ...], pooled_h: int,
                pooled_w: int, sampling_ratio: int, *features: Tensor) -> Tensor:
        dtype = features[0].dtype
        cdt = compute_dtype(dtype)
        maps = _nchw(features, cdt)
        r, bad = _safe_rois(rois.to(cdt), features[0].shape[0])
        pooled = levels if bad is None else levels.masked_fill(bad, -1)
        per_level = [torch.where(pooled == lvl)[0] for lvl in range(len(maps))]
        channels = features[0].shape[1]
        # no new_zeros: nothing parallel on the main thread around the pool's work (see
        # _target_chunks); the rows no level pools are zeroed after
        out = maps[0].new_empty(rois.shape[0], channels, pooled_h, pooled_w)
        tasks = []                  # (level, RoI indices): slices as roi_align_forward's
        for lvl, idx in enumerate(per_level):
            count = _part_count(_samples(r[idx], channels, pooled_h, pooled_w, scales[lvl],
                                         sampling_ratio))
            tasks += [(lvl, idx[lo:hi]) for lo, hi in _ranges(idx.numel(), count) if hi > lo]

        def part(task) -> None:     # each thread writes its rows in
            lvl, idx = task
            out[idx] = torch.ops.torchvision.roi_align(
                maps[lvl], r[idx], scales[lvl], pooled_h, pooled_w, sampling_ratio, False)
        _in_pool(part, tasks)
        if sum(idx.numel() for idx in per_level) < rois.shape[0]:
            out[pooled < 0] = 0
        ctx.save_for_backward(r, *per_level)
        ctx.args = (scales, pooled_h, pooled_w, sampling_ratio)
        ctx.maps = [(f.shape, f.dtype, is_channels_last(f)) for f in features]
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        record_path("multiscale_roi_align_backward", "torchvision")
        r, *per_level = ctx.saved_tensors
        scales, pooled_h, pooled_w, sampling_ratio = ctx.args
        cdt = compute_dtype(grad.dtype)
        g = grad.to(cdt).contiguous()
        jobs = []                   # (level, images, channels): every level's parts
        for lvl, ((n, c, h, w), _, _) in enumerate(ctx.maps):
            count = _part_count(_samples(r[per_level[lvl]], c, pooled_h, pooled_w,
                                         scales[lvl], sampling_ratio))
            jobs += [(lvl, *part) for part in _backward_parts(n, c, count)]

        def part(job) -> Tensor:
            lvl, images, channels = job
            n, _, h, w = ctx.maps[lvl][0]
            return _image_backward(g, r, per_level[lvl], images, channels, n, scales[lvl],
                                   pooled_h, pooled_w, sampling_ratio, False, (h, w))
        grads = _map_gradients(ctx.maps, jobs, part)
        return (None,) * 6 + tuple(grads)


def nms_wins(boxes: Tensor, scores: Tensor) -> bool:
    """torchvision's nms computes our result for this call: IoU in float32 (float64 for
    float64 boxes), the scores held exactly in that dtype."""
    return compute_dtype(boxes.dtype) == torch.float64 or scores.dtype != torch.float64


# torchvision's CPU nms visits, for every box it keeps, every later box not yet suppressed:
# O(N x kept) scalar IoUs on one thread. Ours calls the same kernel on chunks of NMS_CHUNK
# boxes in its score order (its stable sort), each chunk first cleared of the boxes that a
# box kept from an earlier chunk overlaps by more than the threshold (one vectorized IoU
# matrix, torchvision's arithmetic: iou_over). A box is kept iff no box kept before it
# overlaps it that much, whichever call looks: torchvision's result, ties included, with
# its long scans turned into matrices (2-core x86: 1k boxes about 2x, 5k 1.5-2x, 20k 3x).
NMS_CHUNK = 256


def _chunked_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms(boxes, scores, iou_threshold)``, chunk by chunk."""
    n = boxes.shape[0]
    if n <= 2 * NMS_CHUNK:          # (a second, short chunk would not pay for its matrix)
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)
    order = torch.sort(scores, stable=True, descending=True)[1]     # torchvision's order
    rows, threshold = iou_rows(boxes, iou_threshold)     # (boxes: already that dtype)
    kept, kept_rows = [], rows[:, :0]
    work = IoUWork(rows.dtype)
    for lo in range(0, n, NMS_CHUNK):
        chunk = order[lo:lo + NMS_CHUNK]
        if kept:
            r = rows.index_select(1, chunk)
            over = iou_over(kept_rows, kept_rows[4], r, r[4], threshold, work)
            chunk = chunk[~over.amax(0)]
        if chunk.numel():           # (a subset in score order: its stable sort keeps it)
            kept.append(chunk[torch.ops.torchvision.nms(boxes[chunk], scores[chunk],
                                                        iou_threshold)])
            kept_rows = torch.cat([kept_rows, rows.index_select(1, kept[-1])], 1)
    return torch.cat(kept)


def nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    """torchvision's nms (``idxs`` None) or batched_nms result, on the compute dtype."""
    cdt = compute_dtype(boxes.dtype)
    boxes, scores = boxes.to(cdt), scores.to(cdt)
    if idxs is None:
        return _chunked_nms(boxes, scores, iou_threshold)
    return _batched_nms(boxes, scores, idxs, iou_threshold)


# torchvision's CPU batched_nms runs, up to 4,000 coordinates (1,000 boxes), one nms over
# every box with the classes offset apart ("coordinate trick"), and past that one nms per
# class, one class after another. Ours makes the same calls, each chunked as above: on the
# offset boxes, one call per run of whole classes (which cuts the O(N x kept) work by the
# run count) where `_offsets_apart` says the offset classes never overlap (else one call
# over them all); per class, from the thread pool, the classes split into up to
# NMS_GROUPS groups of about equal box counts. The parts merge in torchvision's order:
# the same result.
NMS_GROUPS = 4
_PER_CLASS_NUMEL = 4000   # torchvision's CPU switch to one nms per class (boxes.numel() >)


def _class_groups(counts: list[int], groups: int) -> list[list[int]]:
    """Whole classes per group, the largest first, each onto the group with the fewest
    boxes so far."""
    load, members = [0] * groups, [[] for _ in range(groups)]
    for c, count in sorted(enumerate(counts), key=lambda cc: -cc[1]):
        g = load.index(min(load))
        members[g].append(c)
        load[g] += count
    return members


def _offsets_apart(boxes: Tensor, idxs: Tensor, iou_threshold: float) -> bool:
    """torchvision's offset boxes (``boxes`` before the offsets) of different classes never
    suppress each other: the coordinates are at least 0, so a class's boxes lie in
    [offset, offset + top], the offsets (class times ``top + 1``, rounded) stay at least
    ``top`` apart (2 max|class| (top + 1) times the unit roundoff is at most 1), and an
    IoU of 0 is not over the threshold."""
    low, top = torch.aminmax(boxes)
    classes = float(idxs.to(boxes).abs().max())
    return (iou_threshold >= 0 and float(low) >= 0
            and 2 * classes * (float(top) + 1) * torch.finfo(boxes.dtype).eps / 2 <= 1)


# Past 1,000 boxes, many small classes cost the per-class calls Python and dispatch per
# class (80 classes: about 70 us each). Ours then takes every class at once while the
# largest class has at most PADDED_NMS_LARGEST boxes and the classes padded to it,
# (C, P, P), stay within PADDED_NMS_ELEMENTS (measured here, against the per-class calls:
# P=26-121 1.5-4.4x faster, P=147-152 1.4x slower): each class's boxes in its nms order,
# one IoU tensor (torchvision's arithmetic), and the greedy rule — a box is kept iff no box
# kept before it in its class overlaps it over the threshold — solved for all classes
# together: "kept" recomputed from the kept set until it no longer changes (the first k
# boxes of a class are settled after k rounds; a set that reproduces itself is the greedy
# one, the rule's only solution). torchvision's result.
PADDED_NMS_ELEMENTS = 1 << 22
PADDED_NMS_LARGEST = 128


def _padded_nms(boxes: Tensor, scores: Tensor, box_class: Tensor, counts: list[int],
                iou_threshold: float) -> Tensor:
    """The indices every class's ``torchvision.ops.nms`` keeps (``box_class``: each box's
    class in 0..C-1, ``counts`` the classes' sizes), in class order."""
    n, c, p = boxes.shape[0], len(counts), max(counts)
    by_score = torch.sort(scores, stable=True, descending=True)[1]
    order = by_score[torch.sort(box_class[by_score], stable=True)[1]]   # class, then nms order
    klass = box_class[order]
    starts = torch.tensor(list(itertools.accumulate(counts[:-1], initial=0)))
    slot = klass * p + torch.arange(n) - starts[klass]
    rows, threshold = iou_rows(boxes, iou_threshold)
    padded = rows.new_zeros(5, c * p)
    padded[:, slot] = rows[:, order]
    padded = padded.view(5, c, p)
    later = torch.ones(p, p, dtype=torch.bool).triu_(1)                  # i before j
    over = (iou_over(padded, padded[4], padded, padded[4], threshold) & later).float()
    valid = torch.zeros(c * p, dtype=torch.bool)
    valid[slot] = True
    kept = valid = valid.view(c, p)
    while True:                     # (0/1 sums: exact in float32)
        again = valid & (torch.bmm(kept.float()[:, None, :], over)[:, 0] == 0)
        if torch.equal(again, kept):
            return order[kept.view(-1)[slot]]
        kept = again


def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    _, box_class, counts = torch.unique(idxs, return_inverse=True, return_counts=True)
    counts = counts.tolist()
    offset = boxes.numel() <= _PER_CLASS_NUMEL
    if offset:                      # torchvision's coordinate trick, operation for operation
        apart = len(counts) > 1 and _offsets_apart(boxes, idxs, iou_threshold)
        boxes = boxes + (idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes)))[:, None]
        if not apart:
            return _chunked_nms(boxes, scores, iou_threshold)
    if (not offset and len(counts) > 1 and max(counts) <= PADDED_NMS_LARGEST
            and len(counts) * max(counts) ** 2 <= PADDED_NMS_ELEMENTS):
        parts = [_padded_nms(boxes, scores, box_class, counts, iou_threshold)]
    elif offset:
        # one call per run of whole classes (in the order of their values) from about
        # NMS_CHUNK boxes on, on one thread: each at most about a tenth of a millisecond,
        # less than the pool's hand-over; members in increasing index
        starts = itertools.accumulate(counts[:-1], initial=0)
        run = torch.tensor([start // NMS_CHUNK for start in starts])[box_class]
        members = torch.sort(run, stable=True)[1].split(torch.bincount(run).tolist())
        parts = [m[_chunked_nms(boxes[m], scores[m], iou_threshold)] for m in members if m.numel()]
    else:
        # each class's boxes in increasing index, as torchvision's where(idxs == class)
        # gives; gathered once, each class a view
        order = torch.sort(box_class, stable=True)[1]
        by_class, class_boxes, class_scores = (
            t.split(counts) for t in (order, boxes[order], scores[order]))

        def kept(classes: list[int]) -> Tensor:
            return torch.cat([by_class[c][_chunked_nms(class_boxes[c], class_scores[c],
                                                       iou_threshold)] for c in classes])
        parts = _in_pool(kept, _class_groups(counts, min(len(counts), NMS_GROUPS)))
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for part in parts:
        keep[part] = True
    keep_indices = torch.where(keep)[0]
    if offset:                      # nms's order: score, then index (its stable sort)
        return keep_indices[torch.sort(scores[keep_indices], stable=True, descending=True)[1]]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]   # torchvision's


# The mask loss's gradient (N, K, M, M) is written in row parts from the pool, each at least
# this many elements (PyTorch splits an op over threads from 32,768 elements).
LOSS_PART_ELEMENTS = 1 << 16
# It is zero but for one class plane a row. From 32 MB (where glibc's malloc hands out fresh
# pages anyway) it is a fresh private mapping, whose pages stay the kernel's shared zero page
# until written; torch.zeros writes every byte, faulting each page in (K=91, N=128: 36 MB,
# 10.4 ms with the planes written and all of it read back; 3.6 ms). Not numpy's calloc:
# numpy asks for huge pages, whose compaction stalled the first calls 38 ms each here.
LAZY_ZEROS_BYTES = 32 << 20


def _lazy_zeros(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A contiguous zero CPU tensor on a fresh anonymous mapping (unmapped with the tensor);
    torch.zeros where the platform has none."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype)
    nbytes = shape.numel() * dtype.itemsize
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


def _loss_sum(x: Tensor, t: Tensor) -> Tensor:
    """The loss terms' sum, ``relu(x) - log(sigmoid(|x|)) - x t`` (see :class:`_MaskLoss`)."""
    terms = torch.relu(x).sub_(torch.sigmoid(x.abs()).log_())
    return terms.sum() - torch.dot(x.flatten(), t.flatten())


class _MaskLoss(torch.autograd.Function):
    """``F.binary_cross_entropy_with_logits(logits[arange(N), labels], targets)`` in the
    compute dtype, its gradient to the logits only (as the op's).

    PyTorch's forward goes through ``log_sigmoid``, whose CPU kernel calls a scalar
    ``log1p`` (about 5 ns an element here, 90% of the loss). Ours sums the same terms as
    ``relu(x) - log(sigmoid(|x|)) - x t`` with vectorized sigmoid and log (about 3x faster;
    each element within about 1e-7 of the exact value, as PyTorch's). The backward is
    PyTorch's: ``(sigmoid(x) - t) / count`` into the picked logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
        cdt = compute_dtype(logits.dtype)
        rows = torch.arange(logits.shape[0], device=logits.device)
        x, t = logits[rows, labels].to(cdt), targets.to(cdt)
        ctx.save_for_backward(x, t, labels)
        ctx.logits = (logits.shape, logits.dtype)
        return _loss_sum(x, t) / x.numel()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _loss_gradient(ctx, grad, in_pool=False), None, None


def _loss_gradient(ctx, grad: Tensor, in_pool: bool) -> Tensor:
    """The mask losses' gradient to the logits: zero but each row's class plane."""
    x, t, labels = ctx.saved_tensors
    shape, dtype = ctx.logits
    scale = grad / x.numel()

    def rows(lo_hi: tuple[int, int]) -> None:
        lo, hi = lo_hi
        part = out[lo:hi] if lazy else out[lo:hi].zero_()
        part[torch.arange(hi - lo, device=x.device), labels[lo:hi]] = torch.sigmoid(
            x[lo:hi]).sub_(t[lo:hi]).mul_(scale).to(dtype)
    nbytes = shape.numel() * dtype.itemsize
    lazy = nbytes >= LAZY_ZEROS_BYTES and not torch.compiler.is_compiling()
    out = (_lazy_zeros(shape, dtype) if lazy
           else torch.empty(shape, dtype=dtype, device=x.device))
    # An op's parallel work stays where its forward's ran: on the main thread's OpenMP team,
    # or in the pool in row parts of at least LOSS_PART_ELEMENTS. Switching hands the pool
    # the cores the main thread's workers still spin on (see _target_chunks). A traced graph
    # has no pool.
    if in_pool and not torch.compiler.is_compiling():
        _in_pool(rows, _ranges(shape[0], max(1, min(
            ROI_CHUNKS, torch.get_num_threads(), out.numel() // LOSS_PART_ELEMENTS))))
    else:
        rows((0, shape[0]))
    return out


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """The mask loss of :class:`_MaskLoss`."""
    return _MaskLoss.apply(logits, targets.detach(), labels)


# Mask targets sample each RoI's own gt mask. torchvision converts an image's masks whole to
# float (16 masks of 800x1216: 62 MB of fresh pages) and roi_align reads them back from
# memory, on one thread. Ours converts them TARGET_CHUNK_PIXELS at a time, only the masks
# some RoI samples, and runs torchvision's roi_align on each chunk's RoIs while the chunk is
# in cache, chunks spread over the pool: its computation per RoI, so its bits.
TARGET_CHUNK_PIXELS = 1 << 20


def _target_chunks(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int,
                   dtype: torch.dtype, then: Callable[[Tensor, Tensor], object]) -> list:
    """``then(rows, targets)`` for torchvision's targets of each chunk of rows (its roi_align
    of the image's gt masks in ``dtype``, (R, size, size)), run in the pool thread that
    sampled them; the results. Rows whose mask index is out of range, which only skipped
    data checks let through, get zero targets (they sample nothing, as on the Triton path).

    Nothing parallel runs on the main thread around the pool's work: a parallel op there
    (a new_zeros, an index_put of the results) leaves the main thread's OpenMP workers
    spinning on the cores the pool needs (libgomp's default wait), 2-3 ms lost at 128 RoIs."""
    chunks, results = [], []
    for i, masks in image_rows(gt_masks, rows):
        r, bad = _safe_rois(rois[i].to(dtype), masks.shape[0])
        rows_i = torch.arange(i.start, i.stop, device=rois.device)
        if bad is not None:
            results.append(then(rows_i[bad], r.new_zeros(int(bad.sum()), size, size)))
            r, rows_i = r[~bad], rows_i[~bad]
        per = max(1, TARGET_CHUNK_PIXELS // max(1, masks.shape[1] * masks.shape[2]))
        chunk = r[:, 0].long() // per
        for c in torch.unique(chunk).tolist():
            sel = chunk == c
            r_c = r[sel]                    # a copy: the shift onto the chunk is its own
            r_c[:, 0] -= c * per
            chunks.append((masks[c * per:(c + 1) * per], r_c, rows_i[sel]))

    def targets(item):
        masks, r_c, rows_c = item
        return then(rows_c, torch.ops.torchvision.roi_align(
            masks[:, None].to(dtype), r_c, 1.0, size, size, -1, False)[:, 0])
    return results + _in_pool(targets, chunks)


def mask_targets(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int,
                 dtype: torch.dtype) -> Tensor:
    """torchvision's targets, its roi_align of each image's gt masks in ``dtype``
    (N, size, size), by :func:`_target_chunks`."""
    out = rois.new_empty(rois.shape[0], size, size, dtype=dtype)

    def write(rows_c: Tensor, t: Tensor) -> None:       # each thread its rows
        out[rows_c] = t
    _target_chunks(rois, gt_masks, rows, size, dtype, write)
    return out


class _MaskRCNNLoss(_MaskLoss):
    """:class:`_MaskLoss` on torchvision's targets, each chunk's targets and loss terms
    computed in the pool thread that sampled them (while in cache); the backward is
    _MaskLoss's, from the pool."""

    @staticmethod
    def forward(ctx, logits: Tensor, rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                rows: list[int]) -> Tensor:
        cdt = compute_dtype(logits.dtype)
        n, _, m, _ = logits.shape
        x, t = logits.new_empty(n, m, m, dtype=cdt), logits.new_empty(n, m, m, dtype=cdt)

        def loss_terms(rows_c: Tensor, t_c: Tensor) -> Tensor:
            x_c = logits[rows_c, labels[rows_c]].to(cdt)
            x[rows_c], t[rows_c] = x_c, t_c
            return _loss_sum(x_c, t_c)
        sums = _target_chunks(rois, gt_masks, rows, m, cdt, loss_terms)
        ctx.save_for_backward(x, t, labels)
        ctx.logits = (logits.shape, logits.dtype)
        return torch.stack(sums).sum() / x.numel()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _loss_gradient(ctx, grad, in_pool=True), None, None, None, None


def maskrcnn_loss(logits: Tensor, rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                  rows: list[int]) -> Tensor:
    """The mask loss on torchvision's targets (:class:`_MaskRCNNLoss`)."""
    return _MaskRCNNLoss.apply(logits, rois, labels, gt_masks, rows)


# The fused predictor loss reads the (N, C, M, M) features once forward and once backward.
# The reference converts them whole to float32 (a fresh map-sized buffer: 100 MB at N=128,
# C=256, M=28, and as long again in page faults as in copying) and writes the feature
# gradient whole in float32 before rounding it. Ours runs the same products on chunks of
# instances in a buffer of about PREDICTOR_CHUNK_BYTES, reused (cache-sized work, no
# map-sized temporary): bfloat16 forward about 15x faster here, float32 about 3x.
PREDICTOR_CHUNK_BYTES = 8 << 20


def _flat(t: Tensor) -> Tensor:
    """(N, C, M, M) as (N, C, M*M): a view of the storage for contiguous and channels_last
    tensors (for channels_last, the transpose of its contiguous (N, M*M, C))."""
    n, c, m, _ = t.shape
    if is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(n, m * m, c).transpose(1, 2)
    return t.reshape(n, c, m * m)


def _chunk_buffer(flat: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """An empty (rows, C, P) tensor in ``dtype`` laid out as ``flat``'s storage."""
    _, c, p = flat.shape
    if flat.stride(1) == 1 and c > 1:     # channels_last: (P, C) per instance
        return flat.new_empty(rows, p, c, dtype=dtype).transpose(1, 2)
    return flat.new_empty(rows, c, p, dtype=dtype)


def _instance_chunks(features: Tensor, dtype: torch.dtype):
    """(lo, hi, the features [lo, hi) as (k, C, M*M) in ``dtype``), chunk by chunk: the
    features themselves where they already are in ``dtype``, else a copy in one reused
    buffer laid out as the features (valid until the next chunk)."""
    n, c, m, _ = features.shape
    k = max(1, PREDICTOR_CHUNK_BYTES // (c * m * m * dtype.itemsize))
    flat = _flat(features)
    buffer = None if features.dtype == dtype else _chunk_buffer(flat, min(k, n), dtype)
    for lo in range(0, n, k):
        hi = min(n, lo + k)
        yield lo, hi, flat[lo:hi] if buffer is None else buffer[:hi - lo].copy_(flat[lo:hi])


def mask_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                targets: Tensor, labels: Tensor, compute_grad: bool):
    """The reference's forward, its logits computed chunk by chunk."""
    n, _, m, _ = features.shape
    cdt = compute_dtype(features.dtype)
    w = weight[labels].to(cdt)
    x = features.new_empty(n, m * m, dtype=cdt)
    for lo, hi, f in _instance_chunks(features, cdt):
        torch.bmm(w[lo:hi, None, :], f, out=x[lo:hi, None, :])
    x += bias[labels].to(cdt)[:, None]
    return reference._selected_logits_loss(x, targets.to(cdt).reshape(n, m * m), compute_grad)


def maskrcnn_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                    rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                                    rows: list[int], compute_grad: bool):
    """:func:`mask_predictor_loss_forward` on :func:`mask_targets`."""
    size = features.shape[-1]
    return mask_predictor_loss_forward(
        features, weight, bias, mask_targets(rois, gt_masks, rows, size,
                                             compute_dtype(features.dtype)),
        labels, compute_grad)


def mask_predictor_loss_backward(grad, features, weight, labels, grad_sel, dsum):
    """The reference's backward, chunk by chunk: the feature gradient's products in the
    compute dtype, rounded once into the features' dtype and layout; the weight rows as
    (1, P) x (P, C) products (BLAS's fast orientation; the reference's einsum sums in
    another order)."""
    n, c, m, _ = features.shape
    cdt = grad_sel.dtype
    g = grad.to(cdt)
    w = weight[labels].to(cdt) * g                                     # (N, C)
    grad_features = torch.empty(features.shape, dtype=features.dtype, device=features.device,
                                memory_format=memory_format(features))
    out = _flat(grad_features)
    rows = features.new_empty(n, c, dtype=cdt)
    products = None
    for lo, hi, f in _instance_chunks(features, cdt):
        torch.bmm(grad_sel[lo:hi, None, :], f.transpose(1, 2), out=rows[lo:hi, None, :])
        if out.dtype == cdt:
            torch.mul(w[lo:hi, :, None], grad_sel[lo:hi, None, :], out=out[lo:hi])
            continue
        if products is None:
            products = _chunk_buffer(out, hi - lo, cdt)
        out[lo:hi].copy_(torch.mul(w[lo:hi, :, None], grad_sel[lo:hi, None, :],
                                   out=products[:hi - lo]))
    rows *= g
    return (grad_features, *reference._predictor_param_grads(weight, labels, rows, dsum * g))
