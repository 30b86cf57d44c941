"""Mask R-CNN's mask loss as fused Triton kernels: :func:`mask_loss` and :func:`maskrcnn_loss`.

Both are ``mean`` binary cross-entropy with logits over each instance's own class plane:

* :func:`mask_loss` — ``F.binary_cross_entropy_with_logits(mask_logits[arange(N), labels],
  gt_masks)``. One pass reads only the selected class planes of the (N, K, M, M) logits and
  writes the loss partial sums and the gradient of those planes (gradient-in-forward, as
  Liger's cross-entropy); the backward only scales that gradient by ``grad_output`` and
  writes the dense (N, K, M, M) gradient in one pass.
* :func:`maskrcnn_loss` — torchvision's ``roi_heads.maskrcnn_loss``: the targets (RoI Align
  of the full-image gt masks over the proposals, ``sampling_ratio=-1, aligned=False``) are
  sampled inside the loss kernel from the uint8/bool/float masks, with RoI Align's own
  ``roi_box``/``bilinear_axis`` helpers, instead of being materialized as N x M x M floats.

The fused mask predictor + loss is :mod:`kernels.ops.mask_predictor_loss`; it shares this
module's BCE and checks. The CPU path and test oracle are in :mod:`kernels.reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _cpu, reference
from .._sampling import image_rows, roi_box, sample_rows
from .._utils import (FLOAT_DTYPES, cdiv, check_float_dtype, check_integer, check_same_device,
                      check_tensor, check_values, compute_dtype, cpu_path, is_channels_last,
                      launch, needs_grad, pick_path, pick_tuning, record_path, register_tuning)


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def bce_with_logits(x, t):
    """Numerically stable BCE with logits per element, and its derivative sigmoid(x) - t."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows, even at |x| = 100
    # log1p(e) without libdevice (the interpreter lacks it): its series where 1 + e rounds
    softplus = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    loss = tl.maximum(x, 0.0) - x * t + softplus
    sigmoid = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, sigmoid - t


