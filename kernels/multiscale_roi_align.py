"""FPN multi-level RoI Align (torchvision.ops.MultiScaleRoIAlign) in one kernel launch.

torchvision assigns levels in Python, then runs one ``roi_align`` per level with an index
gather before and a scatter after. Here one program per (RoI, block of channels, block of
bins) computes its RoI's level with torchvision's LevelMapper arithmetic, picks that
level's base pointer, shape, strides and scale from per-level arguments (up to
``MAX_LEVELS`` maps, passed as separate arguments; ``NUM_LEVELS`` is a constexpr), pools as
:mod:`kernels.roi_align` does (aligned=False) and writes the output in the original RoI
order. The backward is the same program layout scattering (atomics) into one float32
buffer that holds every level's gradient; under ``torch.use_deterministic_algorithms`` it
is instead kernels.roi_align's atomic-free backward per level (bitwise reproducible).

RoIs torchvision leaves at zero (a negative box area gives a NaN level that matches no
level) are zero here too; so are RoIs with non-finite coordinates (torchvision's result
for them is undefined).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from . import reference
from ._utils import (FLOAT_DTYPES, cdiv, check_same_device, check_tensor,
                     deterministic_algorithms, launch, pair, pick_tuning, register_tuning,
                     row_chunks, use_triton)
from .roi_align import (_bilinear_axis, _check_image_extent, _is_channels_last, _roi_and_bins,
                        _roi_box, boxes_to_rois, roi_align_backward_deterministic)

MAX_LEVELS = 5


# ---------------------------------------------------------------------------------------
# Kernels

# Map sizes and strides change with the padded batch size during training; specializing on
# them (== 1, divisible by 16) would recompile for each new combination, and with two
# elements per thread nothing in the tile is vectorized by it.
_SHAPE_ARGS = [f"{a}{i}" for i in range(5) for a in ("H", "W", "sn", "sc", "sh", "sw")]

@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """The per-level argument of level ``lvl`` (a select, so pointers and mixed int widths
    work; only the first NUM_LEVELS arguments are read)."""
    v = v0
    if NUM_LEVELS > 1:
        v = tl.where(lvl == 1, v1, v)
    if NUM_LEVELS > 2:
        v = tl.where(lvl == 2, v2, v)
    if NUM_LEVELS > 3:
        v = tl.where(lvl == 3, v3, v)
    if NUM_LEVELS > 4:
        v = tl.where(lvl == 4, v4, v)
    return v


@triton.jit
def _along_p(v, P_MAJOR: tl.constexpr):
    """A vector over output bins as a tile axis: the fast (lane) axis when P_MAJOR."""
    if P_MAJOR:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _along_c(v, P_MAJOR: tl.constexpr):
    """A vector over channels as a tile axis: the fast (lane) axis unless P_MAJOR."""
    if P_MAJOR:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _roi_level(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
               r, k_min, k_max, canonical_scale, canonical_level, eps,
               NUM_LEVELS: tl.constexpr):
    """torchvision's LevelMapper for RoI r: (level index in [0, NUM_LEVELS), pooled?).

    floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps) clamped to
    [k_min, k_max], minus k_min, in float32 with IEEE sqrt and division as torch computes
    it. A NaN level (negative area) or an index outside the maps pools nothing, as in
    torchvision; so does a RoI with non-finite coordinates.
    """
    base = rois_ptr + r * 5
    x1 = tl.load(base + 1)
    y1 = tl.load(base + 2)
    x2 = tl.load(base + 3)
    y2 = tl.load(base + 4)
    big = float("inf")
    ok = (tl.abs(x1) < big) & (tl.abs(y1) < big) & (tl.abs(x2) < big) & (tl.abs(y2) < big)
    if NUM_LEVELS == 1:
        lvl = 0
    else:
        s = tl.sqrt_rn((x2 - x1) * (y2 - y1))
        t = tl.floor(canonical_level + tl.log2(tl.div_rn(s, canonical_scale)) + eps)
        t = tl.minimum(tl.maximum(t, k_min), k_max)
        ok = ok & (s == s)
        lvl = (tl.where(ok, t, k_min) - k_min).to(tl.int32)
        ok = ok & (lvl >= 0) & (lvl < NUM_LEVELS)
    return lvl, ok


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _multiscale_roi_align_fwd_kernel(
    rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
    out_ptr,  # (K, C, PH, PW) contiguous, feature dtype
    x0_ptr, H0, W0, sn0, sc0, sh0, sw0, scale0,  # level 0: (N, C, H0, W0), any strides
    x1_ptr, H1, W1, sn1, sc1, sh1, sw1, scale1,  # levels 1..4: the same, read only when
    x2_ptr, H2, W2, sn2, sc2, sh2, sw2, scale2,  # NUM_LEVELS covers them
    x3_ptr, H3, W3, sn3, sc3, sh3, sw3, scale3,
    x4_ptr, H4, W4, sn4, sc4, sh4, sw4, scale4,
    C, k_min, k_max, canonical_scale, canonical_level, eps, sampling_ratio, PH, PW,
    NUM_LEVELS: tl.constexpr, P_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, offs_p = _roi_and_bins(PH, PW, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_p = offs_p < PH * PW
    ph = (offs_p // PW).to(tl.float32)
    pw = (offs_p % PW).to(tl.float32)
    lvl, ok = _roi_level(rois_ptr, r, k_min, k_max, canonical_scale, canonical_level, eps,
                         NUM_LEVELS)
    x_ptr = _pick(lvl, x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, NUM_LEVELS)
    H = _pick(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = _pick(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    stride_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    stride_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    stride_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    stride_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)
    scale = _pick(lvl, scale0, scale1, scale2, scale3, scale4, NUM_LEVELS)
    b, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_box(
        rois_ptr, r, scale, PH, PW, sampling_ratio, False)
    # an unpooled RoI runs no samples and stores zeros
    grid_h = tl.where(ok, grid_h, 0)
    grid_w = tl.where(ok, grid_w, 0)
    # the image's base is a 64-bit scalar; offsets inside one image are int32 (checked)
    base = (x_ptr + b * stride_n) + _along_c(offs_c * stride_c, P_MAJOR)
    # (BLOCK_P, BLOCK_C), or (BLOCK_C, BLOCK_P) when P_MAJOR
    acc = (_along_p(tl.zeros((BLOCK_P,), dtype=tl.float32), P_MAJOR)
           + _along_c(tl.zeros((BLOCK_C,), dtype=tl.float32), P_MAJOR))
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        y_lo, y_hi, wy_lo, wy_hi, valid_y = _bilinear_axis(y, H)
        row_lo = y_lo * stride_h
        row_hi = y_hi * stride_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            x_lo, x_hi, wx_lo, wx_hi, valid_x = _bilinear_axis(x, W)
            m = _along_p(valid_y & valid_x & mask_p, P_MAJOR) & _along_c(mask_c, P_MAJOR)
            col_lo = x_lo * stride_w
            col_hi = x_hi * stride_w
            v1 = tl.load(base + _along_p(row_lo + col_lo, P_MAJOR), mask=m, other=0.0)
            v2 = tl.load(base + _along_p(row_lo + col_hi, P_MAJOR), mask=m, other=0.0)
            v3 = tl.load(base + _along_p(row_hi + col_lo, P_MAJOR), mask=m, other=0.0)
            v4 = tl.load(base + _along_p(row_hi + col_hi, P_MAJOR), mask=m, other=0.0)
            acc += (_along_p(wy_lo * wx_lo, P_MAJOR) * v1.to(tl.float32)
                    + _along_p(wy_lo * wx_hi, P_MAJOR) * v2.to(tl.float32)
                    + _along_p(wy_hi * wx_lo, P_MAJOR) * v3.to(tl.float32)
                    + _along_p(wy_hi * wx_hi, P_MAJOR) * v4.to(tl.float32))
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    out = acc / count
    P = PH * PW
    dst = (out_ptr + r * C * P) + _along_c(offs_c.to(tl.int64) * P, P_MAJOR) + _along_p(
        offs_p, P_MAJOR)
    tl.store(dst, out.to(out_ptr.dtype.element_ty),
             mask=_along_p(mask_p, P_MAJOR) & _along_c(mask_c, P_MAJOR))


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _multiscale_roi_align_bwd_kernel(
    grad_ptr,  # (K, C, PH, PW) float, any strides: gradient of the output
    rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
    g0_ptr, H0, W0, sn0, sc0, sh0, sw0, scale0,  # level 0 gradient: (N, C, H0, W0) float32
    g1_ptr, H1, W1, sn1, sc1, sh1, sw1, scale1,  # levels 1..4: the same, touched only when
    g2_ptr, H2, W2, sn2, sc2, sh2, sw2, scale2,  # NUM_LEVELS covers them
    g3_ptr, H3, W3, sn3, sc3, sh3, sw3, scale3,
    g4_ptr, H4, W4, sn4, sc4, sh4, sw4, scale4,
    C, g_stride_k, g_stride_c, g_stride_h, g_stride_w,
    k_min, k_max, canonical_scale, canonical_level, eps, sampling_ratio, PH, PW,
    NUM_LEVELS: tl.constexpr, P_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, offs_p = _roi_and_bins(PH, PW, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_p = offs_p < PH * PW
    ph_i = offs_p // PW
    pw_i = offs_p % PW
    ph = ph_i.to(tl.float32)
    pw = pw_i.to(tl.float32)
    lvl, ok = _roi_level(rois_ptr, r, k_min, k_max, canonical_scale, canonical_level, eps,
                         NUM_LEVELS)
    gi_ptr = _pick(lvl, g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, NUM_LEVELS)
    H = _pick(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = _pick(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    stride_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    stride_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    stride_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    stride_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)
    scale = _pick(lvl, scale0, scale1, scale2, scale3, scale4, NUM_LEVELS)
    b, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_box(
        rois_ptr, r, scale, PH, PW, sampling_ratio, False)
    grid_h = tl.where(ok, grid_h, 0)
    grid_w = tl.where(ok, grid_w, 0)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    # int64: the output gradient may be any strided view (its offsets can pass 2**31)
    g_src = ((grad_ptr + r * g_stride_k) + _along_c(offs_c.to(tl.int64) * g_stride_c, P_MAJOR)
             + _along_p(ph_i.to(tl.int64) * g_stride_h + pw_i.to(tl.int64) * g_stride_w,
                        P_MAJOR))
    in_tile = _along_p(mask_p, P_MAJOR) & _along_c(mask_c, P_MAJOR)
    g = tl.load(g_src, mask=in_tile, other=0.0).to(tl.float32) / count
    base = (gi_ptr + b * stride_n) + _along_c(offs_c * stride_c, P_MAJOR)
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        y_lo, y_hi, wy_lo, wy_hi, valid_y = _bilinear_axis(y, H)
        row_lo = y_lo * stride_h
        row_hi = y_hi * stride_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            x_lo, x_hi, wx_lo, wx_hi, valid_x = _bilinear_axis(x, W)
            m = _along_p(valid_y & valid_x, P_MAJOR) & in_tile
            col_lo = x_lo * stride_w
            col_hi = x_hi * stride_w
            # Atomics: RoIs overlap, so several programs add into the same pixels; relaxed
            # (no fence): nothing reads them before the kernel ends.
            tl.atomic_add(base + _along_p(row_lo + col_lo, P_MAJOR),
                          g * _along_p(wy_lo * wx_lo, P_MAJOR), mask=m, sem="relaxed")
            tl.atomic_add(base + _along_p(row_lo + col_hi, P_MAJOR),
                          g * _along_p(wy_lo * wx_hi, P_MAJOR), mask=m, sem="relaxed")
            tl.atomic_add(base + _along_p(row_hi + col_lo, P_MAJOR),
                          g * _along_p(wy_hi * wx_lo, P_MAJOR), mask=m, sem="relaxed")
            tl.atomic_add(base + _along_p(row_hi + col_hi, P_MAJOR),
                          g * _along_p(wy_hi * wx_hi, P_MAJOR), mask=m, sem="relaxed")


# One table per kernel: the launcher picks a row, the GPU compile check builds every row.
# Two tile elements per thread, as kernels.roi_align: on sm_90 the forward needs 40
# registers (75% occupancy) and the backward 42 (62%); 4 per thread: 64-101, 8 per
# thread: 115-180, and larger tiles spill.
_TUNING = [
    {"BLOCK_P": 16, "BLOCK_C": 32, "num_warps": 8},
    {"BLOCK_P": 8, "BLOCK_C": 32, "num_warps": 4},    # outputs of <= 8 bins
]
register_tuning(_multiscale_roi_align_fwd_kernel, _TUNING)
register_tuning(_multiscale_roi_align_bwd_kernel, _TUNING)


def _pick_tuning(channels: int, bins: int) -> dict:
    return _TUNING[1] if bins <= 8 else _TUNING[0]


# ---------------------------------------------------------------------------------------
# Host launchers

def _level_args(tensors: list[Tensor], scales: list[float]) -> list:
    """Per-level kernel arguments (pointer, H, W, 4 strides, scale), padded to MAX_LEVELS
    with copies of level 0 that the kernel never reads."""
    args = []
    for i in range(MAX_LEVELS):
        j = i if i < len(tensors) else 0
        t = tensors[j]
        args += [t, t.shape[2], t.shape[3], *t.stride(), float(scales[j])]
    return args


def _p_major(tensors: list[Tensor]) -> bool:
    """Lanes along output bins unless channels are contiguous (channels_last) in most maps:
    in NCHW neighbouring bins sample neighbouring pixels of one plane, in channels_last a
    pixel's channels are one contiguous vector."""
    return 2 * sum(t.stride(1) == 1 for t in tensors) <= len(tensors)


