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
from torch.autograd.function import once_differentiable

from .. import _cpu, reference
from .._sampling import decode_roi, sample_index, sample_plan, sample_rows
from .._utils import (cdiv, check_float_dtype, check_images, check_labels, check_ranges,
                      check_same_device, check_targets, check_tensor, compute_dtype, cpu_path,
                      eager, is_channels_last, needs_grad, pick_path, record_path,
                      values_checked)
from .._launch import DTYPE_NAMES, launch, pick_tuning, register_tuning, size_bucket


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
def _selected_loss(logits_ptr, partial_ptr, grad_ptr, r, label, offs, mask, h, w, t, K, M,
                   l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count,
                   WRITE_GRAD: tl.constexpr):
    """BCE of row r's own class plane against targets t: the program's loss sum (times
    ``inv_count``: the host only adds the partial sums), and d loss / d logit when
    WRITE_GRAD (the gradient the backward only scales). A label outside [0, K) reads
    nothing: the row adds no loss and gets no gradient."""
    ok = (label >= 0) & (label < K)
    mask = mask & ok
    label = tl.where(ok, label, 0).to(tl.int64)
    x = tl.load(logits_ptr + r * l_stride_n + label * l_stride_k + h * l_stride_h
                + w * l_stride_w, mask=mask, other=0.0).to(tl.float32)
    loss, dx = bce_with_logits(x, t)
    tl.store(partial_ptr + r * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, loss, 0.0), axis=0) * inv_count)
    if WRITE_GRAD:
        tl.store(grad_ptr + r * M * M + offs, tl.where(mask, dx * inv_count, 0.0),
                 mask=offs < M * M)