@triton.jit
def pixel_block(M, BLOCK_P: tl.constexpr):
    """Program (row, block of the M x M plane): the row, its pixel offsets, which are in
    the plane, and their (h, w)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    return r, offs, offs < M * M, offs // M, offs % M


@triton.jit
def _selected_loss(logits_ptr, labels_ptr, partial_ptr, grad_ptr, r, offs, mask, h, w, t,
                   M, l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count,
                   WRITE_GRAD: tl.constexpr):
    """BCE of row r's own class plane against targets t: the program's loss sum, and
    d loss / d logit when WRITE_GRAD (the gradient the backward only scales)."""
    label = tl.load(labels_ptr + r)
    x = tl.load(logits_ptr + r * l_stride_n + label * l_stride_k + h * l_stride_h
                + w * l_stride_w, mask=mask, other=0.0).to(tl.float32)
    loss, dx = bce_with_logits(x, t)
    tl.store(partial_ptr + r * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + r * M * M + offs, dx * inv_count, mask=mask)


@triton.jit
def _mask_loss_fwd_kernel(
    logits_ptr,  # (N, K, M, M) float, any strides
    targets_ptr,  # (N, M, M) float or uint8, any strides
    labels_ptr,  # (N,) int64 in [0, K)
    partial_ptr,  # (N, num_programs(1)) float32: loss sum of each program
    grad_ptr,  # (N, M*M) float32: d loss / d selected logit (unwritten if not WRITE_GRAD)
    M, l_stride_n, l_stride_k, l_stride_h, l_stride_w, t_stride_n, t_stride_h, t_stride_w,
    inv_count,  # 1 / (N * M * M)
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, offs, mask, h, w = pixel_block(M, BLOCK_P)
    t = tl.load(targets_ptr + n * t_stride_n + h * t_stride_h + w * t_stride_w,
                mask=mask, other=0).to(tl.float32)
    _selected_loss(logits_ptr, labels_ptr, partial_ptr, grad_ptr, n, offs, mask, h, w, t, M,
                   l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count, WRITE_GRAD)


@triton.jit
def roi_target(rois_ptr, masks_ptr, r, h, w, mask, M, H, W, m_stride_g, m_stride_h,
               m_stride_w):
    """Row r's target at pixels (h, w): torchvision's ``roi_align(gt_masks[:, None], rois,
    (M, M), 1.0)[:, 0]`` (spatial scale 1, adaptive sampling, aligned=False) read from the
    uint8/float gt masks of one image, four gathers per sample."""
    g, start_h, start_w, bin_h, bin_w, grid_h, grid_w = roi_box(
        rois_ptr, r, 1.0, M, M, -1, False)
    ph = h.to(tl.float32)
    pw = w.to(tl.float32)
    base = masks_ptr + g * m_stride_g
    acc = tl.zeros_like(ph)
    for iy in range(0, grid_h):
        row_lo, row_hi, wy_lo, wy_hi, valid_y = sample_rows(start_h, ph, bin_h, iy, grid_h, H,
                                                            m_stride_h.to(tl.int64))
        for ix in range(0, grid_w):
            col_lo, col_hi, wx_lo, wx_hi, valid_x = sample_rows(start_w, pw, bin_w, ix, grid_w,
                                                                W, m_stride_w.to(tl.int64))
            m = valid_y & valid_x & mask
            v1 = tl.load(base + row_lo + col_lo, mask=m, other=0).to(tl.float32)
            v2 = tl.load(base + row_lo + col_hi, mask=m, other=0).to(tl.float32)
            v3 = tl.load(base + row_hi + col_lo, mask=m, other=0).to(tl.float32)
            v4 = tl.load(base + row_hi + col_hi, mask=m, other=0).to(tl.float32)
            acc += (wy_lo * wx_lo * v1 + wy_lo * wx_hi * v2 + wy_hi * wx_lo * v3
                    + wy_hi * wx_hi * v4)
    return acc / tl.maximum(grid_h * grid_w, 1).to(tl.float32)


# Each image's gt mask size and strides would otherwise specialize the kernel (== 1,
# divisible by 16): a new compile per size pattern in the first steps of a run.
SAMPLED_ARGS = ["H", "W", "m_stride_g", "m_stride_h", "m_stride_w"]


@triton.jit(do_not_specialize=SAMPLED_ARGS)
def _maskrcnn_loss_fwd_kernel(
    logits_ptr,  # (R, K, M, M) float, any strides: one image's rows
    rois_ptr,  # (R, 5) float32: gt mask index, x1, y1, x2, y2 (the proposal)
    masks_ptr,  # (G, H, W) uint8 or float, any strides: the image's gt masks
    labels_ptr,  # (R,) int64 in [0, K)
    partial_ptr,  # (R, num_programs(1)) float32: loss sum of each program
    grad_ptr,  # (R, M*M) float32: d loss / d selected logit (unwritten if not WRITE_GRAD)
    M, H, W, l_stride_n, l_stride_k, l_stride_h, l_stride_w,
    m_stride_g, m_stride_h, m_stride_w,
    inv_count,  # 1 / (N * M * M), N counted over all images
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    r, offs, mask, h, w = pixel_block(M, BLOCK_P)
    t = roi_target(rois_ptr, masks_ptr, r, h, w, mask, M, H, W, m_stride_g, m_stride_h,
                   m_stride_w)
    _selected_loss(logits_ptr, labels_ptr, partial_ptr, grad_ptr, r, offs, mask, h, w, t, M,
                   l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count, WRITE_GRAD)


@triton.jit
def _mask_loss_bwd_kernel(
    grad_out_ptr,  # () float: gradient of the scalar loss
    grad_sel_ptr,  # (N, P) float32: the forward's d loss / d selected logit
    labels_ptr,  # (N,) int64 in [0, K)
    grad_ptr,  # (N, K, M, M) logits dtype, dense per instance: NCHW or channels_last
    K, P,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    # Programs walk each instance's K*P gradient block in memory order, so every store is
    # contiguous whatever the layout; only the selected class reads the saved gradient.
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K * P
    if CHANNELS_LAST:
        k = offs % K
        p = offs // K
    else:
        k = offs // P
        p = offs % P
    label = tl.load(labels_ptr + n)
    g = tl.load(grad_out_ptr).to(tl.float32)
    d = tl.load(grad_sel_ptr + n * P + p, mask=mask & (k == label), other=0.0) * g
    tl.store(grad_ptr + n * K * P + offs, d.to(grad_ptr.dtype.element_ty), mask=mask)


# One table per kernel: the launcher picks a row, the GPU compile check builds every row.
_TUNING_PIXELS = [
    {"BLOCK_P": 256, "num_warps": 2},    # M <= 16
    {"BLOCK_P": 1024, "num_warps": 8},   # M = 28 (784 pixels) and up
]
# The sampled loss interpolates its target inline (four gathers per sample): one pixel per
# thread keeps it at 40 registers (75% occupancy on sm_90); four per thread took 104.
_TUNING_SAMPLED = [
    {"BLOCK_P": 256, "num_warps": 8},
]
_TUNING_DENSE = [
    {"BLOCK": 1024, "num_warps": 4},
    {"BLOCK": 4096, "num_warps": 8},
]
register_tuning(_mask_loss_fwd_kernel, _TUNING_PIXELS)
register_tuning(_maskrcnn_loss_fwd_kernel, _TUNING_SAMPLED)
register_tuning(_mask_loss_bwd_kernel, _TUNING_DENSE)


# ---------------------------------------------------------------------------------------
# Host launchers (inputs already validated by the public functions)

def kernel_targets(t: Tensor) -> Tensor:
    """Targets as the kernels load them: bool viewed as uint8, float64 as float32."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.float64:
        return t.float()
    return t