def _mapper_args(k_min: int, k_max: int, canonical_scale: float, canonical_level: float,
                 eps: float) -> list:
    return [float(k_min), float(k_max), float(canonical_scale), float(canonical_level),
            float(eps)]


def multiscale_roi_align_forward(features: list[Tensor], rois: Tensor, scales: list[float],
                                 k_min: int, k_max: int, canonical_scale: float,
                                 canonical_level: float, eps: float, pooled_h: int,
                                 pooled_w: int, sampling_ratio: int) -> Tensor:
    """Launch the forward kernel once for all levels; inputs already validated."""
    n, c = features[0].shape[:2]
    k = rois.shape[0]
    rois = rois.to(torch.float32).contiguous()
    out = torch.empty(k, c, pooled_h, pooled_w, dtype=features[0].dtype,
                      device=features[0].device)
    if k == 0 or c == 0:
        return out
    for i, f in enumerate(features):
        _check_image_extent(f.shape, f.stride(), f"features[{i}]")
    tuning = pick_tuning(_multiscale_roi_align_fwd_kernel,
                         _pick_tuning(c, pooled_h * pooled_w))
    blocks = (cdiv(pooled_h * pooled_w, tuning["BLOCK_P"]), cdiv(c, tuning["BLOCK_C"]))
    for start, end in row_chunks(k):   # RoIs on grid axis 2: at most 65,535 a launch
        launch(_multiscale_roi_align_fwd_kernel, (*blocks, end - start), rois[start:end],
               out[start:end], *_level_args(features, scales), c,
               *_mapper_args(k_min, k_max, canonical_scale, canonical_level, eps),
               int(sampling_ratio), pooled_h, pooled_w,
               tuning=tuning, NUM_LEVELS=len(features), P_MAJOR=_p_major(features))
    return out