@triton.jit
def _mask_loss_fwd_kernel(
    logits_ptr,  # (N, K, M, M) float, any strides
    targets_ptr,  # (N, M, M) float or uint8, any strides
    labels_ptr,  # (N,) integer: the class of each row (outside [0, K): an ignored row)
    partial_ptr,  # (N, num_programs(1)) float32: loss sum of each program / (N M M)
    grad_ptr,  # (N, M*M) float32: d loss / d selected logit (None unless WRITE_GRAD)
    K, M, l_stride_n, l_stride_k, l_stride_h, l_stride_w, t_stride_n, t_stride_h,
    t_stride_w,
    inv_count,  # 1 / (N * M * M)
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, offs, mask, h, w = pixel_block(M, BLOCK_P)
    t = tl.load(targets_ptr + n * t_stride_n + h * t_stride_h + w * t_stride_w,
                mask=mask, other=0).to(tl.float32)
    _selected_loss(logits_ptr, partial_ptr, grad_ptr, n, tl.load(labels_ptr + n), offs, mask,
                   h, w, t, K, M, l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count,
                   WRITE_GRAD)


@triton.jit
def sampled_row(proposals_ptr, matched_ptr, gt_labels_ptr, i, G):
    """Row i of one image's mask targets: its matched gt mask (index, whether it is in
    [0, G) with a finite box), its label (gt_labels[index]; -1, an ignored row, where the
    index is not) and its proposal box (x1, y1, x2, y2) as float32."""
    g = tl.load(matched_ptr + i)
    x1 = tl.load(proposals_ptr + i * 4).to(tl.float32)
    y1 = tl.load(proposals_ptr + i * 4 + 1).to(tl.float32)
    x2 = tl.load(proposals_ptr + i * 4 + 2).to(tl.float32)
    y2 = tl.load(proposals_ptr + i * 4 + 3).to(tl.float32)
    big = float("inf")
    ok = ((g >= 0) & (g < G) & (tl.abs(x1) < big) & (tl.abs(y1) < big) & (tl.abs(x2) < big)
          & (tl.abs(y2) < big))
    g = tl.where(ok, g, 0).to(tl.int64)
    label = tl.where(ok, tl.load(gt_labels_ptr + g).to(tl.int64), -1)
    return g, ok, label, x1, y1, x2, y2


@triton.jit
def roi_target(masks_ptr, g, ok, x1, y1, x2, y2, h, w, mask, M, H, W, m_stride_g, m_stride_h,
               m_stride_w):
    """A row's target at pixels (h, w): torchvision's ``roi_align(gt_masks[:, None], rois,
    (M, M), 1.0)[:, 0]`` (spatial scale 1, adaptive sampling, aligned=False) of gt mask
    ``g`` over the box, read from the uint8/float gt masks of one image, four gathers per
    sample; zeros for a row that is not ``ok``. A huge box visits only the samples that can
    land on the mask (``sample_plan``)."""
    _, _, start_h, start_w, bin_h, bin_w, grid_h, grid_w = decode_roi(
        0.0, x1, y1, x2, y2, 1.0, M, M, -1, 1, False)
    grid_h = tl.where(ok, grid_h, 0.0)
    grid_w = tl.where(ok, grid_w, 0.0)
    ph = h.to(tl.float32)
    pw = w.to(tl.float32)
    base = masks_ptr + g * m_stride_g
    acc = tl.zeros_like(ph)
    iy_a, ny_a, ny_b = sample_plan(start_h, bin_h, grid_h, H, M)
    ix_a, nx_a, nx_b = sample_plan(start_w, bin_w, grid_w, W, M)
    for ty in range(0, ny_a + ny_b):
        iy = sample_index(ty, iy_a, ny_a)
        row_lo, row_hi, wy_lo, wy_hi, valid_y = sample_rows(
            start_h, ph, bin_h, iy, grid_h, H, m_stride_h.to(tl.int64))
        valid_y = valid_y & mask
        for tx in range(0, nx_a + nx_b):
            ix = sample_index(tx, ix_a, nx_a)
            col_lo, col_hi, wx_lo, wx_hi, valid_x = sample_rows(
                start_w, pw, bin_w, ix, grid_w, W, m_stride_w.to(tl.int64))
            m = valid_y & valid_x
            v1 = tl.load(base + row_lo + col_lo, mask=m, other=0).to(tl.float32)
            v2 = tl.load(base + row_lo + col_hi, mask=m, other=0).to(tl.float32)
            v3 = tl.load(base + row_hi + col_lo, mask=m, other=0).to(tl.float32)
            v4 = tl.load(base + row_hi + col_hi, mask=m, other=0).to(tl.float32)
            acc += (wy_lo * wx_lo * v1 + wy_lo * wx_hi * v2 + wy_hi * wx_lo * v3
                    + wy_hi * wx_hi * v4)
    return acc / tl.maximum(grid_h * grid_w, 1.0)


# Each image's gt mask size and strides would otherwise specialize the kernel (== 1,
# divisible by 16): a new compile per size pattern in the first steps of a run.
SAMPLED_ARGS = ["row0", "G", "H", "W", "m_stride_g", "m_stride_h", "m_stride_w"]


@triton.jit(do_not_specialize=SAMPLED_ARGS)
def _maskrcnn_loss_fwd_kernel(
    logits_ptr,  # (N, K, M, M) float, any strides: every image's rows
    proposals_ptr,  # (R, 4) float, contiguous: one image's proposals
    matched_ptr,  # (R,) integer: each proposal's gt mask (outside [0, G): an ignored row)
    gt_labels_ptr,  # (G,) integer: the image's gt labels
    masks_ptr,  # (G, H, W) uint8 or float, any strides: the image's gt masks
    partial_ptr,  # (N, num_programs(1)) float32: loss sum of each program / (N M M)
    grad_ptr,  # (N, M*M) float32: d loss / d selected logit (None unless WRITE_GRAD)
    labels_ptr,  # (N,) int64: each row's label, for the backward (None unless WRITE_GRAD)
    row0, G, K, M, H, W, l_stride_n, l_stride_k, l_stride_h, l_stride_w,
    m_stride_g, m_stride_h, m_stride_w,
    inv_count,  # 1 / (N * M * M), N counted over all images
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i, offs, mask, h, w = pixel_block(M, BLOCK_P)
    r = row0 + i
    g, ok, label, x1, y1, x2, y2 = sampled_row(proposals_ptr, matched_ptr, gt_labels_ptr, i, G)
    t = roi_target(masks_ptr, g, ok, x1, y1, x2, y2, h, w, mask, M, H, W, m_stride_g,
                   m_stride_h, m_stride_w)
    _selected_loss(logits_ptr, partial_ptr, grad_ptr, r, label, offs, mask, h, w, t, K, M,
                   l_stride_n, l_stride_k, l_stride_h, l_stride_w, inv_count, WRITE_GRAD)
    if WRITE_GRAD:
        if tl.program_id(1) == 0:
            tl.store(labels_ptr + r, label)


@triton.jit
def _mask_loss_bwd_kernel(
    grad_out_ptr,  # () float: gradient of the scalar loss
    grad_sel_ptr,  # (N, P) float32: the forward's d loss / d selected logit
    labels_ptr,  # (N,) integer: each row's class (outside [0, K): a zero row)
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
# The sweep's candidates (sm_90 at most 42 registers, 62% and up): pixel blocks between
# and below the rules' (1024 pixels over 4 warps took 72 registers, 44%), one pixel per
# thread for the sampled loss, dense blocks at 8 elements per thread.
register_tuning(_mask_loss_fwd_kernel, _TUNING_PIXELS, candidates=[
    {"BLOCK_P": 512, "num_warps": 4}, {"BLOCK_P": 128, "num_warps": 1},
], key_fields=("M", "N", "dtype"))
register_tuning(_maskrcnn_loss_fwd_kernel, _TUNING_SAMPLED, candidates=[
    {"BLOCK_P": 128, "num_warps": 4}, {"BLOCK_P": 512, "num_warps": 16},
], key_fields=("M", "N", "dtype"))
register_tuning(_mask_loss_bwd_kernel, _TUNING_DENSE, candidates=[
    {"BLOCK": 2048, "num_warps": 8}, {"BLOCK": 8192, "num_warps": 16},
], key_fields=("K", "M", "N", "dtype", "layout"))


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
    n, k, m, _ = logits.shape
    targets = kernel_targets(targets)
    tuning = pick_tuning(_mask_loss_fwd_kernel, _TUNING_PIXELS[0 if m * m <= 256 else 1],
                         key=(m, size_bucket(n), DTYPE_NAMES[logits.dtype]))
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=logits.device)
    grad = torch.empty(n if compute_grad else 0, m, m, dtype=torch.float32,
                       device=logits.device)
    launch(_mask_loss_fwd_kernel, (n, blocks), logits, targets, labels, partial,
           grad if compute_grad else None, k, m, *logits.stride(), *targets.stride(),
           1.0 / (n * m * m), tuning=tuning, WRITE_GRAD=bool(compute_grad))
    return partial.sum(), grad


def maskrcnn_loss_forward(logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                          gt_labels: list[Tensor], matched: list[Tensor],
                          compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One launch per image (each image has its own masks and size), each reading the
    image's proposals, matched indices and gt labels as they are: (loss, d loss / d
    selected logit, each row's label) — no RoI or label tensor is built on the host."""
    n, k, m, _ = logits.shape
    tuning = pick_tuning(_maskrcnn_loss_fwd_kernel, _TUNING_SAMPLED[0],
                         key=(m, size_bucket(n), DTYPE_NAMES[logits.dtype]))
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    rows = n if compute_grad else 0
    partial = torch.empty(n, blocks, dtype=torch.float32, device=logits.device)
    grad = torch.empty(rows, m, m, dtype=torch.float32, device=logits.device)
    labels = torch.empty(rows, dtype=torch.int64, device=logits.device)
    row0 = 0
    for boxes, masks, image_labels, idxs in zip(proposals, gt_masks, gt_labels, matched):
        if boxes.shape[0]:
            masks = kernel_targets(masks)
            launch(_maskrcnn_loss_fwd_kernel, (boxes.shape[0], blocks), logits,
                   boxes.contiguous(), idxs.contiguous(), image_labels.contiguous(), masks,
                   partial, grad if compute_grad else None,
                   labels if compute_grad else None, row0, masks.shape[0], k, m,
                   masks.shape[1], masks.shape[2], *logits.stride(), *masks.stride(),
                   1.0 / (n * m * m), tuning=tuning, WRITE_GRAD=bool(compute_grad))
        row0 += boxes.shape[0]
    return partial.sum(), grad, labels


def mask_loss_backward(grad: Tensor, grad_sel: Tensor, labels: Tensor, classes: int,
                       channels_last: bool, dtype: torch.dtype) -> Tensor:
    n, m, _ = grad_sel.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, classes, m, m, dtype=dtype, device=grad.device,
                      memory_format=fmt)
    tuning = pick_tuning(_mask_loss_bwd_kernel,
                         _TUNING_DENSE[0] if classes * m * m <= 8192 else _TUNING_DENSE[1],
                         key=(classes, m, size_bucket(n), DTYPE_NAMES[dtype],
                              "channels_last" if channels_last else "NCHW"))
    launch(_mask_loss_bwd_kernel, (n, cdiv(classes * m * m, tuning["BLOCK"])), grad,
           grad_sel, labels, out, classes, m * m,
           tuning=tuning, CHANNELS_LAST=bool(channels_last))
    return out


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd; the eager forms (autograd.Functions calling the
# device kernels directly, without the dispatcher)

def _mask_loss_kernel(logits: Tensor):
    return pick_path(logits, mask_loss_forward, reference.mask_loss_forward,
                     cpu=_cpu.mask_loss_forward, cpu_name="torch")


def _maskrcnn_loss_kernel(logits: Tensor):
    return pick_path(logits, maskrcnn_loss_forward, reference.maskrcnn_loss_forward,
                     cpu=_cpu.maskrcnn_loss_forward, cpu_name="torch")


def _backward_kernel(grad_sel: Tensor):
    return pick_path(grad_sel, mask_loss_backward, reference.mask_loss_backward,
                     cpu=reference.mask_loss_backward, cpu_name="torch")


@torch.library.custom_op("maskrcnn_triton::mask_loss", mutates_args=())
def _mask_loss_op(logits: Tensor, targets: Tensor, labels: Tensor,
                  compute_grad: bool) -> tuple[Tensor, Tensor]:
    return _mask_loss_kernel(logits)(logits, targets, labels, compute_grad)


@_mask_loss_op.register_fake
def _(logits, targets, labels, compute_grad):
    n, _, m, _ = logits.shape
    dtype = compute_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dtype),
            logits.new_empty(n if compute_grad else 0, m, m, dtype=dtype))


@torch.library.custom_op("maskrcnn_triton::maskrcnn_loss", mutates_args=())
def _maskrcnn_loss_op(logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                      gt_labels: list[Tensor], matched: list[Tensor],
                      compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _maskrcnn_loss_kernel(logits)(logits, proposals, gt_masks, gt_labels, matched,
                                         compute_grad)


@_maskrcnn_loss_op.register_fake
def _(logits, proposals, gt_masks, gt_labels, matched, compute_grad):
    n, _, m, _ = logits.shape
    rows = n if compute_grad else 0
    dtype = compute_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dtype), logits.new_empty(rows, m, m, dtype=dtype),
            logits.new_empty(rows, dtype=torch.int64))