def mask_loss_forward(logits: Tensor, targets: Tensor, labels: Tensor,
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    n, _, m, _ = logits.shape
    targets = kernel_targets(targets)
    tuning = pick_tuning(_mask_loss_fwd_kernel, _TUNING_PIXELS[0 if m * m <= 256 else 1])
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=logits.device)
    grad = torch.empty(n if compute_grad else 0, m, m, dtype=torch.float32,
                       device=logits.device)
    inv_count = 1.0 / (n * m * m)
    launch(_mask_loss_fwd_kernel, (n, blocks), logits, targets, labels, partial, grad, m,
           *logits.stride(), *targets.stride(), inv_count,
           tuning=tuning, WRITE_GRAD=bool(compute_grad))
    return partial.sum() * inv_count, grad


def maskrcnn_loss_forward(logits: Tensor, rois: Tensor, labels: Tensor,
                          gt_masks: list[Tensor], rows: list[int],
                          compute_grad: bool) -> tuple[Tensor, Tensor]:
    """One launch per image (each image has its own mask tensor and size)."""
    n, _, m, _ = logits.shape
    rois = rois.to(torch.float32).contiguous()
    tuning = pick_tuning(_maskrcnn_loss_fwd_kernel, _TUNING_SAMPLED[0])
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=logits.device)
    grad = torch.empty(n if compute_grad else 0, m, m, dtype=torch.float32,
                       device=logits.device)
    inv_count = 1.0 / (n * m * m)
    for i, masks in image_rows(gt_masks, rows):
        masks = kernel_targets(masks)
        launch(_maskrcnn_loss_fwd_kernel, (i.stop - i.start, blocks),
               logits[i], rois[i], masks, labels[i], partial[i],
               grad[i] if compute_grad else grad, m, masks.shape[1], masks.shape[2],
               *logits.stride(), *masks.stride(), inv_count,
               tuning=tuning, WRITE_GRAD=bool(compute_grad))
    return partial.sum() * inv_count, grad