def _level_views(flat: Tensor, batch: int, channels: int, heights: list[int],
                 widths: list[int], channels_last: list[bool]) -> list[Tensor]:
    """Per-level (N, C, H, W) views of one flat buffer, each in its level's layout."""
    views, offset = [], 0
    for h, w, cl in zip(heights, widths, channels_last):
        size = batch * channels * h * w
        chunk = flat[offset:offset + size]
        views.append(chunk.view(batch, h, w, channels).permute(0, 3, 1, 2) if cl
                     else chunk.view(batch, channels, h, w))
        offset += size
    return views


def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, scales: list[float],
                                  k_min: int, k_max: int, canonical_scale: float,
                                  canonical_level: float, eps: float, pooled_h: int,
                                  pooled_w: int, sampling_ratio: int, batch: int,
                                  channels: int, heights: list[int], widths: list[int],
                                  channels_last: list[bool]) -> Tensor:
    """Every level's input gradient in one flat buffer (see :func:`_level_views`): one
    zero-fill, one kernel launch into float32, one cast to grad's dtype."""
    k = rois.shape[0]
    total = sum(batch * channels * h * w for h, w in zip(heights, widths))
    rois = rois.to(torch.float32).contiguous()
    acc = torch.zeros(total, dtype=torch.float32, device=grad.device)
    if k and channels and batch:
        views = _level_views(acc, batch, channels, heights, widths, channels_last)
        for i, v in enumerate(views):
            _check_image_extent(v.shape, v.stride(), f"features[{i}]")
        tuning = pick_tuning(_multiscale_roi_align_bwd_kernel,
                             _pick_tuning(channels, pooled_h * pooled_w))
        blocks = (cdiv(pooled_h * pooled_w, tuning["BLOCK_P"]),
                  cdiv(channels, tuning["BLOCK_C"]))
        for start, end in row_chunks(k):
            launch(_multiscale_roi_align_bwd_kernel, (*blocks, end - start), grad[start:end],
                   rois[start:end], *_level_args(views, scales), channels, *grad.stride(),
                   *_mapper_args(k_min, k_max, canonical_scale, canonical_level, eps),
                   int(sampling_ratio), pooled_h, pooled_w,
                   tuning=tuning, NUM_LEVELS=len(heights), P_MAJOR=_p_major(views))
    return acc.to(grad.dtype)