@torch.library.custom_op("maskrcnn_triton::mask_loss_backward", mutates_args=())
def _mask_loss_backward_op(grad: Tensor, grad_sel: Tensor, labels: Tensor, classes: int,
                           channels_last: bool, dtype: torch.dtype) -> Tensor:
    return _backward_kernel(grad_sel)(grad, grad_sel, labels, classes, channels_last, dtype)


@_mask_loss_backward_op.register_fake
def _(grad, grad_sel, labels, classes, channels_last, dtype):
    n, m, _ = grad_sel.shape
    out = grad.new_empty(n, classes, m, m, dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _save(ctx, logits: Tensor, grad_sel: Tensor, labels: Tensor) -> None:
    ctx.save_for_backward(grad_sel, labels)
    ctx.classes = logits.shape[1]
    ctx.dtype = logits.dtype
    ctx.channels_last = is_channels_last(logits)


def _mask_loss_setup(ctx, inputs, output):
    _save(ctx, inputs[0], output[1], inputs[2])
    ctx.no_grads = no_grads(inputs[1:])


def _maskrcnn_loss_setup(ctx, inputs, output):
    _save(ctx, inputs[0], output[1], output[2])
    ctx.no_grads = no_grads(inputs[1:])


def no_grads(inputs) -> tuple:
    """The backward's answer for inputs without a gradient: None each, a list of Nones for
    a list of tensors (the gt masks)."""
    return tuple([None] * len(x) if isinstance(x, (list, tuple)) and x
                 and isinstance(x[0], Tensor) else None for x in inputs)


def _mask_loss_grad(ctx, grad, *_):
    grad_sel, labels = ctx.saved_tensors
    grad_logits = _mask_loss_backward_op(grad, grad_sel, labels, ctx.classes,
                                         ctx.channels_last, ctx.dtype)
    return (grad_logits,) + ctx.no_grads


_mask_loss_op.register_autograd(_mask_loss_grad, setup_context=_mask_loss_setup)
_maskrcnn_loss_op.register_autograd(_mask_loss_grad, setup_context=_maskrcnn_loss_setup)


class _EagerLoss(torch.autograd.Function):
    """Either mask loss in eager code: ``kernel(logits, *rest, True)`` returns the loss,
    d loss / d selected logit and (maskrcnn_loss) each row's label; the backward scatters
    the saved gradient into the logits' (N, K, M, M) gradient."""

    @staticmethod
    def forward(ctx, kernel, logits, labels, *rest):
        loss, grad_sel, *out_labels = kernel(logits, *rest, True)
        _save(ctx, logits, grad_sel, out_labels[0] if out_labels else labels)
        ctx.rest = len(rest)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_sel, labels = ctx.saved_tensors
        grad_logits = _backward_kernel(grad_sel)(grad, grad_sel, labels, ctx.classes,
                                                 ctx.channels_last, ctx.dtype)
        return (None, grad_logits, None) + (None,) * ctx.rest


# ---------------------------------------------------------------------------------------
# Public API: validation, then the ops

def _check_logits(name: str, t) -> tuple[int, int, int]:
    check_tensor(name, t, ndim=4, what="a 4-D (N, K, M, M) tensor")
    check_float_dtype(name, t)
    n, k, mh, mw = t.shape
    if mh != mw:
        raise ValueError(f"{name} must hold square M x M masks, got shape {tuple(t.shape)}")
    return n, k, mh


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
    gradient flows to mask_logits only. Label and mask values are checked for CPU tensors,
    and for CUDA tensors inside ``kernels.check_values()`` (one host sync); unchecked, a
    row whose label is outside [0, K) adds no loss and gets no gradient. N == 0 returns
    ``mask_logits.sum() * 0``.
    """
    n, k, m = _check_logits("mask_logits", mask_logits)
    check_targets("gt_masks", gt_masks, (n, m, m))
    check_labels("gt_labels", gt_labels, n)
    check_same_device(mask_logits=mask_logits, gt_masks=gt_masks, gt_labels=gt_labels)
    if n == 0:
        return mask_logits.sum() * 0
    if values_checked(mask_logits):
        check_ranges(indices=[("gt_labels", gt_labels, k)], unit=[("gt_masks", gt_masks)])
    if not eager(mask_logits, gt_masks, gt_labels):
        loss, _ = _mask_loss_op(mask_logits, gt_masks, gt_labels, needs_grad(mask_logits))
    elif needs_grad(mask_logits) and cpu_path(mask_logits):
        record_path("mask_loss_forward", "torch")      # the gradient after the forward
        loss = _cpu.mask_loss(mask_logits, gt_masks, gt_labels)
    elif needs_grad(mask_logits):
        loss = _EagerLoss.apply(_mask_loss_kernel(mask_logits), mask_logits, gt_labels,
                                gt_masks, gt_labels)
    else:
        loss, _ = _mask_loss_kernel(mask_logits)(mask_logits, gt_masks, gt_labels, False)
    return loss.to(loss_dtype(mask_logits.dtype, gt_masks.dtype))


def maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                  gt_labels: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """Drop-in for ``torchvision.models.detection.roi_heads.maskrcnn_loss``.

    mask_logits: (N, K, M, M); per image i: proposals[i] (n_i, 4) boxes, gt_masks[i]
    (G_i, H_i, W_i) uint8/bool/float in [0, 1], gt_labels[i] (G_i,) integer in [0, K),
    mask_matched_idxs[i] (n_i,) integer in [0, G_i), with sum(n_i) = N. The targets are
    torchvision's ``roi_align(gt_masks[i][:, None], [idx, box], (M, M), 1.0)``, sampled
    inside the loss kernel (never materialized). Values are checked for CPU tensors, and
    for CUDA tensors inside ``kernels.check_values()`` (one host sync); unchecked, a row
    whose matched index or label is out of range, or whose proposal is not finite, adds no
    loss and gets no gradient. The loss has torchvision's dtype: mask_logits' promoted with
    the proposals'.
    """
    n, k, m = _check_logits("mask_logits", mask_logits)
    proposals, gt_masks, gt_labels, idxs = check_images(
        {"mask_logits": mask_logits}, k, proposals, gt_masks, gt_labels, mask_matched_idxs)
    if n == 0:
        return mask_logits.sum() * 0
    args = (proposals, gt_masks, gt_labels, idxs)
    if not eager(mask_logits, *proposals, *gt_masks, *gt_labels, *idxs):
        loss = _maskrcnn_loss_op(mask_logits, *args, needs_grad(mask_logits))[0]
    elif needs_grad(mask_logits) and cpu_path(mask_logits):
        record_path("maskrcnn_loss_forward", "torch")  # the gradient after the forward
        loss = _cpu.maskrcnn_loss(mask_logits, *args)
    elif needs_grad(mask_logits):
        loss = _EagerLoss.apply(_maskrcnn_loss_kernel(mask_logits), mask_logits, None, *args)
    else:
        loss = _maskrcnn_loss_kernel(mask_logits)(mask_logits, *args, False)[0]
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