def mask_loss_backward(grad: Tensor, grad_sel: Tensor, labels: Tensor, classes: int,
                       channels_last: bool, dtype: torch.dtype) -> Tensor:
    n, m, _ = grad_sel.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, classes, m, m, dtype=dtype, device=grad.device,
                      memory_format=fmt)
    tuning = pick_tuning(_mask_loss_bwd_kernel,
                         _TUNING_DENSE[0] if classes * m * m <= 8192 else _TUNING_DENSE[1])
    launch(_mask_loss_bwd_kernel, (n, cdiv(classes * m * m, tuning["BLOCK"])), grad,
           grad_sel, labels, out, classes, m * m,
           tuning=tuning, CHANNELS_LAST=bool(channels_last))
    return out


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd

@torch.library.custom_op("maskrcnn_triton::mask_loss", mutates_args=())
def _mask_loss_op(logits: Tensor, targets: Tensor, labels: Tensor,
                  compute_grad: bool) -> tuple[Tensor, Tensor]:
    impl = pick_path(logits, mask_loss_forward, reference.mask_loss_forward)
    return impl(logits, targets, labels, compute_grad)


@_mask_loss_op.register_fake
def _(logits, targets, labels, compute_grad):
    n, _, m, _ = logits.shape
    dtype = compute_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dtype),
            logits.new_empty(n if compute_grad else 0, m, m, dtype=dtype))


@torch.library.custom_op("maskrcnn_triton::maskrcnn_loss", mutates_args=())
def _maskrcnn_loss_op(logits: Tensor, rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                      rows: list[int], compute_grad: bool) -> tuple[Tensor, Tensor]:
    impl = pick_path(logits, maskrcnn_loss_forward, reference.maskrcnn_loss_forward)
    return impl(logits, rois, labels, gt_masks, rows, compute_grad)


@_maskrcnn_loss_op.register_fake
def _(logits, rois, labels, gt_masks, rows, compute_grad):
    n, _, m, _ = logits.shape
    dtype = compute_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dtype),
            logits.new_empty(n if compute_grad else 0, m, m, dtype=dtype))


@torch.library.custom_op("maskrcnn_triton::mask_loss_backward", mutates_args=())
def _mask_loss_backward_op(grad: Tensor, grad_sel: Tensor, labels: Tensor, classes: int,
                           channels_last: bool, dtype: torch.dtype) -> Tensor:
    impl = pick_path(grad_sel, mask_loss_backward, reference.mask_loss_backward)
    return impl(grad, grad_sel, labels, classes, channels_last, dtype)


@_mask_loss_backward_op.register_fake
def _(grad, grad_sel, labels, classes, channels_last, dtype):
    n, m, _ = grad_sel.shape
    out = grad.new_empty(n, classes, m, m, dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _mask_loss_setup(ctx, inputs, output):
    logits, labels = inputs[0], inputs[2]
    ctx.save_for_backward(output[1], labels)
    ctx.classes = logits.shape[1]
    ctx.dtype = logits.dtype
    ctx.channels_last = is_channels_last(logits)
    ctx.no_grads = no_grads(inputs[1:])


def no_grads(inputs) -> tuple:
    """The backward's answer for inputs without a gradient: None each, a list of Nones for
    a list of tensors (the gt masks)."""
    return tuple([None] * len(x) if isinstance(x, (list, tuple)) and x
                 and isinstance(x[0], Tensor) else None for x in inputs)


def _mask_loss_grad(ctx, grad, _grad_sel_grad):
    grad_sel, labels = ctx.saved_tensors
    grad_logits = _mask_loss_backward_op(grad, grad_sel, labels, ctx.classes,
                                         ctx.channels_last, ctx.dtype)
    return (grad_logits,) + ctx.no_grads


_mask_loss_op.register_autograd(_mask_loss_grad, setup_context=_mask_loss_setup)
_maskrcnn_loss_op.register_autograd(_mask_loss_grad, setup_context=_mask_loss_setup)


# ---------------------------------------------------------------------------------------
# Public API: validation, then the ops

TARGET_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.bool)