def _flatten_levels(grads: list[Tensor], channels_last: list[bool]) -> Tensor:
    """The inverse of :func:`_level_views`: per-level gradients into one flat buffer."""
    parts = [(g.permute(0, 2, 3, 1) if cl else g).reshape(-1)
             for g, cl in zip(grads, channels_last)]
    return torch.cat(parts)


def multiscale_roi_align_backward_deterministic(
        grad: Tensor, rois: Tensor, scales: list[float], k_min: int, k_max: int,
        canonical_scale: float, canonical_level: float, eps: float, pooled_h: int,
        pooled_w: int, sampling_ratio: int, batch: int, channels: int, heights: list[int],
        widths: list[int], channels_last: list[bool]) -> Tensor:
    """Bitwise-reproducible backward (under ``torch.use_deterministic_algorithms``): RoIs
    grouped by level on the host side, then kernels.roi_align's atomic-free backward per
    level. Opt-in: it gathers RoIs per level and syncs, which the atomic kernel avoids."""
    levels = roi_levels(rois, len(heights), k_min, k_max, canonical_scale, canonical_level,
                        eps)
    grads = []
    for lvl, (scale, h, w, cl) in enumerate(zip(scales, heights, widths, channels_last)):
        idx = (levels == lvl).nonzero().flatten()
        if idx.numel():
            g = roi_align_backward_deterministic(
                grad[idx], rois[idx], scale, pooled_h, pooled_w, sampling_ratio, False,
                (batch, channels, h, w), cl)
        else:
            g = grad.new_zeros(batch, h, w, channels).permute(0, 3, 1, 2) if cl else \
                grad.new_zeros(batch, channels, h, w)
        grads.append(g)
    return _flatten_levels(grads, channels_last)


