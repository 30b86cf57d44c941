"""RoI Align on the CPU, single level and FPN: torchvision's own C++ kernels (float32 and
float64; half types upcast to float32, the result rounded once), run on parts of the work
from the pool (:mod:`kernels._cpu.pool`): the forward on slices of the RoIs, the backward on
groups of images and ranges of channels, each part copied into the gradient by its
thread. RoIs its kernel cannot take (non-finite, batch index out of range: only skipped
checks let them through) pool zeros; huge boxes run on the reference (``_wide``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import reference
from .._sampling import Pyramid
from .._utils import compute_dtype
from .pool import in_pool, ranges

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
             for lo, hi in ranges(x.shape[1], width)]

    def part(task) -> None:
        i, lo, hi = task
        out[i][:, lo:hi].copy_(maps[i][:, lo:hi])
    if tasks:
        in_pool(part, tasks)
    return out


def _safe_rois(rois: Tensor, images: int) -> tuple[Tensor, Tensor | None]:
    """RoIs torchvision's kernel can take, and the rows that were not (None: every row is):
    a non-finite value or a batch index outside [0, images), which only the skipped data
    checks (skip_data_checks, direct custom-op calls) let through, crash its kernel (NaN
    sizes its sampling grid) or read out of bounds. They become empty boxes on image 0, and
    pool nothing, as on the Triton path (which truncates the index as torchvision does)."""
    bad = ~torch.isfinite(rois).all(1) | (rois[:, 0] <= -1) | (rois[:, 0] >= images)
    if not bool(bad.any()):
        return rois, None
    return rois.masked_fill(bad[:, None], 0.0), bad


def _wide(rois: Tensor, scales, pooled_h: int, pooled_w: int, sampling_ratio: int,
          shapes) -> bool:
    """Whether a RoI asks for more samples per bin than some map (``shapes``: their (H, W),
    with ``scales``) has room for: a huge box with adaptive sampling (ceil(box / bins) per
    bin: 3e8 for a box 2e9 wide). torchvision's kernel visits every one; the reference
    visits only those that can land on the map, with the same result, so such calls run
    there."""
    if sampling_ratio > 0 or rois.numel() == 0:
        return False
    size = (rois[:, 3:5] - rois[:, 1:3]).abs().amax(0)     # (width, height); finite rows
    limit = torch.tensor([[pooled_w * (2 * w + 4) / s, pooled_h * (2 * h + 4) / s]
                          for s, (h, w) in zip(scales, shapes)], dtype=size.dtype)
    return bool((size > limit).any())


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    if pooled_h * pooled_w == 0 or rois.shape[0] == 0:
        return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)
    cdt = compute_dtype(input.dtype)
    (r, bad) = _safe_rois(rois.to(cdt), input.shape[0])
    if _wide(r, (spatial_scale,), pooled_h, pooled_w, sampling_ratio, [input.shape[2:]]):
        return reference.roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned)
    (x,) = _nchw([input], cdt)
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
        in_pool(part, ranges(r.shape[0], count))
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
    return [(images, channels) for images in ranges(n, groups)
            for channels in ranges(c, max(1, count // groups))]


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
    done = in_pool(run, jobs)
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
    if (pooled_h * pooled_w == 0 or rois.shape[0] == 0
            or _wide(r, (spatial_scale,), pooled_h, pooled_w, sampling_ratio, [(h, w)])):
        return reference.roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w,
                                            sampling_ratio, aligned, input_shape,
                                            channels_last)
    if bad is not None:
        g = g.masked_fill(bad[:, None, None, None], 0.0)
    count = _part_count(_samples(r, c, pooled_h, pooled_w, spatial_scale, sampling_ratio))
    (out,) = _map_gradients(
        [(input_shape, grad.dtype, channels_last)],
        [(0, *part) for part in _backward_parts(n, c, count)],
        lambda job: _image_backward(g, r, None, job[1], job[2], n, spatial_scale, pooled_h,
                                    pooled_w, sampling_ratio, aligned, (h, w)))
    return out


def _level_rows(rois: Tensor, pyramid: Pyramid, images: int) -> tuple[Tensor, list[Tensor]]:
    """RoIs as torchvision's kernel can take them (:func:`_safe_rois`) and each level's rows
    (torchvision's LevelMapper; a row no level pools is in none)."""
    cdt = rois.dtype
    levels = pyramid.levels(rois, cdt)
    r, bad = _safe_rois(rois, images)
    if bad is not None:
        levels = levels.masked_fill(bad, -1)
    return r, [torch.where(levels == lvl)[0] for lvl in range(pyramid.num_levels)]


def multiscale_roi_align_forward(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                                 pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """torchvision's MultiScaleRoIAlign computation: levels, then roi_align per level (half
    types upcast to float32, the result rounded once), every level's parts in one pass over
    the pool: slices of each level's RoIs, each thread writing its rows in. torchvision
    runs the levels one after another on one thread."""
    dtype = features[0].dtype
    cdt = compute_dtype(dtype)
    r, per_level = _level_rows(rois.to(cdt), pyramid, features[0].shape[0])
    if _wide(r, pyramid.scales, pooled_h, pooled_w, sampling_ratio,
             [f.shape[2:] for f in features]):
        return reference.multiscale_roi_align_forward(features, rois, pyramid, pooled_h,
                                                      pooled_w, sampling_ratio)
    maps = _nchw(features, cdt)
    channels = features[0].shape[1]
    # no new_zeros: nothing parallel on the main thread around the pool's work (see
    # _target_chunks); the rows no level pools are zeroed after
    out = maps[0].new_empty(rois.shape[0], channels, pooled_h, pooled_w)
    tasks = []                  # (level, RoI indices): slices as roi_align_forward's
    for lvl, idx in enumerate(per_level):
        count = _part_count(_samples(r[idx], channels, pooled_h, pooled_w, pyramid.scales[lvl],
                                     sampling_ratio))
        tasks += [(lvl, idx[lo:hi]) for lo, hi in ranges(idx.numel(), count) if hi > lo]

    def part(task) -> None:     # each thread writes its rows in
        lvl, idx = task
        out[idx] = torch.ops.torchvision.roi_align(
            maps[lvl], r[idx], pyramid.scales[lvl], pooled_h, pooled_w, sampling_ratio, False)
    in_pool(part, tasks)
    pooled = sum(idx.numel() for idx in per_level)
    if pooled < rois.shape[0]:
        unpooled = torch.ones(rois.shape[0], dtype=torch.bool)
        for idx in per_level:
            unpooled[idx] = False
        out[unpooled] = 0
    return out.to(dtype)


def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, pyramid: Pyramid,
                                  pooled_h: int, pooled_w: int,
                                  sampling_ratio: int) -> list[Tensor]:
    """Each level's input gradient, in its map's dtype and layout: torchvision's backward
    per group of images and channels (:func:`_image_backward`), every level's parts in one
    pass over the pool (torchvision's autograd runs them level by level, on one thread)."""
    cdt = compute_dtype(grad.dtype)
    g = grad.to(cdt).contiguous()
    r, per_level = _level_rows(rois.to(cdt), pyramid, pyramid.shapes[0][0])
    if _wide(r, pyramid.scales, pooled_h, pooled_w, sampling_ratio,
             [shape[2:] for shape in pyramid.shapes]):
        flat = reference.multiscale_roi_align_backward(grad, rois, pyramid, pooled_h, pooled_w,
                                                       sampling_ratio)
        return pyramid.level_views(flat)
    maps = [(shape, grad.dtype, cl) for shape, cl in zip(pyramid.shapes, pyramid.channels_last)]
    jobs = []                   # (level, images, channels): every level's parts
    for lvl, (n, c, h, w) in enumerate(pyramid.shapes):
        count = _part_count(_samples(r[per_level[lvl]], c, pooled_h, pooled_w,
                                     pyramid.scales[lvl], sampling_ratio))
        jobs += [(lvl, *part) for part in _backward_parts(n, c, count)]

    def part(job) -> Tensor:
        lvl, images, channels = job
        n, _, h, w = pyramid.shapes[lvl]
        return _image_backward(g, r, per_level[lvl], images, channels, n, pyramid.scales[lvl],
                               pooled_h, pooled_w, sampling_ratio, False, (h, w))
    return _map_gradients(maps, jobs, part)