def _check_logits(name: str, t) -> tuple[int, int, int]:
    check_tensor(name, t, ndim=4, what="a 4-D (N, K, M, M) tensor")
    check_float_dtype(name, t)
    n, k, mh, mw = t.shape
    if mh != mw:
        raise ValueError(f"{name} must hold square M x M masks, got shape {tuple(t.shape)}")
    return n, k, mh


def check_labels(name: str, t, n: int) -> None:
    check_tensor(name, t, ndim=1, what="a 1-D (N,) tensor")  # no f-string: n may be symbolic
    check_integer(name, t)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per instance), got {t.shape[0]}")


def check_targets(name: str, t, shape: tuple[int, ...] | None) -> None:
    check_tensor(name, t, dtypes=TARGET_DTYPES)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def loss_dtype(input_dtype: torch.dtype, *target_dtypes: torch.dtype) -> torch.dtype:
    """What F.binary_cross_entropy_with_logits returns: input and float targets promoted."""
    for t in target_dtypes:
        if t.is_floating_point:
            input_dtype = torch.promote_types(input_dtype, t)
    return input_dtype


def mask_loss(mask_logits: Tensor, gt_masks: Tensor, gt_labels: Tensor) -> Tensor:
    """``F.binary_cross_entropy_with_logits(mask_logits[arange(N), gt_labels], gt_masks)``.

    mask_logits: (N, K, M, M) float32/float16/bfloat16 (float64 runs the reference path),
    any strides. gt_masks: (N, M, M) float in [0, 1], or uint8/bool 0/1 masks.
    gt_labels: (N,) integer in [0, K). Returns a scalar accumulated in float32, of the dtype
    PyTorch's formula gives (mask_logits' dtype promoted with a float gt_masks' dtype); its
    gradient flows to mask_logits only. Checks label and mask values on the
    host (one sync). N == 0 returns ``mask_logits.sum() * 0``.
    """
    n, k, m = _check_logits("mask_logits", mask_logits)
    check_targets("gt_masks", gt_masks, (n, m, m))
    check_labels("gt_labels", gt_labels, n)
    check_same_device(mask_logits=mask_logits, gt_masks=gt_masks, gt_labels=gt_labels)
    if n == 0:
        return mask_logits.sum() * 0
    check_values(indices=[("gt_labels", gt_labels, k)], unit=[("gt_masks", gt_masks)])
    if cpu_path(mask_logits):        # PyTorch's own formula and backward (kernels._cpu)
        record_path("mask_loss_forward", "torch")
        loss = _cpu.mask_loss(mask_logits, gt_masks, gt_labels.long())
    else:
        loss, _ = _mask_loss_op(mask_logits, gt_masks, gt_labels.long(),
                                needs_grad(mask_logits))
    return loss.to(loss_dtype(mask_logits.dtype, gt_masks.dtype))


def _check_list(name: str, value, length: int | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per image), "
                        f"got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per image ({length}), got {len(value)}")
    return list(value)


def check_images(lead: dict[str, Tensor], k: int, proposals, gt_masks, gt_labels,
                 mask_matched_idxs) -> tuple[list, list, list, list]:
    """Check torchvision's per-image loss arguments against the (N, ...) tensor ``lead``
    (its name and value) of K classes; return them as lists and each image's row count
    (an int, or a symbolic size while compiling: no specialization per count)."""
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
    rows = [p.shape[0] for p in proposals]
    n = t.shape[0]
    if torch.compiler.is_compiling():
        torch._check(sum(rows) == n, lambda: f"{name} has one row per proposal")
    elif sum(rows) != n:
        raise ValueError(f"{name} has {n} rows but the proposals hold {sum(rows)} boxes")
    if n:
        check_values(
            indices=[(f"gt_labels[{i}]", gt_labels[i], k) for i in range(images)]
            + [(f"mask_matched_idxs[{i}]", idxs[i], gt_masks[i].shape[0])
               for i in range(images)],
            unit=[(f"gt_masks[{i}]", gt_masks[i]) for i in range(images)],
            finite=[(f"proposals[{i}]", p) for i, p in enumerate(proposals)])
    return proposals, gt_masks, [lab.long()[i.long()] for lab, i in zip(gt_labels, idxs)], rows