# ---------------------------------------------------------------------------------------
# Reference path: levels computed vectorized, then the reference RoI Align per level.

def roi_levels(rois: Tensor, num_levels: int, k_min: int, k_max: int,
               canonical_scale: float, canonical_level: float, eps: float,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(K,) int64 level index of each RoI (torchvision's LevelMapper), -1 where none is
    pooled: a NaN level (negative area), an index outside the maps, non-finite coordinates."""
    r = rois.to(dtype)
    ok = torch.isfinite(r[:, 1:]).all(1)
    if num_levels == 1:
        lvl = torch.zeros(r.shape[0], dtype=torch.int64, device=r.device)
    else:
        s = torch.sqrt((r[:, 3] - r[:, 1]) * (r[:, 4] - r[:, 2]))
        t = torch.floor(canonical_level + torch.log2(s / canonical_scale)
                        + torch.tensor(eps, dtype=dtype))
        t = torch.clamp(t, min=k_min, max=k_max)
        ok = ok & ~torch.isnan(t)
        lvl = torch.where(ok, t, torch.full_like(t, k_min)).to(torch.int64) - k_min
        ok = ok & (lvl >= 0) & (lvl < num_levels)
    return torch.where(ok, lvl, torch.full_like(lvl, -1))


def _reference_forward(features, rois, scales, k_min, k_max, canonical_scale,
                       canonical_level, eps, pooled_h, pooled_w, sampling_ratio):
    n, c = features[0].shape[:2]
    compute = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    levels = roi_levels(rois, len(features), k_min, k_max, canonical_scale, canonical_level,
                        eps, compute)
    out = torch.zeros(rois.shape[0], c, pooled_h, pooled_w, dtype=features[0].dtype,
                      device=features[0].device)
    for lvl, (feature, scale) in enumerate(zip(features, scales)):
        idx = (levels == lvl).nonzero().flatten()
        if idx.numel():
            out[idx] = reference.roi_align_forward(feature, rois[idx], scale, pooled_h,
                                                   pooled_w, sampling_ratio, False)
    return out


def _reference_backward(grad, rois, scales, k_min, k_max, canonical_scale, canonical_level,
                        eps, pooled_h, pooled_w, sampling_ratio, batch, channels, heights,
                        widths, channels_last):
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    levels = roi_levels(rois, len(heights), k_min, k_max, canonical_scale, canonical_level,
                        eps, compute)
    grads = []
    for lvl, (scale, h, w) in enumerate(zip(scales, heights, widths)):
        idx = (levels == lvl).nonzero().flatten()
        grads.append(reference.roi_align_backward(grad[idx], rois[idx], scale, pooled_h,
                                                  pooled_w, sampling_ratio, False,
                                                  (batch, channels, h, w)))
    return _flatten_levels(grads, channels_last)


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd

@torch.library.custom_op("maskrcnn_triton::multiscale_roi_align", mutates_args=())
def _multiscale_roi_align_op(features: list[Tensor], rois: Tensor, scales: list[float],
                             k_min: int, k_max: int, canonical_scale: float,
                             canonical_level: float, eps: float, pooled_h: int,
                             pooled_w: int, sampling_ratio: int) -> Tensor:
    impl = (multiscale_roi_align_forward if use_triton(features[0])
            else _reference_forward)
    return impl(features, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps,
                pooled_h, pooled_w, sampling_ratio)


@_multiscale_roi_align_op.register_fake
def _(features, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps, pooled_h,
      pooled_w, sampling_ratio):
    return features[0].new_empty(rois.shape[0], features[0].shape[1], pooled_h, pooled_w)


@torch.library.custom_op("maskrcnn_triton::multiscale_roi_align_backward", mutates_args=())
def _multiscale_roi_align_backward_op(
        grad: Tensor, rois: Tensor, scales: list[float], k_min: int, k_max: int,
        canonical_scale: float, canonical_level: float, eps: float, pooled_h: int,
        pooled_w: int, sampling_ratio: int, batch: int, channels: int, heights: list[int],
        widths: list[int], channels_last: list[bool]) -> Tensor:
    if not use_triton(grad):
        impl = _reference_backward
    elif torch.are_deterministic_algorithms_enabled():
        impl = multiscale_roi_align_backward_deterministic
    else:
        impl = multiscale_roi_align_backward
    return impl(grad, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps,
                pooled_h, pooled_w, sampling_ratio, batch, channels, heights, widths,
                channels_last)


@_multiscale_roi_align_backward_op.register_fake
def _(grad, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps, pooled_h,
      pooled_w, sampling_ratio, batch, channels, heights, widths, channels_last):
    return grad.new_empty(sum(batch * channels * h * w for h, w in zip(heights, widths)))


def _setup_context(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.args = args
    ctx.batch, ctx.channels = features[0].shape[:2]
    ctx.heights = [f.shape[2] for f in features]
    ctx.widths = [f.shape[3] for f in features]
    ctx.channels_last = [_is_channels_last(f) for f in features]


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    flat = _multiscale_roi_align_backward_op(grad, rois, *ctx.args, ctx.batch, ctx.channels,
                                             ctx.heights, ctx.widths, ctx.channels_last)
    grads = _level_views(flat, ctx.batch, ctx.channels, ctx.heights, ctx.widths,
                         ctx.channels_last)
    return (grads,) + (None,) * (1 + len(ctx.args))


_multiscale_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Scales and level range: torchvision's poolers._setup_scales, on host ints only.

def infer_scale(feature_size: tuple[int, int], image_size: tuple[int, int]) -> float:
    """torchvision's ``_infer_scale``: 2 ** round(log2(feature height / image height)).

    torchvision rounds the ratio to float32 first; that can only change the result for a
    ratio within float32 precision of sqrt(2) * 2**k, which no pair of image sizes gives.
    Plain host floats keep this traceable (torch.compile, dynamic shapes specialize here).
    """
    return 2.0 ** round(math.log2(int(feature_size[0]) / int(image_size[0])))


class LevelMapper:
    """The level range and constants of torchvision's ``poolers.LevelMapper``; calling it
    maps boxes to level indices exactly as torchvision does (-1: none pooled)."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: float = 224,
                 canonical_level: float = 4, eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        rois = boxes_to_rois(boxlists)
        return roi_levels(rois, self.k_max - self.k_min + 1, self.k_min, self.k_max,
                          self.s0, self.lvl0, self.eps)

    def __repr__(self) -> str:
        return (f"LevelMapper(k_min={self.k_min}, k_max={self.k_max}, "
                f"canonical_scale={self.s0}, canonical_level={self.lvl0})")


def setup_scales(features: list[Tensor], image_shapes, canonical_scale: float = 224,
                 canonical_level: float = 4) -> tuple[list[float], LevelMapper]:
    """Per-level scales and the level mapper, from feature and image sizes (torchvision's)."""
    max_h = max(int(s[0]) for s in image_shapes)
    max_w = max(int(s[1]) for s in image_shapes)
    scales = [infer_scale(tuple(f.shape[-2:]), (max_h, max_w)) for f in features]
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    return scales, LevelMapper(k_min, k_max, canonical_scale, canonical_level)


# ---------------------------------------------------------------------------------------
# Public API

def _check_features(features, name: str, names: list[str]) -> None:
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{name} must be a list of (N, C, H, W) tensors, "
                        f"got {type(features).__name__}")
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ValueError(f"{name} must hold 1 to {MAX_LEVELS} feature maps, "
                         f"got {len(features)}")
    first = features[0]
    for label, f in zip(names, features):
        check_tensor(label, f, ndim=4, what="a 4-D (N, C, H, W) tensor")
        if f.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{label} must be float32, float16, bfloat16 or float64, "
                            f"got {f.dtype}")
        if f.dtype != first.dtype:
            raise ValueError(f"{label} has dtype {f.dtype} but {names[0]} has {first.dtype}; "
                             "all feature maps must share one dtype")
        check_same_device(**{names[0]: first, label: f})
        if f.shape[:2] != first.shape[:2]:
            raise ValueError(f"{label} has (N, C) = {tuple(f.shape[:2])} but {names[0]} has "
                             f"{tuple(first.shape[:2])}; all maps need the same batch and "
                             "channels")
        if f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"{label} must have H, W >= 1, got shape {tuple(f.shape)}")


