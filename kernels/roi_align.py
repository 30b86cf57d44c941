"""RoI Align (torchvision semantics) as Triton kernels.

One program per (RoI, block of channels, block of output bins): the box is decoded once,
sample coordinates and bilinear weights are vectors over the bins, and each corner load is
a [BLOCK_P, BLOCK_C] gather reused across the channel block (contiguous along channels for
channels_last input). Any input strides work (NCHW, channels_last, or a strided view).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from . import reference
from ._utils import (FLOAT_DTYPES, cdiv, check_float, check_same_device, check_tensor,
                     deterministic_algorithms, is_tracing, launch, pair, pick_tuning,
                     register_tuning, row_chunks, use_triton)


# ---------------------------------------------------------------------------------------
# Kernels and the @triton.jit helpers other ops reuse (multi-level pooling, mask targets).

@triton.jit
def _roi_box(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
             r, spatial_scale, PH, PW, sampling_ratio, ALIGNED: tl.constexpr):
    """Decode RoI r: batch index, start (y, x), bin size (y, x), samples per bin (y, x)."""
    base = rois_ptr + r * 5
    b = tl.load(base).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(base + 1) * spatial_scale - offset
    start_h = tl.load(base + 2) * spatial_scale - offset
    roi_w = (tl.load(base + 3) * spatial_scale - offset) - start_w
    roi_h = (tl.load(base + 4) * spatial_scale - offset) - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    else:
        grid_h = tl.ceil(roi_h / PH).to(tl.int32)
        grid_w = tl.ceil(roi_w / PW).to(tl.int32)
    return b, start_h, start_w, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _roi_and_bins(PH, PW, BLOCK_P: tl.constexpr):
    """The RoI (grid axis 2) and the block of output bins (axis 0) of this program. CUDA
    caps axes 1 and 2 at 65,535 programs: bin blocks pass that at 1024x1024 outputs, so
    they take axis 0 (2**31 - 1), and launchers split more than 65,535 RoIs into launches
    (``row_chunks``). Enumerating (RoI, bin block) pairs on axis 0 instead would cost the
    forward 8 registers for the division (sm_90: 48, 62% occupancy, against 40, 75%)."""
    r = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return r, offs_p


@triton.jit
def _bilinear_axis(pos, size):
    """torchvision's bilinear rule along one axis for sample positions ``pos``.

    Returns (low, high, w_low, w_high, valid); a position outside [-1, size] (or NaN) is
    invalid and must contribute nothing.
    """
    valid = (pos >= -1.0) & (pos <= size)
    pos = tl.where(valid, tl.maximum(pos, 0.0), 0.0)
    low = pos.to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    pos = tl.where(at_edge, low.to(tl.float32), pos)
    frac = pos - low.to(tl.float32)
    return low, high, 1.0 - frac, frac, valid


# Image sizes and strides change from call to call (image sizes, padded batches); specializing
# on them (== 1, divisible by 16) would compile anew for each pattern, and with two elements
# per thread nothing in these tiles is vectorized by it.
_SHAPE_ARGS = ["C", "H", "W", "stride_n", "stride_c", "stride_h", "stride_w"]
_GRAD_STRIDES = ["g_stride_k", "g_stride_c", "g_stride_h", "g_stride_w"]


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _roi_align_fwd_kernel(
    input_ptr,  # (N, C, H, W) float, any strides
    rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
    out_ptr,  # (K, C, PH, PW) contiguous, input dtype
    C, H, W, stride_n, stride_c, stride_h, stride_w,
    spatial_scale, sampling_ratio, PH, PW,
    ALIGNED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r, offs_p = _roi_and_bins(PH, PW, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_p = offs_p < PH * PW
    ph = (offs_p // PW).to(tl.float32)
    pw = (offs_p % PW).to(tl.float32)
    b, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_box(
        rois_ptr, r, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    # int64 image offset, int32 offsets inside the image (checked by the launcher)
    base = input_ptr + b * stride_n + offs_c[None, :] * stride_c
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        y_lo, y_hi, wy_lo, wy_hi, valid_y = _bilinear_axis(y, H)
        row_lo = y_lo[:, None] * stride_h
        row_hi = y_hi[:, None] * stride_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            x_lo, x_hi, wx_lo, wx_hi, valid_x = _bilinear_axis(x, W)
            m = ((valid_y & valid_x & mask_p)[:, None]) & mask_c[None, :]
            col_lo = x_lo[:, None] * stride_w
            col_hi = x_hi[:, None] * stride_w
            v1 = tl.load(base + row_lo + col_lo, mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(base + row_lo + col_hi, mask=m, other=0.0).to(tl.float32)
            v3 = tl.load(base + row_hi + col_lo, mask=m, other=0.0).to(tl.float32)
            v4 = tl.load(base + row_hi + col_hi, mask=m, other=0.0).to(tl.float32)
            acc += ((wy_lo * wx_lo)[:, None] * v1 + (wy_lo * wx_hi)[:, None] * v2
                    + (wy_hi * wx_lo)[:, None] * v3 + (wy_hi * wx_hi)[:, None] * v4)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    out = acc / count
    P = PH * PW
    dst = out_ptr + r * C * P + offs_c[None, :] * P + offs_p[:, None]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=_SHAPE_ARGS + _GRAD_STRIDES)
def _roi_align_bwd_kernel(
    grad_ptr,  # (K, C, PH, PW) float, any strides: gradient of the output
    rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
    grad_input_ptr,  # (N, C, H, W) float32 accumulator, strides as given
    C, H, W, stride_n, stride_c, stride_h, stride_w,
    g_stride_k, g_stride_c, g_stride_h, g_stride_w,
    spatial_scale, sampling_ratio, PH, PW,
    ALIGNED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r, offs_p = _roi_and_bins(PH, PW, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_p = offs_p < PH * PW
    ph_i = offs_p // PW
    pw_i = offs_p % PW
    ph = ph_i.to(tl.float32)
    pw = pw_i.to(tl.float32)
    b, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_box(
        rois_ptr, r, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    # int64: the output gradient may be any strided view (its offsets can pass 2**31)
    g_src = (grad_ptr + r * g_stride_k + offs_c.to(tl.int64)[None, :] * g_stride_c
             + (ph_i.to(tl.int64) * g_stride_h + pw_i.to(tl.int64) * g_stride_w)[:, None])
    in_tile = mask_p[:, None] & mask_c[None, :]
    g = tl.load(g_src, mask=in_tile, other=0.0).to(tl.float32) / count
    base = grad_input_ptr + b * stride_n + offs_c[None, :] * stride_c
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        y_lo, y_hi, wy_lo, wy_hi, valid_y = _bilinear_axis(y, H)
        row_lo = y_lo[:, None] * stride_h
        row_hi = y_hi[:, None] * stride_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            x_lo, x_hi, wx_lo, wx_hi, valid_x = _bilinear_axis(x, W)
            m = ((valid_y & valid_x)[:, None]) & in_tile
            col_lo = x_lo[:, None] * stride_w
            col_hi = x_hi[:, None] * stride_w
            # Atomics: RoIs overlap, so several programs add into the same pixels. Relaxed:
            # nothing here reads what another program adds (the kernel's end orders them),
            # so each add is a fence-free reduction (RED), not a fenced ATOM.
            tl.atomic_add(base + row_lo + col_lo, g * (wy_lo * wx_lo)[:, None], mask=m,
                          sem="relaxed")
            tl.atomic_add(base + row_lo + col_hi, g * (wy_lo * wx_hi)[:, None], mask=m,
                          sem="relaxed")
            tl.atomic_add(base + row_hi + col_lo, g * (wy_hi * wx_lo)[:, None], mask=m,
                          sem="relaxed")
            tl.atomic_add(base + row_hi + col_hi, g * (wy_hi * wx_hi)[:, None], mask=m,
                          sem="relaxed")


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
# occupancy) and the atomic backward 48 (62%); four per thread needs 64-80 registers and
# larger tiles pass 100 (see `python -m benchmarks.static`).
_TUNING = [
    {"BLOCK_P": 16, "BLOCK_C": 32, "num_warps": 8},
    {"BLOCK_P": 8, "BLOCK_C": 32, "num_warps": 4},    # outputs of <= 8 bins
]
register_tuning(_roi_align_fwd_kernel, _TUNING)
register_tuning(_roi_align_bwd_kernel, _TUNING)

_TUNING_DETERMINISTIC = [
    {"BLOCK_C": 32, "num_warps": 1},
    {"BLOCK_C": 128, "num_warps": 4},
]
register_tuning(_roi_align_bwd_deterministic_kernel, _TUNING_DETERMINISTIC)


def _pick_tuning(channels: int, bins: int) -> dict:
    return _TUNING[1] if bins <= 8 else _TUNING[0]


def _check_image_extent(shape, strides, name: str) -> None:
    """Offsets inside one image are int32 in the kernels (fewer registers than int64);
    the image offset itself is int64. Refuse an image too large for that."""
    extent = sum((d - 1) * abs(s) for d, s in zip(shape[1:], strides[1:]))
    if extent >= 2**31:
        raise ValueError(f"{name}: one image spans {extent} elements; at most 2**31 - 1 "
                         "are supported per image")


# ---------------------------------------------------------------------------------------
# Host launchers

def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Launch the forward kernel; inputs already validated (see :func:`roi_align`)."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    rois = rois.to(torch.float32).contiguous()
    out = torch.empty(k, c, pooled_h, pooled_w, dtype=input.dtype, device=input.device)
    if k == 0 or c == 0:
        return out
    _check_image_extent(input.shape, input.stride(), "input")
    tuning = pick_tuning(_roi_align_fwd_kernel, _pick_tuning(c, pooled_h * pooled_w))
    blocks = (cdiv(pooled_h * pooled_w, tuning["BLOCK_P"]), cdiv(c, tuning["BLOCK_C"]))
    for start, end in row_chunks(k):
        launch(_roi_align_fwd_kernel, (*blocks, end - start), input, rois[start:end],
               out[start:end], c, h, w, *input.stride(), float(spatial_scale),
               int(sampling_ratio), pooled_h, pooled_w, tuning=tuning, ALIGNED=bool(aligned))
    return out


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    """Launch the backward kernel into a float32 buffer, then cast once to grad's dtype."""
    n, c, h, w = input_shape
    k = rois.shape[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rois = rois.to(torch.float32).contiguous()
    acc = torch.zeros(n, c, h, w, dtype=torch.float32, device=grad.device).to(
        memory_format=fmt)
    if k and c and n:
        _check_image_extent(acc.shape, acc.stride(), "input")
        tuning = pick_tuning(_roi_align_bwd_kernel, _pick_tuning(c, pooled_h * pooled_w))
        blocks = (cdiv(pooled_h * pooled_w, tuning["BLOCK_P"]), cdiv(c, tuning["BLOCK_C"]))
        for start, end in row_chunks(k):
            launch(_roi_align_bwd_kernel, (*blocks, end - start), grad[start:end],
                   rois[start:end], acc, c, h, w, *acc.stride(), *grad.stride(),
                   float(spatial_scale), int(sampling_ratio), pooled_h, pooled_w,
                   tuning=tuning, ALIGNED=bool(aligned))
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
    _check_image_extent(out.shape, out.stride(), "input")
    rows, cols, weights = reference.sampling_entries(
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
    """Data checks that need the values: one host sync, skipped while tracing."""
    if rois.numel() == 0 or is_tracing():
        return
    batch = rois[:, 0]
    finite = torch.isfinite(rois).all()
    lo, hi, ok = torch.stack([batch.min().double(), batch.max().double(),
                              finite.double()]).tolist()
    if not ok:
        raise ValueError(f"{name} must be finite, got NaN or infinite coordinates")
    if lo < 0 or hi >= batch_size or not bool((batch == batch.floor()).all()):
        raise ValueError(f"{name} batch indices must be integers in [0, {batch_size}), "
                         f"got values in [{lo:g}, {hi:g}]")


def _is_channels_last(t: Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("maskrcnn_triton::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                  pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    check_rois_data(rois, input.shape[0])
    impl = roi_align_forward if use_triton(input) else reference.roi_align_forward
    return impl(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


@torch.library.custom_op("maskrcnn_triton::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                           pooled_w: int, sampling_ratio: int, aligned: bool, batch: int,
                           channels: int, height: int, width: int,
                           channels_last: bool) -> Tensor:
    shape = (batch, channels, height, width)
    if use_triton(grad):
        impl = (roi_align_backward_deterministic if torch.are_deterministic_algorithms_enabled()
                else roi_align_backward)
        return impl(grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                    shape, channels_last)
    out = reference.roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w,
                                       sampling_ratio, aligned, shape)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


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
    ctx.channels_last = _is_channels_last(input)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = _roi_align_backward_op(grad, rois, *ctx.args, *ctx.shape, ctx.channels_last)
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public API

def boxes_to_rois(boxes, batch_size: int | None = None, name: str = "boxes") -> Tensor:
    """Validate ``Tensor[K, 5]`` or ``list[Tensor[L, 4]]`` and return the (K, 5) form."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{name} must be Tensor[K, 5] or list[Tensor[L, 4]], "
                             f"got shape {tuple(boxes.shape)}")
        check_float(name, boxes)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"{name} must be Tensor[K, 5] or list[Tensor[L, 4]], "
                        f"got {type(boxes).__name__}")
    if batch_size is not None and len(boxes) != batch_size:
        raise ValueError(f"{name} has {len(boxes)} entries but input has batch size "
                         f"{batch_size}; pass one Tensor[L, 4] per image")
    if not boxes:
        raise ValueError(f"{name} must not be an empty list")
    for i, b in enumerate(boxes):
        check_tensor(f"{name}[{i}]", b, ndim=2)
        if b.shape[1] != 4:
            raise ValueError(f"{name}[{i}] must be Tensor[L, 4], got shape {tuple(b.shape)}")
        check_float(f"{name}[{i}]", b)
        check_same_device(**{f"{name}[0]": boxes[0], f"{name}[{i}]": b})
    dtype = boxes[0].dtype
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], 1)
                      for i, b in enumerate(boxes)], 0)
    return rois


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Drop-in for ``torchvision.ops.roi_align``.

    input: (N, C, H, W) float32/float16/bfloat16 (float64 runs the reference path), NCHW or
    channels_last. boxes: Tensor[K, 5] (batch index, x1, y1, x2, y2) or list[Tensor[L, 4]].
    Returns (K, C, PH, PW) in input's dtype. With Tensor[K, 5] boxes the batch indices are
    checked on the host (one sync); list boxes need no check.
    """
    check_tensor("input", input, ndim=4, what="a 4-D (N, C, H, W) tensor")
    if not input.is_floating_point() or input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    pooled_h, pooled_w = pair("output_size", output_size)
    rois = boxes_to_rois(boxes, input.shape[0])
    check_same_device(input=input, boxes=rois)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    return _roi_align_op(input, rois, float(spatial_scale), pooled_h, pooled_w,
                         int(sampling_ratio), bool(aligned))


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