def sampled_rois(proposals: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """(N, 5) float32 RoIs over the gt masks: matched gt index, then the proposal box."""
    return torch.cat([torch.cat([i.long() for i in mask_matched_idxs]).to(torch.float32)[:, None],
                      torch.cat([p.to(torch.float32) for p in proposals])], 1)


def maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                  gt_labels: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """Drop-in for ``torchvision.models.detection.roi_heads.maskrcnn_loss``.

    mask_logits: (N, K, M, M); per image i: proposals[i] (n_i, 4) boxes, gt_masks[i]
    (G_i, H_i, W_i) uint8/bool/float in [0, 1], gt_labels[i] (G_i,) integer in [0, K),
    mask_matched_idxs[i] (n_i,) integer in [0, G_i), with sum(n_i) = N. The targets are
    torchvision's ``roi_align(gt_masks[i][:, None], [idx, box], (M, M), 1.0)``, sampled
    inside the loss kernel (never materialized). Values are checked in one host sync. The
    loss has torchvision's dtype: mask_logits' promoted with the proposals'.
    """
    n, k, m = _check_logits("mask_logits", mask_logits)
    proposals, gt_masks, labels, rows = check_images(
        {"mask_logits": mask_logits}, k, proposals, gt_masks, gt_labels, mask_matched_idxs)
    if n == 0:
        return mask_logits.sum() * 0
    labels = torch.cat(labels)
    rois = sampled_rois(proposals, mask_matched_idxs)
    if cpu_path(mask_logits):        # torchvision's targets, PyTorch's loss (kernels._cpu)
        record_path("maskrcnn_loss_forward", "torch")
        loss = _cpu.maskrcnn_loss(mask_logits, rois, labels, gt_masks, rows)
    else:
        loss, _ = _maskrcnn_loss_op(mask_logits, rois, labels, gt_masks, rows,
                                    needs_grad(mask_logits))
    # torchvision's targets take the proposals' dtype
    return loss.to(loss_dtype(mask_logits.dtype, *(p.dtype for p in proposals)))


def loss_examples(channels: int, device: str):
    """Inputs that reach every specialization of the mask-loss launchers: yields ``(x,
    targets, gt_masks, (labels, boxes, matched))`` with x a (2, channels, 4, 4) leaf of each
    float dtype and layout, targets (2, 4, 4) and one image's gt masks (2, 9, 11) of each
    target kind (x's own dtype, float32, bool, uint8), labels in [0, 3)."""
    labels = torch.tensor([0, 2], device=device)
    matched = [torch.tensor([1, 0], device=device)]
    boxes = [torch.tensor([[0.5, 1.0, 8.0, 7.5], [2.0, 0.0, 5.0, 9.0]], device=device)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, channels, 4, 4, dtype=dtype, device=device).contiguous(
                memory_format=fmt).requires_grad_()
            for target_dtype in (dtype, torch.float32, torch.bool, torch.uint8):
                targets = (torch.rand(2, 4, 4, device=device) > 0.5).to(target_dtype)
                gt = (torch.rand(2, 9, 11, device=device) > 0.5).to(target_dtype)
                yield x, targets, gt, (labels, boxes, matched)


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launchers can pick (for the GPU compile check and
    the GPU kit's memory check, which runs these on CUDA); the compile check expands each
    over its tuning table."""
    for logits, targets, gt, (labels, boxes, matched) in loss_examples(3, device):
        mask_loss(logits, targets, labels).backward()
        maskrcnn_loss(logits, boxes, [gt], [labels], matched).backward()
