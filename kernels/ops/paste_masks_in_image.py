"""Mask pasting (torchvision's ``roi_heads.paste_masks_in_image``) as one Triton kernel.

torchvision pads each M x M mask, grows its box by the same factor, truncates the box to
integers, resizes the mask to the box with ``F.interpolate(bilinear, align_corners=False)``
and copies it into a zero image — a Python loop with several launches and host syncs per
mask. Here one program per (mask, tile of output pixels) does all of it: it expands and
truncates its box (torchvision's float32 arithmetic, rounding step by step), maps each
output pixel back into the padded mask's coordinates and interpolates as ``F.interpolate``
does, reading the unpadded mask (the padding is a bounds test, never a copy). Tiles that
miss the box only store zeros. With ``threshold`` the comparison happens before the store,
so the (N, H, W) float image is never materialized: the output is 1 byte per pixel.

Inference only: the op has no autograd formula (calling backward through it raises).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._boxes import COORD_LIMIT, expand_scale, expanded_int_boxes, float32, threshold_in
from .._utils import (FLOAT_DTYPES, cdiv, check_float, check_float_dtype, check_same_device,
                      check_tensor, eager, needs_grad, pair, pick_path, values_checked)
from .._launch import DTYPE_NAMES, launch, pick_tuning, register_tuning, size_bucket

_COORD_LIMIT_K = tl.constexpr(COORD_LIMIT)


# ---------------------------------------------------------------------------------------
# Kernel

@triton.jit
def _source_axis(pos, lo, hi, MP):
    """F.interpolate(align_corners=False)'s rule along one axis for output pixels ``pos``.

    The box covers output pixels lo..hi (resized length max(hi - lo + 1, 1)); the padded
    mask has MP pixels. Returns (inside, i0, i1, l0, l1): neighbours in padded coordinates
    and their weights. Indices are clamped to [0, MP - 1] for every pixel, inside or not.
    """
    length = tl.maximum(hi - lo + 1, 1)
    inside = (pos >= lo) & (pos <= hi)
    scale = tl.math.div_rn(MP.to(tl.float32), length.to(tl.float32))  # IEEE, as torch
    src = scale * ((pos - lo).to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src, (MP - 1).to(tl.float32)).to(tl.int32)
    i1 = tl.minimum(i0 + 1, MP - 1)
    l1 = src - i0.to(tl.float32)
    return inside, i0, i1, 1.0 - l1, l1


@triton.jit
def _expand_coord(c, half, scale):
    """(c - half * scale, c + half * scale) truncated to int64, as torchvision's
    ``expand_boxes(...).to(torch.int64)`` computes them in float32, one rounding per op.

    The product must be rounded before the add: a fused multiply-add (which the GPU
    compiler forms from ``c - half * scale``, even from a float64 product rounded back)
    can move a box edge across an integer. The NaN guard is a select between the two, and
    the compiler does not fuse through it (sm_90 SASS: FMUL, FSEL, FADD).
    """
    p = half * scale
    p = tl.where(p == p, p, 0.0)  # also: NaN (unchecked input) gives 0, as the host path
    lo = c - p
    hi = c + p
    lo = tl.where(lo == lo, lo, 0.0)
    hi = tl.where(hi == hi, hi, 0.0)
    lo = tl.minimum(tl.maximum(lo, -_COORD_LIMIT_K), _COORD_LIMIT_K)
    hi = tl.minimum(tl.maximum(hi, -_COORD_LIMIT_K), _COORD_LIMIT_K)
    return lo.to(tl.int64), hi.to(tl.int64)


@triton.jit
def _store_row(dst, val, mask, threshold, in_dtype, THRESHOLD: tl.constexpr):
    if THRESHOLD:
        # compare the value as the masks' dtype holds it, as (paste(...) > t) would
        val = val.to(in_dtype).to(tl.float32)
        tl.store(dst, (val > threshold).to(tl.uint8), mask=mask)
    else:
        tl.store(dst, val.to(dst.dtype.element_ty), mask=mask)


# Each image's size (and the masks' strides) would otherwise specialize the kernel (== 1,
# divisible by 16): a new compile per size pattern in the first images of a run.
@triton.jit(do_not_specialize=["H", "W", "stride_n", "stride_h", "stride_w"])
def _paste_masks_in_image_kernel(
    masks_ptr,  # (N, 1, MH, MW) float, any strides: unpadded masks
    boxes_ptr,  # (N, 4): float32 x1, y1, x2, y2 (EXPAND) or int64 expanded boxes
    out_ptr,  # (N, 1, H, W) contiguous: output dtype, or uint8 0/1 when THRESHOLD
    H, W, MH, MW, stride_n, stride_h, stride_w, padding, scale, threshold,
    EXPAND: tl.constexpr, THRESHOLD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # A tile is BLOCK_H rows of BLOCK_W pixels. Everything that depends on x (source
    # columns, weights, bounds) is computed once per tile as vectors; each row adds only
    # scalars, four gathers from the (cached) mask and one contiguous store.
    n = tl.program_id(0).to(tl.int64)
    y_first = tl.program_id(1) * BLOCK_H
    x_first = tl.program_id(2) * BLOCK_W
    x = x_first + tl.arange(0, BLOCK_W)
    if EXPAND:
        x1 = tl.load(boxes_ptr + n * 4)
        y1 = tl.load(boxes_ptr + n * 4 + 1)
        x2 = tl.load(boxes_ptr + n * 4 + 2)
        y2 = tl.load(boxes_ptr + n * 4 + 3)
        bx0, bx1 = _expand_coord((x2 + x1) * 0.5, (x2 - x1) * 0.5, scale)
        by0, by1 = _expand_coord((y2 + y1) * 0.5, (y2 - y1) * 0.5, scale)
    else:
        bx0 = tl.load(boxes_ptr + n * 4)
        by0 = tl.load(boxes_ptr + n * 4 + 1)
        bx1 = tl.load(boxes_ptr + n * 4 + 2)
        by1 = tl.load(boxes_ptr + n * 4 + 3)
    in_w = x < W
    out_rows = out_ptr + n * H * W + x  # (row y at + y * W)
    rows = tl.minimum(H - y_first, BLOCK_H)
    in_dtype = masks_ptr.dtype.element_ty
    hit = ((y_first <= by1) & (y_first + BLOCK_H > by0)
           & (x_first <= bx1) & (x_first + BLOCK_W > bx0))
    if hit:  # only tiles that meet the box read the mask
        MPH = MH + 2 * padding
        in_x, ix0, ix1, lx0, lx1 = _source_axis(x, bx0, bx1, MW + 2 * padding)
        # padded index i is mask index i - padding; the padding reads as 0
        rx0 = ix0 - padding
        rx1 = ix1 - padding
        ok_x0 = in_x & (rx0 >= 0) & (rx0 < MW)
        ok_x1 = in_x & (rx1 >= 0) & (rx1 < MW)
        col0 = rx0 * stride_w
        col1 = rx1 * stride_w
        base = masks_ptr + n * stride_n
        for r in range(0, rows):
            y = y_first + r
            in_y, iy0, iy1, ly0, ly1 = _source_axis(y, by0, by1, MPH)
            ry0 = iy0 - padding
            ry1 = iy1 - padding
            ok_y0 = in_y & (ry0 >= 0) & (ry0 < MH)
            ok_y1 = in_y & (ry1 >= 0) & (ry1 < MH)
            row0 = base + ry0 * stride_h
            row1 = base + ry1 * stride_h
            v00 = tl.load(row0 + col0, mask=ok_x0 & ok_y0, other=0.0).to(tl.float32)
            v01 = tl.load(row0 + col1, mask=ok_x1 & ok_y0, other=0.0).to(tl.float32)
            v10 = tl.load(row1 + col0, mask=ok_x0 & ok_y1, other=0.0).to(tl.float32)
            v11 = tl.load(row1 + col1, mask=ok_x1 & ok_y1, other=0.0).to(tl.float32)
            # F.interpolate's order: weight along x within each row, then blend along y
            val = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
            val = tl.where(in_x & in_y, val, 0.0)
            _store_row(out_rows + y.to(tl.int64) * W, val, in_w, threshold, in_dtype,
                       THRESHOLD)
    else:
        zero = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for r in range(0, rows):
            y = y_first + r
            _store_row(out_rows + y.to(tl.int64) * W, zero, in_w, threshold, in_dtype,
                       THRESHOLD)


# 2 pixels per thread per row (each warp's store one contiguous 256 B float32 / 64 B uint8
# run): sm_90 about 40 registers, no spills, 75% occupancy on Triton 3.6-3.9 (4 pixels per
# thread took 64-72, 44-50%).
_TUNING = [
    {"BLOCK_H": 16, "BLOCK_W": 256, "num_warps": 4},   # float output
    {"BLOCK_H": 16, "BLOCK_W": 512, "num_warps": 8},   # uint8/bool output
]
# The sweep's candidates, 2 pixels per thread per row too: taller tiles (the x setup
# shared by more rows) and smaller ones (fewer pixels outside the box in a tile it meets).
register_tuning(_paste_masks_in_image_kernel, _TUNING, candidates=[
    {"BLOCK_H": 32, "BLOCK_W": 256, "num_warps": 4},
    {"BLOCK_H": 8, "BLOCK_W": 128, "num_warps": 2},
], key_fields=("output", "N", "image"))


# ---------------------------------------------------------------------------------------
# Host launcher

def paste_masks_in_image_forward(masks: Tensor, boxes: Tensor, img_h: int, img_w: int,
                                 padding: int, threshold: float | None,
                                 out_dtype: torch.dtype) -> Tensor:
    """Launch the paste kernel; inputs already validated (see :func:`paste_masks_in_image`)."""
    n, _, mh, mw = masks.shape
    thresholding = threshold is not None
    out = torch.empty(n, 1, img_h, img_w, device=masks.device,
                      dtype=torch.uint8 if thresholding else out_dtype)
    if n:
        scale = expand_scale(mw, padding)
        expand = boxes.dtype == torch.float32
        box_arg = boxes.contiguous() if expand else expanded_int_boxes(boxes, scale)
        thr = threshold_in(masks.dtype, threshold) if thresholding else 0.0
        tuning = pick_tuning(_paste_masks_in_image_kernel,
                             _TUNING[1] if thresholding else _TUNING[0],
                             key=("uint8" if thresholding else DTYPE_NAMES[out_dtype],
                                  size_bucket(n), size_bucket(max(img_h, img_w))))
        grid = (n, cdiv(img_h, tuning["BLOCK_H"]), cdiv(img_w, tuning["BLOCK_W"]))
        scale32 = float32(scale)   # as torch's scalar multiply rounds it
        launch(_paste_masks_in_image_kernel, grid, masks, box_arg, out, img_h, img_w, mh, mw,
               masks.stride(0), masks.stride(2), masks.stride(3), padding, scale32, thr,
               tuning=tuning, EXPAND=expand, THRESHOLD=thresholding)
    return out.view(out_dtype) if thresholding and out_dtype == torch.bool else out


# ---------------------------------------------------------------------------------------
# torch.library registration (no autograd: an inference op)

def check_boxes_data(boxes: Tensor, name: str = "boxes") -> None:
    """Finite, not absurdly large coordinates (one read of the data), where
    :func:`values_checked` says so. Unchecked, coordinates are clamped to +-2**31 before
    the integer cast (NaN to 0): any value pastes inside the image or nowhere."""
    if boxes.numel() == 0:
        return
    biggest = float(boxes.detach().abs().max())  # NaN propagates through max
    if not biggest < COORD_LIMIT:
        raise ValueError(f"{name} must be finite with |coordinates| < 2**31, "
                         f"got max |coordinate| {biggest:g}")


def _kernel(masks: Tensor):
    return pick_path(masks, paste_masks_in_image_forward,
                     reference.paste_masks_in_image_forward)


@torch.library.custom_op("maskrcnn_triton::paste_masks_in_image", mutates_args=())
def _paste_masks_in_image_op(masks: Tensor, boxes: Tensor, img_h: int, img_w: int, padding: int,
                    threshold: float | None, out_dtype: torch.dtype) -> Tensor:
    return _kernel(masks)(masks, boxes, img_h, img_w, padding, threshold, out_dtype)


@_paste_masks_in_image_op.register_fake
def _(masks, boxes, img_h, img_w, padding, threshold, out_dtype):
    return masks.new_empty(masks.shape[0], 1, img_h, img_w, dtype=out_dtype)


# ---------------------------------------------------------------------------------------
# Public API

_THRESHOLD_DTYPES = (torch.bool, torch.uint8)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape, padding: int = 1, *,
                         threshold: float | None = None,
                         out_dtype: torch.dtype | None = None) -> Tensor:
    """Drop-in for ``torchvision.models.detection.roi_heads.paste_masks_in_image``.

    masks: (N, 1, M, M) float32/float16/bfloat16 (float64 runs the reference path), any
    strides. boxes: (N, 4) float (x1, y1, x2, y2) in image pixels, on masks' device; they
    may reach outside the image. img_shape: (H, W). Returns (N, 1, H, W): each mask, padded
    by ``padding`` and resized bilinearly to its expanded integer box exactly as torchvision
    does, pasted into a zero image and clipped to it.

    threshold: when given, return ``paste(...) > threshold`` (compared in masks' dtype)
    computed in the same pass, as ``out_dtype`` torch.bool (default) or torch.uint8 (0/1);
    no float image is allocated. Without it, ``out_dtype`` (default masks' dtype) is the
    float dtype of the result. Inference only: no gradient is defined.
    """
    check_tensor("masks", masks, ndim=4, what="a 4-D (N, 1, M, M) tensor")
    check_float_dtype("masks", masks)
    if masks.shape[1] != 1 or masks.shape[2] < 1 or masks.shape[3] < 1:
        raise ValueError(f"masks must be (N, 1, M, M) with M >= 1, got shape "
                         f"{tuple(masks.shape)}")
    check_tensor("boxes", boxes, ndim=2, what="(N, 4)")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be (N, 4) with N = masks.shape[0] = {masks.shape[0]}, "
                         f"got shape {tuple(boxes.shape)}")
    check_float("boxes", boxes)
    check_same_device(masks=masks, boxes=boxes)
    img_h, img_w = pair("img_shape", img_shape)
    if not isinstance(padding, int) or isinstance(padding, bool):
        raise TypeError(f"padding must be an int, got {padding!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if threshold is None:
        out_dtype = masks.dtype if out_dtype is None else out_dtype
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be a float dtype when threshold is None, "
                            f"got {out_dtype}")
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float or None, got {threshold!r}")
        out_dtype = torch.bool if out_dtype is None else out_dtype
        if out_dtype not in _THRESHOLD_DTYPES:
            raise TypeError(f"out_dtype must be torch.bool or torch.uint8 with a threshold, "
                            f"got {out_dtype}")
        threshold = float(threshold)
    if values_checked(boxes):
        check_boxes_data(boxes)
    args = (masks, boxes, img_h, img_w, padding, threshold, out_dtype)
    if not eager(masks, boxes) or needs_grad(masks):   # the op says it has no gradient
        return _paste_masks_in_image_op(*args)
    return _kernel(masks)(*args)


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launcher can pick (the GPU compile check runs these
    under TRITON_INTERPRET=1, the GPU kit's memory check on CUDA): each masks dtype x each
    float output dtype, thresholded, and host-expanded boxes."""
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.0], [-3.0, 4.0, 5.5, 12.0]], device=device)
    floats = (torch.float32, torch.float16, torch.bfloat16)
    for dtype in floats:
        masks = torch.rand(2, 1, 5, 5, device=device).to(dtype)
        for out_dtype in floats:
            paste_masks_in_image(masks, boxes, (10, 12), out_dtype=out_dtype)
        paste_masks_in_image(masks, boxes, (10, 12), threshold=0.5)
        paste_masks_in_image(masks, boxes.double(), (10, 12))   # boxes expanded on the host
        paste_masks_in_image(masks, boxes.double(), (10, 12), threshold=0.5)
