"""RoI Align (torchvision semantics) as Triton kernels, at one level or over an FPN pyramid.

One program per (RoI, block of channels, block of output bins): the box is decoded once,
and each corner load gathers BLOCK_P x BLOCK_C (bin, channel) pairs held as one flat
vector (``roi_tile``) whose fast index is the input's stride-1 dimension (``P_MAJOR``):
bins for NCHW, where neighbouring bins sample neighbouring pixels of one plane, channels
for channels_last, where a pixel's channels are one contiguous vector. A warp's lanes run
along that index on every Triton: a 2-D tile left the choice to the compiler, and the
H200's Triton 3.6 put a warp over 32 channel planes of NCHW maps. The launcher hands the
kernel dense maps (NCHW or channels_last: a strided view is copied once).

One kernel, forward and backward (``BACKWARD``, a constexpr: the forward gathers the
bilinear corners, the backward scatters onto them with relaxed atomics), pools from up to
``MAX_LEVELS`` maps (``NUM_LEVELS``, a constexpr): each
program computes its RoI's level with torchvision's LevelMapper arithmetic and picks that
level's pointer, shape and scale. RoIAlign is the one-level case (the level pick compiles
out); :mod:`kernels.ops.multiscale_roi_align` launches the pyramid. A separate single-level
kernel would buy nothing: the static kernel report (``benchmarks/results/static.json``)
shows one-level and multi-level launches at the same registers and occupancy. The sampling itself (box decode, bilinear rule, level)
is :mod:`kernels._sampling`, shared with the mask losses' target sampling.
"""
from __future__ import annotations

import functools
import importlib

import torch
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _cpu, reference
from .._boxes import boxes_to_rois
from .._sampling import (MAX_LEVELS, bins_by_channels, check_image_extent, dense, level_args,
                         p_major, Pyramid, roi_on_level, roi_tile, sample_index, sample_plan,
                         sample_rows, sampling_entries)
from .._utils import (ROI_INPUT_ERRORS, cdiv, check_float_dtype, check_same_device,
                      check_tensor, deterministic_algorithms, eager, fx_leaf, is_channels_last,
                      needs_grad, pair, pick_path, row_chunks, values_checked)
from .._launch import DTYPE_NAMES, launch, pick_tuning, register_lanes, register_tuning


# ---------------------------------------------------------------------------------------
# Kernels

# Image sizes change from call to call (image sizes, padded batches); specializing on them
# (== 1, divisible by 16) would compile anew for each pattern, and with two elements per
# thread nothing in these tiles is vectorized by it. The maps are dense (NCHW or
# channels_last, the launcher's choice), so their strides follow from (C, H, W) and are not
# passed: with levels past NUM_LEVELS passed as None (constants) a one-level launch has 11
# runtime arguments (55 when every level's shape, strides and the output strides were
# passed), and Triton's launch pays per runtime argument on the host.
_SHAPE_ARGS = [f"{a}{i}" for i in range(MAX_LEVELS) for a in ("H", "W")] + ["N"]
_POOLED_STRIDES = ["p_stride_k", "p_stride_c", "p_stride_h", "p_stride_w"]