def _check_image_shapes(image_shapes, num_images: int) -> None:
    if not isinstance(image_shapes, (list, tuple)):
        raise TypeError(f"image_shapes must be a list of (height, width), "
                        f"got {type(image_shapes).__name__}")
    if len(image_shapes) != num_images:
        raise ValueError(f"image_shapes has {len(image_shapes)} entries but there are "
                         f"{num_images} images (boxes lists); pass one (height, width) each")
    for i, s in enumerate(image_shapes):
        ok = (isinstance(s, (tuple, list, torch.Size)) and len(s) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s))
        if not ok:
            raise ValueError(f"image_shapes[{i}] must be a (height, width) pair of positive "
                             f"ints, got {s!r}")


def _check_boxes(boxes, batch: int) -> Tensor:
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be list[Tensor[L, 4]] (one per image), "
                        f"got {type(boxes).__name__}")
    return boxes_to_rois(boxes, batch)


def _pool(features: list[Tensor], rois: Tensor, output_size, sampling_ratio, scales,
          mapper, *, checked: bool = False) -> Tensor:
    """Pool (K, 5) ``rois`` from ``features`` with ``scales`` and a LevelMapper-like
    ``mapper`` (k_min, k_max, s0, lvl0, eps: ours or torchvision's). ``checked``: the maps
    and the RoIs' device were validated by the caller (kernels.patch's stand-in is not)."""
    if not checked:
        _check_features(features, "x", [f"x[{i}]" for i in range(
            len(features) if isinstance(features, (list, tuple)) else 0)])
        check_same_device(**{"x[0]": features[0], "boxes": rois})
    pooled_h, pooled_w = pair("output_size", output_size)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    return _multiscale_roi_align_op(
        list(features), rois, [float(s) for s in scales], int(mapper.k_min),
        int(mapper.k_max), float(mapper.s0), float(mapper.lvl0), float(mapper.eps),
        pooled_h, pooled_w, int(sampling_ratio))