@triton.jit
def _pooled_tile(pooled_ptr, r, C, PH, PW, stride_k, stride_c, stride_h, stride_w, offs_p,
                 offs_c, ph_i, pw_i, in_tile, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                 P_MAJOR: tl.constexpr, STRIDED: tl.constexpr):
    """Pointers and mask of this program's (bin, channel) pairs in the pooled (K, C, PH, PW)
    tensor: any strides when STRIDED (int64 offsets: a strided view can pass 2**31; the
    backward's output gradient, which autograd often hands over expanded), otherwise
    contiguous (the forward's output; its strides are then None). Its bins are the fast
    index in both layouts, so channels-fast programs (not P_MAJOR) get a [BLOCK_P, BLOCK_C]
    tile read and written along bins (``bins_by_channels``), which ``tl.reshape`` maps
    onto the flat vector."""
    if STRIDED:
        base = pooled_ptr + r * stride_k
    else:
        base = pooled_ptr + r * (C * PH * PW)
    if P_MAJOR:
        if STRIDED:
            ptrs = (base + offs_c.to(tl.int64) * stride_c + ph_i.to(tl.int64) * stride_h
                    + pw_i.to(tl.int64) * stride_w)
        else:
            ptrs = base + offs_c.to(tl.int64) * (PH * PW) + offs_p
        mask = in_tile
    else:
        offs_p2, offs_c2, mask = bins_by_channels(C, PH, PW, BLOCK_P, BLOCK_C)
        if STRIDED:
            ptrs = (base + offs_c2[None, :].to(tl.int64) * stride_c
                    + ((offs_p2 // PW).to(tl.int64) * stride_h
                       + (offs_p2 % PW).to(tl.int64) * stride_w)[:, None])
        else:
            ptrs = base + offs_c2[None, :].to(tl.int64) * (PH * PW) + offs_p2[:, None]
    return ptrs, mask


@triton.jit(do_not_specialize=_SHAPE_ARGS + _POOLED_STRIDES)
def _roi_align_kernel(
    pooled_ptr,  # (K, C, PH, PW): forward output (contiguous) / gradient of the output
    rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
    x0_ptr, H0, W0, scale0,  # level 0: (N, C, H0, W0), dense NCHW (P_MAJOR) or channels
    x1_ptr, H1, W1, scale1,  # last; the forward reads the map, the backward adds into its
    x2_ptr, H2, W2, scale2,  # float32 gradient. Levels 1..4 the same, None past
    x3_ptr, H3, W3, scale3,  # NUM_LEVELS
    x4_ptr, H4, W4, scale4,
    N, C, sampling_ratio, PH, PW,
    p_stride_k, p_stride_c, p_stride_h, p_stride_w,  # the backward's gradient; else None
    K_MIN: tl.constexpr, K_MAX: tl.constexpr, CANONICAL_SCALE: tl.constexpr,
    CANONICAL_LEVEL: tl.constexpr, EPS: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, P_MAJOR: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One sampling loop for both directions: the forward gathers each sample's four
    bilinear corners into its bins; the backward (BACKWARD) scatters each bin's gradient
    back onto the same corners with the same weights. Every value is safe: a RoI with a
    batch index outside [0, N) or non-finite coordinates samples nothing (zeros), and a
    huge box visits only the samples that can land on the map (``sample_plan``)."""
    r, offs_p, offs_c, mask_p, mask_c, ph_i, pw_i = roi_tile(C, PH, PW, BLOCK_P, BLOCK_C,
                                                             P_MAJOR)
    ph = ph_i.to(tl.float32)
    pw = pw_i.to(tl.float32)
    in_tile = mask_p & mask_c
    # an unpooled RoI gets an empty grid: it runs no samples (the forward stores zeros)
    (x_ptr, H, W, stride_n, stride_c, stride_h, stride_w, b, start_h, start_w, bin_h, bin_w,
     grid_h, grid_w) = roi_on_level(
        rois_ptr, r, x0_ptr, H0, W0, scale0, x1_ptr, H1, W1, scale1, x2_ptr, H2, W2, scale2,
        x3_ptr, H3, W3, scale3, x4_ptr, H4, W4, scale4, N, C, sampling_ratio, PH, PW,
        K_MIN, K_MAX, CANONICAL_SCALE, CANONICAL_LEVEL, EPS, NUM_LEVELS, ALIGNED, not P_MAJOR)
    count = tl.maximum(grid_h * grid_w, 1.0)
    if BACKWARD:
        g_ptrs, g_mask = _pooled_tile(pooled_ptr, r, C, PH, PW, p_stride_k, p_stride_c,
                                      p_stride_h, p_stride_w, offs_p, offs_c, ph_i, pw_i,
                                      in_tile, BLOCK_P, BLOCK_C, P_MAJOR, True)
        g = tl.load(g_ptrs, mask=g_mask, other=0.0)
        g = tl.reshape(g, (BLOCK_P * BLOCK_C,)).to(tl.float32) / count
    else:
        acc = tl.zeros((BLOCK_P * BLOCK_C,), dtype=tl.float32)
    iy_a, ny_a, ny_b = sample_plan(start_h, bin_h, grid_h, H, PH)
    ix_a, nx_a, nx_b = sample_plan(start_w, bin_w, grid_w, W, PW)
    # the image's base is a 64-bit scalar; offsets inside one image are int32 (checked)
    base = (x_ptr + b * stride_n) + offs_c * stride_c
    for ty in range(0, ny_a + ny_b):
        iy = sample_index(ty, iy_a, ny_a)
        row_lo, row_hi, wy_lo, wy_hi, valid_y = sample_rows(start_h, ph, bin_h, iy, grid_h, H,
                                                            stride_h)
        valid_y = valid_y & in_tile
        for tx in range(0, nx_a + nx_b):
            ix = sample_index(tx, ix_a, nx_a)
            col_lo, col_hi, wx_lo, wx_hi, valid_x = sample_rows(start_w, pw, bin_w, ix, grid_w,
                                                                W, stride_w)
            m = valid_y & valid_x
            if BACKWARD:
                # Atomics: RoIs overlap, so several programs add into the same pixels.
                # Relaxed: nothing here reads what another program adds (the kernel's end
                # orders them), so each add is a fence-free reduction (RED), not a fenced ATOM.
                tl.atomic_add(base + (row_lo + col_lo), g * (wy_lo * wx_lo), mask=m,
                              sem="relaxed")
                tl.atomic_add(base + (row_lo + col_hi), g * (wy_lo * wx_hi), mask=m,
                              sem="relaxed")
                tl.atomic_add(base + (row_hi + col_lo), g * (wy_hi * wx_lo), mask=m,
                              sem="relaxed")
                tl.atomic_add(base + (row_hi + col_hi), g * (wy_hi * wx_hi), mask=m,
                              sem="relaxed")
            else:
                v1 = tl.load(base + (row_lo + col_lo), mask=m, other=0.0)
                v2 = tl.load(base + (row_lo + col_hi), mask=m, other=0.0)
                v3 = tl.load(base + (row_hi + col_lo), mask=m, other=0.0)
                v4 = tl.load(base + (row_hi + col_hi), mask=m, other=0.0)
                acc += (wy_lo * wx_lo * v1.to(tl.float32) + wy_lo * wx_hi * v2.to(tl.float32)
                        + wy_hi * wx_lo * v3.to(tl.float32)
                        + wy_hi * wx_hi * v4.to(tl.float32))
    if not BACKWARD:
        # the launcher allocates the output contiguous
        out_ptrs, out_mask = _pooled_tile(pooled_ptr, r, C, PH, PW, p_stride_k, p_stride_c,
                                          p_stride_h, p_stride_w, offs_p, offs_c, ph_i, pw_i,
                                          in_tile, BLOCK_P, BLOCK_C, P_MAJOR, False)
        out = (acc / count).to(pooled_ptr.dtype.element_ty)
        tl.store(out_ptrs, tl.reshape(out, out_ptrs.shape), mask=out_mask)


@triton.jit
def _roi_align_bwd_deterministic_kernel(
    grad_ptr,  # (K*PH*PW, C) contiguous: the output gradient, channels last
    src_ptr,  # (E,) int64: row of grad_ptr of each sampling entry, sorted by pixel
    weight_ptr,  # (E,) float32: weight of each entry, same order
    start_ptr,  # (N*H*W + 1,) int64: pixel q's entries are [start[q], start[q + 1])
    grad_input_ptr,  # (N, C, H, W) input dtype, strides as given
    C, H, W, stride_n, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr,
):
    # Each program owns one input pixel and a block of channels, and sums its entries in
    # the fixed (sorted) order: no atomics, bitwise-identical gradients run to run.
    q = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    begin = tl.load(start_ptr + q)
    end = tl.load(start_ptr + q + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(begin, end):
        row = tl.load(src_ptr + t)
        w = tl.load(weight_ptr + t)
        acc += w * tl.load(grad_ptr + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    hw = H * W
    b = q // hw
    y = (q % hw) // W
    x = q % W
    dst = grad_input_ptr + b * stride_n + y * stride_h + x * stride_w + offs_c * stride_c
    tl.store(dst, acc.to(grad_input_ptr.dtype.element_ty), mask=mask_c)


# One table per kernel: the launcher picks a row, the GPU compile check builds every row.
# Two tile elements per thread: on sm_90 the forward then needs 40 registers (75%
# occupancy; channels_last stores through 1-2 KiB of shared memory, regrouped along bins)
# on Triton 3.6 and 3.8; the atomic backward 32-42 (62-100%) on 3.8, 32-57 on 3.6 (its
# channels_last variants: 50-56%); four per thread needs 64-101 registers and larger tiles
# spill (see `python -m benchmarks.static`).
_TUNING = [
    {"BLOCK_P": 16, "BLOCK_C": 32, "num_warps": 8},
    {"BLOCK_P": 8, "BLOCK_C": 32, "num_warps": 4},    # outputs of <= 8 bins
    {"BLOCK_P": 256, "BLOCK_C": 1, "num_warps": 4},   # fewer than 8 channels (masks: C = 1)
]
# The sweep's candidates, two elements per thread too: longer runs of bins (NCHW) or of
# channels (channels_last: 256 B a corner in float32).
register_tuning(_roi_align_kernel, _TUNING, candidates=[
    {"BLOCK_P": 32, "BLOCK_C": 16, "num_warps": 8}, {"BLOCK_P": 8, "BLOCK_C": 64, "num_warps": 8},
], key_fields=("channels", "bins", "dtype", "layout", "direction", "levels"))



def _lanes(constexprs: dict) -> dict:
    """The hot loops' accesses are flat (bin, channel) vectors (``roi_tile``): bins the fast
    index when P_MAJOR — the launcher's choice for NCHW maps (``p_major``), where
    neighbouring bins sample neighbouring x of one plane — channels otherwise
    (channels_last: a pixel's channels are one contiguous vector). The feature gathers and
    the gradient scatters want a warp's lanes along that fast index."""
    if constexprs["P_MAJOR"]:
        bins = ("flat", constexprs["BLOCK_P"])
        return {"NCHW": {"load": bins, "atomic_rmw": bins}}
    channels = ("flat", constexprs["BLOCK_C"])
    return {"channels_last": {"load": channels, "atomic_rmw": channels}}


register_lanes(_roi_align_kernel, _lanes)

_TUNING_DETERMINISTIC = [
    {"BLOCK_C": 32, "num_warps": 1},
    {"BLOCK_C": 128, "num_warps": 4},
]
register_tuning(_roi_align_bwd_deterministic_kernel, _TUNING_DETERMINISTIC)


# ---------------------------------------------------------------------------------------
# Host launchers. pool_forward / pool_backward launch the kernels over the maps of a
# Pyramid (1..MAX_LEVELS); roi_align_* are the single-level case,
# kernels.ops.multiscale_roi_align the pyramid.

def _tuning_row(channels: int, bins: int) -> dict:
    if bins <= 8:
        return _TUNING[1]
    return _TUNING[2] if channels < 8 else _TUNING[0]


def _map_names(count: int) -> list[str]:
    return ["input"] if count == 1 else [f"features[{i}]" for i in range(count)]


def pool_forward(features: list[Tensor], rois: Tensor, pyramid: Pyramid, pooled_h: int,
                 pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Pool every RoI from its level of ``features`` (one launch per 65,535 RoIs)."""
    n, c = features[0].shape[:2]
    k = rois.shape[0]
    out = torch.empty(k, c, pooled_h, pooled_w, dtype=features[0].dtype,
                      device=features[0].device)
    if out.numel() == 0:
        return out
    channels_last = not p_major(features)
    maps = [dense(f, channels_last) for f in features]
    _check_extents(maps)
    _launch(out, _float_rois(rois), maps, pyramid, sampling_ratio, aligned, backward=False)
    return out


def _float_rois(rois: Tensor) -> Tensor:
    """The (K, 5) RoIs as the kernel reads them: contiguous float32 (no call where they are)."""
    if rois.dtype != torch.float32:
        rois = rois.to(torch.float32)
    return rois if rois.is_contiguous() else rois.contiguous()


def _check_extents(maps: list[Tensor]) -> None:
    """Offsets inside one image are int32 in the kernel (``check_image_extent``): for dense
    maps, an image's C * H * W elements."""
    for i, f in enumerate(maps):
        if f.shape[1] * f.shape[2] * f.shape[3] >= 2**31:
            check_image_extent(f.shape, f.stride(), _map_names(len(maps))[i])


def pool_backward(grad: Tensor, rois: Tensor, grads: list[Tensor], pyramid: Pyramid,
                  pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool) -> None:
    """Add each RoI's output gradient into its level's float32 buffer in ``grads`` (dense,
    every level in one layout: see :func:`gradient_buffers`)."""
    k = rois.shape[0]
    c = grads[0].shape[1]
    if k == 0 or c == 0 or grads[0].shape[0] == 0 or pooled_h * pooled_w == 0:
        return
    _check_extents(grads)
    _launch(grad, _float_rois(rois), grads, pyramid, sampling_ratio, aligned, backward=True)


def gradient_buffers(pyramid: Pyramid, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One zeroed float32 buffer for every level's input gradient, and its per-level views:
    all dense in the layout the kernel's lanes follow (channels_last when most maps are),
    so one launch scatters into every level."""
    flat = torch.zeros(pyramid.grad_numel(), dtype=torch.float32, device=device)
    return flat, pyramid.level_views(flat)


_NO_MAPPER = dict(K_MIN=0, K_MAX=0, CANONICAL_SCALE=224.0, CANONICAL_LEVEL=4.0, EPS=1e-6)


def _launch(pooled: Tensor, rois: Tensor, maps: list[Tensor], pyramid: Pyramid,
            sampling_ratio: int, aligned: bool, backward: bool) -> None:
    """Launch the kernel over ``pooled`` (K, C, PH, PW), one launch per 65,535 RoIs."""
    k, c, pooled_h, pooled_w = pooled.shape
    bins = pooled_h * pooled_w
    p_maj = p_major(maps)
    tuning = pick_tuning(_roi_align_kernel, _tuning_row(c, bins), key=(
        c, bins, DTYPE_NAMES[pooled.dtype], "NCHW" if p_maj else "channels_last",
        "backward" if backward else "forward", len(maps)))
    blocks = (cdiv(bins, tuning["BLOCK_P"]), cdiv(c, tuning["BLOCK_C"]))
    strides = pooled.stride() if backward else (None,) * 4
    mapper = pyramid.mapper_constexprs() if len(maps) > 1 else _NO_MAPPER
    levels = level_args(maps, pyramid.scales)
    for start, end in row_chunks(k):
        whole = end - start == k          # (no slice views for the usual single launch)
        launch(_roi_align_kernel, (*blocks, end - start),
               pooled if whole else pooled[start:end], rois if whole else rois[start:end],
               *levels, maps[0].shape[0], c, sampling_ratio, pooled_h, pooled_w, *strides,
               tuning=tuning, **mapper, NUM_LEVELS=len(maps), ALIGNED=aligned, P_MAJOR=p_maj,
               BACKWARD=backward)


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Launch the forward kernel; inputs already validated (see :func:`roi_align`)."""
    return pool_forward([input], rois, _one_level(spatial_scale), pooled_h, pooled_w,
                        sampling_ratio, aligned)


@functools.lru_cache(maxsize=256)
def _one_level(spatial_scale: float) -> Pyramid:
    return Pyramid((spatial_scale,))


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    """Launch the backward kernel into a float32 buffer, then cast once to grad's dtype."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    acc = torch.empty(input_shape, dtype=torch.float32, device=grad.device,
                      memory_format=fmt).zero_()
    pool_backward(grad, rois, [acc], _one_level(spatial_scale), pooled_h, pooled_w,
                  sampling_ratio, aligned)
    return acc.to(grad.dtype)


def roi_align_backward_deterministic(grad: Tensor, rois: Tensor, spatial_scale: float,
                                     pooled_h: int, pooled_w: int, sampling_ratio: int,
                                     aligned: bool, input_shape: tuple[int, int, int, int],
                                     channels_last: bool) -> Tensor:
    """Backward without floating-point atomics: bitwise reproducible.

    The sampling entries (output bin, input pixel, weight) are listed on the device,
    stably sorted by pixel, and one program per pixel sums its entries in that order.
    Listing the entries reads a few group sizes on the host (a sync per group of RoIs
    with the same sample count; one group when sampling_ratio > 0).
    """
    n, c, h, w = input_shape
    k = rois.shape[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, c, h, w, dtype=grad.dtype, device=grad.device).to(memory_format=fmt)
    if out.numel() == 0:
        return out
    if grad.numel() == 0:
        return out.zero_()
    check_image_extent(out.shape, out.stride(), "input")
    rows, cols, weights = sampling_entries(
        rois.to(torch.float32), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
        input_shape, torch.float32)
    cols, order = torch.sort(cols, stable=True)
    src = rows[order].contiguous()
    weights = weights[order].contiguous()
    start = torch.searchsorted(cols, torch.arange(n * h * w + 1, device=grad.device))
    grad_rows = grad.permute(0, 2, 3, 1).reshape(k * pooled_h * pooled_w, c).contiguous()
    tuning = pick_tuning(_roi_align_bwd_deterministic_kernel,
                         _TUNING_DETERMINISTIC[1 if c >= 128 else 0])
    grid = (n * h * w, cdiv(c, tuning["BLOCK_C"]))
    launch(_roi_align_bwd_deterministic_kernel, grid, grad_rows, src, weights, start, out,
           c, h, w, *out.stride(), tuning=tuning)
    return out


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd

def check_rois_data(rois: Tensor, batch_size: int, name: str = "boxes") -> None:
    """The checks that read the RoIs' values (finite, batch indices integers in [0, N)), in
    one read; the public functions call it where :func:`values_checked` says so."""
    if rois.numel() == 0:
        return
    batch = rois[:, 0].detach()
    lo, hi, finite, whole = torch.stack([
        batch.min().double(), batch.max().double(), torch.isfinite(rois).all().double(),
        (batch == batch.floor()).all().double()]).tolist()
    if not finite:
        raise ValueError(f"{name} must be finite, got NaN or infinite coordinates")
    if lo < 0 or hi >= batch_size or not whole:
        raise ValueError(f"{name} batch indices must be integers in [0, {batch_size}), "
                         f"got values in [{lo:g}, {hi:g}]")


def _forward_kernel(input: Tensor):
    """The forward a device runs for ``input`` (``pick_path``): Triton on CUDA (and under
    the interpreter), torchvision's CPU kernel on CPU, the reference for float64."""
    return pick_path(input, roi_align_forward, reference.roi_align_forward,
                     cpu=_cpu.roi_align_forward)


def _backward_kernel(grad: Tensor):
    return pick_path(grad, roi_align_backward, reference.roi_align_backward,
                     roi_align_backward_deterministic, _cpu.roi_align_backward)


@torch.library.custom_op("maskrcnn_triton::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                  pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    return _forward_kernel(input)(input, rois, spatial_scale, pooled_h, pooled_w,
                                  sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


@torch.library.custom_op("maskrcnn_triton::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                           pooled_w: int, sampling_ratio: int, aligned: bool, batch: int,
                           channels: int, height: int, width: int,
                           channels_last: bool) -> Tensor:
    return _backward_kernel(grad)(grad, rois, spatial_scale, pooled_h, pooled_w,
                                  sampling_ratio, aligned, (batch, channels, height, width),
                                  channels_last)


@_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, batch, channels,
      height, width, channels_last):
    out = grad.new_empty(batch, channels, height, width)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    ctx.shape = tuple(input.shape)
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = _roi_align_backward_op(grad, rois, *ctx.args, *ctx.shape, ctx.channels_last)
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


class _RoIAlign(torch.autograd.Function):
    """The op in eager code: the device kernels called directly, without the dispatcher
    (tens of microseconds a call); tracing sees :func:`_roi_align_op` instead."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _forward_kernel(inputs[0])(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grad_input = _backward_kernel(grad)(grad, rois, *ctx.args, ctx.shape,
                                            ctx.channels_last)
        return grad_input, None, None, None, None, None, None


def pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
         sampling_ratio: int, aligned: bool) -> Tensor:
    """RoI Align of validated arguments: in eager code the device kernel (through
    :class:`_RoIAlign` where a gradient is wanted), while tracing the custom op."""
    args = (input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    if not eager(input, rois):
        return _roi_align_op(*args)
    if needs_grad(input):
        return _RoIAlign.apply(*args)
    return _forward_kernel(input)(*args)


# ---------------------------------------------------------------------------------------
# Public API

@fx_leaf
def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Drop-in for ``torchvision.ops.roi_align``.

    input: (N, C, H, W) float32/float16/bfloat16 (float64 runs the reference path), NCHW or
    channels_last; quantized tensors go to torchvision's quantized kernel. boxes:
    Tensor[K, 5] (batch index, x1, y1, x2, y2) or list[Tensor[L, 4]]. Returns
    (K, C, PH, PW) in input's dtype (an output_size of 0 gives an empty result, as
    torchvision's). The boxes' values (finite, batch indices in [0, N)) are checked for CPU
    tensors, and for CUDA tensors inside ``kernels.check_values()`` (a host sync, which
    torchvision's CUDA kernel never makes); unchecked, a RoI with an invalid batch index or
    a non-finite coordinate pools zeros. A torch.fx leaf, as torchvision's.
    """
    e = ROI_INPUT_ERRORS
    check_tensor("input", input, ndim=4, what="a 4-D (N, C, H, W) tensor", errors=e)
    if input.is_quantized:
        return _TORCHVISION_ROI_ALIGN(input, boxes, output_size, spatial_scale,
                                      sampling_ratio, aligned)
    check_float_dtype("input", input, e)
    pooled_h, pooled_w = pair("output_size", output_size, e, least=0)
    rois = boxes_to_rois(boxes, input.shape[0])
    check_same_device(input=input, boxes=rois)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise e.dtype(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    if values_checked(rois):
        check_rois_data(rois, input.shape[0])
    return pool(input, rois, float(spatial_scale), pooled_h, pooled_w, int(sampling_ratio),
                bool(aligned))


# torchvision's own roi_align, as imported: quantized tensors go to it, never back through
# the ``torchvision.ops.roi_align`` attribute, which may be ours (patch_torchvision, or a
# user's own assignment) and would hand the call back here.
_TORCHVISION_ROI_ALIGN = importlib.import_module("torchvision.ops.roi_align").roi_align


class RoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.RoIAlign``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launchers can pick (for the GPU compile check and
    the GPU kit's memory check, which runs these on CUDA)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for aligned in (False, True):
                x = torch.randn(1, 3, 4, 4, dtype=dtype, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 3.0]], device=device)
                roi_align(x, rois, 2, 1.0, -1, aligned).sum().backward()
                with deterministic_algorithms():
                    roi_align(x, rois, 2, 1.0, -1, aligned).sum().backward()