def multiscale_roi_align(features: list[Tensor], boxes: list[Tensor], image_shapes,
                         output_size, sampling_ratio: int, canonical_scale: float = 224,
                         canonical_level: float = 4) -> Tensor:
    """FPN RoI Align over ``features`` (fine to coarse) in one kernel launch.

    features: 1..5 (N, C, H_l, W_l) maps of one dtype (float32/float16/bfloat16; float64
    runs the reference path), NCHW, channels_last or any strides. boxes: one Tensor[L, 4]
    (x1, y1, x2, y2, image coordinates) per image. image_shapes: one (height, width) per
    image. Scales and levels are torchvision's (``MultiScaleRoIAlign``, aligned=False).
    Returns (sum L, C, PH, PW) in the features' dtype, RoIs in input order.
    """
    _check_features(features, "features", [f"features[{i}]" for i in range(
        len(features) if isinstance(features, (list, tuple)) else 0)])
    rois = _check_boxes(boxes, features[0].shape[0])
    check_same_device(**{"features[0]": features[0], "boxes": rois})
    _check_image_shapes(image_shapes, len(boxes))
    scales, mapper = setup_scales(features, image_shapes, canonical_scale, canonical_level)
    return _pool(features, rois, output_size, sampling_ratio, scales, mapper, checked=True)


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``, all levels in one launch.

    As torchvision, the scales are inferred on the first call and kept (``self.scales``,
    ``self.map_levels``), and maps are taken from ``x`` in its own order. Unlike it, every
    name in ``featmap_names`` must be present in ``x`` and at most 5 maps are pooled.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.map_levels = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        if not isinstance(x, Mapping):
            raise TypeError(f"x must be a dict of feature maps, got {type(x).__name__}")
        missing = [n for n in self.featmap_names if n not in x]
        if missing:
            raise ValueError(f"x has no feature map named {missing} (has {list(x)})")
        names = [k for k in x if k in self.featmap_names]
        features = [x[k] for k in names]
        _check_features(features, "x", [f"x[{k!r}]" for k in names])
        rois = _check_boxes(boxes, features[0].shape[0])
        check_same_device(**{f"x[{names[0]!r}]": features[0], "boxes": rois})
        _check_image_shapes(image_shapes, len(boxes))
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        if len(self.scales) != len(features):
            raise ValueError(f"x gives {len(features)} feature maps but the scales inferred "
                             f"on the first call are for {len(self.scales)}")
        return _pool(features, rois, self.output_size, self.sampling_ratio, self.scales,
                     self.map_levels, checked=True)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})")


# ---------------------------------------------------------------------------------------
# GPU compile check: launch every specialization the launchers can pick.

def _compile_examples(device: str = "cpu") -> None:
    """Run forward and backward on tiny tensors: each dtype, every level count, NCHW
    (P_MAJOR) and channels_last maps, and the deterministic backward. The compile check
    expands each launch over both tuning rows; sampling ratio and sizes are runtime. The
    GPU kit's memory check runs these on CUDA."""
    image = [(32, 48)]
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 20.0], [0.0, 0.0, 3.0, 4.0]], device=device)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for num_levels in range(1, MAX_LEVELS + 1):
            for fmt in (torch.contiguous_format, torch.channels_last):
                feats = [torch.randn(1, 3, max(16 >> lvl, 1), max(24 >> lvl, 1), dtype=dtype,
                                     device=device).to(memory_format=fmt).requires_grad_()
                         for lvl in range(num_levels)]
                out = multiscale_roi_align(feats, boxes, image, 2, 2)
                out.float().sum().backward()
                if num_levels == 2:   # the deterministic backward's roi_align kernels
                    with deterministic_algorithms():
                        multiscale_roi_align(feats, boxes, image, 2, -1).float().sum().backward()
