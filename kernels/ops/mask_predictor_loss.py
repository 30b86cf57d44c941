"""The mask predictor's 1x1 conv and Mask R-CNN's mask loss fused.

* :func:`mask_predictor_loss` — ``mask_loss(F.conv2d(features, weight, bias), gt_masks,
  gt_labels)``: only row ``W[label]`` of the predictor is applied per instance, so the
  (N, K, M, M) logits never exist.
* :func:`maskrcnn_predictor_loss` — torchvision's ``maskrcnn_loss`` on those logits: the
  same kernel with each target sampled from the image's uint8/bool/float gt masks
  (``maskrcnn_loss``'s ``roi_target``) instead of loaded, so neither the float copy of the
  full-resolution masks nor the (N, M, M) targets exist. The model trains with this one.

Forward keeps d loss / d logit (N, M*M float32) for the backward, which reads the features
once and writes their gradient plus per-instance weight-row gradients; both ops share it.
The BCE, the target sampling and the checks are :mod:`kernels.ops.mask_loss`'s; the CPU
path and test oracle are in :mod:`kernels.reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _cpu, reference
from .._sampling import along_c, along_p, p_major
from .._utils import (cdiv, check_float_dtype, check_images, check_labels, check_ranges,
                      check_same_device, check_targets, check_tensor, compute_dtype, eager,
                      memory_format, needs_grad, pick_path, values_checked)
from .._launch import (DTYPE_NAMES, launch, pick_tuning, register_lanes,
                       register_tuning, size_bucket)
from .mask_loss import (SAMPLED_ARGS, bce_with_logits, kernel_targets, loss_dtype,
                        loss_examples, no_grads, pixel_block, roi_target, sampled_row)


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def plane_offsets(offs_p, h, w, stride_h, stride_w, FLAT_PIXELS: tl.constexpr):
    """Offsets of pixels p = (h, w) in an M x M plane. FLAT_PIXELS (the plane is one run of
    stride ``stride_w``, as in NCHW and channels_last tensors): ``p * stride_w``, whose
    contiguity the compiler can see once a unit stride specializes to 1 — it then puts a
    warp's lanes along the pixels on any Triton (3.6 otherwise puts them along channels)."""
    if FLAT_PIXELS:
        return offs_p * stride_w
    else:
        return h * stride_h + w * stride_w


# The sampled variant's gt mask sizes and strides would otherwise specialize the kernel
# (maskrcnn_loss's SAMPLED_ARGS): a new compile per image-size pattern.
@triton.jit(do_not_specialize=SAMPLED_ARGS)
def _mask_predictor_loss_fwd_kernel(
    features_ptr,  # (N, C, M, M) float, any strides
    weight_ptr,  # (K, C, 1, 1) contiguous, features dtype: the 1x1 predictor conv
    bias_ptr,  # (K,) features dtype
    masks_ptr,  # (N, M, M) targets, or SAMPLED: one image's (G, H, W) gt masks; float or uint8
    labels_ptr,  # (N,) integer labels, or SAMPLED: the image's (G,) gt labels
    proposals_ptr,  # SAMPLED: (R, 4) float, contiguous, the image's proposals (else None)
    matched_ptr,  # SAMPLED: (R,) integer, each proposal's gt mask (else None)
    partial_ptr,  # (N, num_programs(1)) float32: loss sum of each program / (N M M)
    grad_ptr,  # (N, M*M) float32: d loss / d logit of the instance's class (WRITE_GRAD)
    rows_label_ptr,  # (N,) int64: each row's label in [0, K), for the backward (WRITE_GRAD)
    row0, G, K, C, M, H, W, f_stride_n, f_stride_c, f_stride_h, f_stride_w,
    m_stride_g, m_stride_h, m_stride_w,  # of the targets (g: instance) or of the gt masks
    inv_count,  # 1 / (N * M * M), N counted over all images
    SAMPLED: tl.constexpr, WRITE_GRAD: tl.constexpr, P_MAJOR: tl.constexpr,
    FLAT_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i, offs_p, mask_p, h, w = pixel_block(M, BLOCK_P)
    n = row0 + i
    if SAMPLED:
        g, ok, label, x1, y1, x2, y2 = sampled_row(proposals_ptr, matched_ptr, labels_ptr, i, G)
    else:
        label = tl.load(labels_ptr + n).to(tl.int64)
    # a label outside [0, K) reads nothing: the row adds no loss and gets no gradient
    label_ok = (label >= 0) & (label < K)
    label = tl.where(label_ok, label, 0)
    in_row = mask_p & label_ok
    # logit = b[label] + sum_c W[label, c] * f[c]: only the instance's own class row.
    # Tiles are (C, P) with lanes along pixels for NCHW features (P_MAJOR), (P, C) with
    # lanes along channels for channels_last ones.
    f_base = features_ptr + n * f_stride_n + along_p(
        plane_offsets(offs_p, h, w, f_stride_h, f_stride_w, FLAT_PIXELS), P_MAJOR)
    acc = (along_p(tl.zeros((BLOCK_P,), dtype=tl.float32), P_MAJOR)
           + along_c(tl.zeros((BLOCK_C,), dtype=tl.float32), P_MAJOR))
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        wv = tl.load(weight_ptr + label * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        f = tl.load(f_base + along_c(offs_c.to(tl.int64) * f_stride_c, P_MAJOR),
                    mask=along_c(mask_c, P_MAJOR) & along_p(mask_p, P_MAJOR),
                    other=0.0).to(tl.float32)
        acc += along_c(wv, P_MAJOR) * f
    if P_MAJOR:
        x = tl.sum(acc, axis=0)
    else:
        x = tl.sum(acc, axis=1)
    x += tl.load(bias_ptr + label).to(tl.float32)
    if SAMPLED:
        # maskrcnn_loss's target, sampled from the gt masks as that kernel does: no float
        # copy of the masks, no (N, M, M) target tensor
        t = roi_target(masks_ptr, g, ok, x1, y1, x2, y2, h, w, mask_p, M, H, W, m_stride_g,
                       m_stride_h, m_stride_w)
    else:
        t = tl.load(masks_ptr + n * m_stride_g + h * m_stride_h + w * m_stride_w,
                    mask=mask_p, other=0).to(tl.float32)
    loss, dx = bce_with_logits(x, t)
    slot = n * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + slot, tl.sum(tl.where(in_row, loss, 0.0), axis=0) * inv_count)
    if WRITE_GRAD:
        tl.store(grad_ptr + n * M * M + offs_p, tl.where(in_row, dx * inv_count, 0.0),
                 mask=mask_p)
        if tl.program_id(1) == 0:
            tl.store(rows_label_ptr + n, label)


@triton.jit
def _mask_predictor_loss_bwd_kernel(
    grad_out_ptr,  # () float: gradient of the scalar loss
    features_ptr,  # (N, C, M, M) float, any strides
    weight_ptr,  # (K, C, 1, 1) contiguous, features dtype
    labels_ptr,  # (N,) int64 in [0, K): the forward's row labels
    grad_sel_ptr,  # (N, M*M) float32: the forward's d loss / d logit
    grad_features_ptr,  # (N, C, M, M) features dtype, strides given below
    grad_rows_ptr,  # (N, C + 1) float32: d loss / d (W[label_n], b[label_n]), instance n's
    C, M, f_stride_n, f_stride_c, f_stride_h, f_stride_w,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    P_MAJOR: tl.constexpr, FLAT_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    label = tl.load(labels_ptr + n)
    g = tl.load(grad_out_ptr).to(tl.float32)
    wv = tl.load(weight_ptr + label * C + offs_c, mask=mask_c, other=0.0).to(tl.float32) * g
    f_base = features_ptr + n * f_stride_n + along_c(offs_c.to(tl.int64) * f_stride_c, P_MAJOR)
    g_base = (grad_features_ptr + n * g_stride_n
              + along_c(offs_c.to(tl.int64) * g_stride_c, P_MAJOR))
    # (C, P) tiles, lanes along pixels, for NCHW (P_MAJOR); (P, C) for channels_last
    acc = (along_p(tl.zeros((BLOCK_P,), dtype=tl.float32), P_MAJOR)
           + along_c(tl.zeros((BLOCK_C,), dtype=tl.float32), P_MAJOR))
    dsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, M * M, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < M * M
        h = offs_p // M
        w = offs_p % M
        tile = along_c(mask_c, P_MAJOR) & along_p(mask_p, P_MAJOR)
        dx = tl.load(grad_sel_ptr + n * M * M + offs_p, mask=mask_p, other=0.0)
        dsum += dx
        f = tl.load(f_base + along_p(plane_offsets(offs_p, h, w, f_stride_h, f_stride_w,
                                                   FLAT_PIXELS), P_MAJOR),
                    mask=tile, other=0.0).to(tl.float32)
        acc += f * along_p(dx, P_MAJOR)
        tl.store(g_base + along_p(plane_offsets(offs_p, h, w, g_stride_h, g_stride_w,
                                                FLAT_PIXELS), P_MAJOR),
                 (along_c(wv, P_MAJOR) * along_p(dx, P_MAJOR)).to(
                     grad_features_ptr.dtype.element_ty), mask=tile)
    if P_MAJOR:
        rows = tl.sum(acc, axis=1)
    else:
        rows = tl.sum(acc, axis=0)
    tl.store(grad_rows_ptr + n * (C + 1) + offs_c, rows * g, mask=mask_c)
    if tl.program_id(1) == 0:
        tl.store(grad_rows_ptr + n * (C + 1) + C, tl.sum(dsum, axis=0) * g)


# One table per kernel: the launcher picks a row, the GPU compile check builds every row.
# Predictor tiles at 4-8 elements per thread. sm_90 registers (occupancy): forward
# [16 channels, 128 pixels] at most 64 (50%) over its 32 variants on Triton 3.8, the
# SAMPLED ones (inline target sampling) included; [32, 128] took 145 (12%); backward
# [16, 64] 48 (62%), its tile reading 256 contiguous bytes per channel row of NCHW
# features ([32, 64] took 80, 38%).
_TUNING_PREDICTOR = [
    {"BLOCK_C": 16, "BLOCK_P": 128, "num_warps": 8},
    # channels_last: once the unit channel stride specializes to 1 (as the JIT compiles
    # it) the bfloat16 sampled variant took 72 registers (38%) at 128 pixels; 62 (50%) here
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
]

_TUNING_PREDICTOR_BWD = [
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
]
register_tuning(_mask_predictor_loss_fwd_kernel, _TUNING_PREDICTOR,
                occupancy_note="the 128-pixel row runs for NCHW features only: below the "
                               "target it is the channels_last variant, which the launcher "
                               "gives the 64-pixel row")
# The sweep's backward candidates, 4 elements per thread: half the channels, or half the
# pixels (sm_90 32-48 registers, 62% and up).
register_tuning(_mask_predictor_loss_bwd_kernel, _TUNING_PREDICTOR_BWD, candidates=[
    {"BLOCK_C": 8, "BLOCK_P": 64, "num_warps": 4}, {"BLOCK_C": 16, "BLOCK_P": 32, "num_warps": 4},
], key_fields=("C", "M", "N", "dtype", "layout"))


def _lanes(constexprs: dict) -> dict:
    """The predictor's feature tiles: (C, P) for NCHW features (P_MAJOR, lanes along
    pixels), (P, C) for channels_last ones (lanes along channels); the launcher picks
    P_MAJOR with ``p_major``; features whose planes are not one run are a "crop". The loss
    kernels' other accesses are 1-D."""
    layout = "NCHW" if constexprs["P_MAJOR"] else "channels_last"
    if constexprs.get("M") == 1:
        layout = "1x1 plane"
    elif not constexprs.get("FLAT_PIXELS", True):
        layout += " crop"
    return {layout: {"load": 1, "store": 1}}


# Planes that are not one run (a crop of larger maps) leave the pixel offsets without
# provable contiguity: the layout is then the compiler's guess.
_LANE_NOTES = {"NCHW crop": "a crop's pixel offsets h * stride_h + w * stride_w have no "
                             "provable contiguity: Triton 3.6 puts the lanes along channels, "
                             "3.8 along pixels",
               "1x1 plane": "M = 1 (a constant to the JIT): one pixel, nothing to run along"}
register_lanes(_mask_predictor_loss_fwd_kernel, _lanes, _LANE_NOTES)
register_lanes(_mask_predictor_loss_bwd_kernel, _lanes, _LANE_NOTES)


# ---------------------------------------------------------------------------------------
# Host launchers (inputs already validated by the public function)

def mask_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                targets: Tensor, labels: Tensor, compute_grad: bool):
    targets = kernel_targets(targets)
    return _forward(features, weight, bias, compute_grad,
                    [(0, features.shape[0], targets, labels, None, None)])


def maskrcnn_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                    proposals: list[Tensor], gt_masks: list[Tensor],
                                    gt_labels: list[Tensor], matched: list[Tensor],
                                    compute_grad: bool):
    """One launch per image (each image has its own masks and size), reading the image's
    proposals, matched indices and gt labels as they are."""
    launches, row0 = [], 0
    for boxes, masks, labels, idxs in zip(proposals, gt_masks, gt_labels, matched):
        if boxes.shape[0]:
            launches.append((row0, boxes.shape[0], kernel_targets(masks), labels.contiguous(),
                             boxes.contiguous(), idxs.contiguous()))
        row0 += boxes.shape[0]
    return _forward(features, weight, bias, compute_grad, launches)


def flat_pixels(t: Tensor) -> bool:
    """Whether each (h, w) plane of an (N, C, M, M) tensor is one run of stride ``w``."""
    return t.shape[2] <= 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _forward(features, weight, bias, compute_grad: bool, launches):
    """Launch the forward over ``launches``: (first row, rows, their targets or gt masks,
    their labels or gt labels, and for sampled targets the proposals and matched indices,
    else None). Returns the loss, d loss / d logit and each row's label (no rows unless
    ``compute_grad``: None, and the op's outputs are empty tensors)."""
    n, c, m, _ = features.shape
    p_maj = p_major([features])
    tuning = pick_tuning(_mask_predictor_loss_fwd_kernel, _TUNING_PREDICTOR[0 if p_maj else 1])
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=features.device)
    grad = labels_out = None
    if compute_grad:
        grad = torch.empty(n, m * m, dtype=torch.float32, device=features.device)
        labels_out = torch.empty(n, dtype=torch.int64, device=features.device)
    for row0, count, masks, labels, boxes, idxs in launches:
        sampled = boxes is not None
        g, h, w = masks.shape if sampled else (0, m, m)
        launch(_mask_predictor_loss_fwd_kernel, (count, blocks), features, weight, bias, masks,
               labels, boxes, idxs, partial, grad, labels_out, row0, g, weight.shape[0], c, m,
               h, w,
               *features.stride(), *masks.stride(), 1.0 / (n * m * m), tuning=tuning,
               SAMPLED=sampled, WRITE_GRAD=bool(compute_grad), P_MAJOR=p_maj,
               FLAT_PIXELS=flat_pixels(features))
    return partial.sum(), grad, labels_out


def mask_predictor_loss_backward(grad: Tensor, features: Tensor, weight: Tensor,
                                 labels: Tensor, grad_sel: Tensor):
    n, c, m, _ = features.shape
    grad_features = torch.empty(features.shape, dtype=features.dtype, device=features.device,
                                memory_format=memory_format(features))
    rows = torch.empty(n, c + 1, dtype=torch.float32, device=features.device)
    p_maj = p_major([features])
    tuning = pick_tuning(_mask_predictor_loss_bwd_kernel, _TUNING_PREDICTOR_BWD[0], key=(
        c, m, size_bucket(n), DTYPE_NAMES[features.dtype],
        "NCHW" if p_maj else "channels_last"))
    launch(_mask_predictor_loss_bwd_kernel, (n, cdiv(c, tuning["BLOCK_C"])), grad, features,
           weight, labels, grad_sel, grad_features, rows, c, m, *features.stride(),
           *grad_features.stride(), tuning=tuning, P_MAJOR=p_maj,
           FLAT_PIXELS=flat_pixels(features) and flat_pixels(grad_features))
    # Instances of one class add into the same weight row: one index_add of the (N, C + 1)
    # per-instance weight and bias rows (exact float32; atomic on CUDA unless deterministic
    # algorithms are on), tiny next to the features. The two gradients are views of it.
    grads = torch.zeros(weight.shape[0], c + 1, dtype=torch.float32,
                        device=weight.device).index_add_(0, labels, rows).to(weight.dtype)
    return grad_features, grads[:, :c].view(weight.shape), grads[:, c]


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd; the eager form (an autograd.Function calling
# the device kernels directly, without the dispatcher)

def _predictor_kernel(features: Tensor):
    return pick_path(features, mask_predictor_loss_forward,
                     reference.mask_predictor_loss_forward,
                     cpu=_cpu.mask_predictor_loss_forward, cpu_name="torch")


def _sampled_kernel(features: Tensor):
    return pick_path(features, maskrcnn_predictor_loss_forward,
                     reference.maskrcnn_predictor_loss_forward,
                     cpu=_cpu.maskrcnn_predictor_loss_forward, cpu_name="torch")


def _backward_kernel(features: Tensor):
    return pick_path(features, mask_predictor_loss_backward,
                     reference.mask_predictor_loss_backward,
                     cpu=_cpu.mask_predictor_loss_backward, cpu_name="torch")


@torch.library.custom_op("maskrcnn_triton::mask_predictor_loss", mutates_args=())
def _mask_predictor_loss_op(features: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                            labels: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _op_outputs(features, _predictor_kernel(features)(features, weight, bias, targets,
                                                             labels, compute_grad))


def _op_outputs(features: Tensor, out: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """A kernel's (loss, grad, labels) as the op returns them: empty tensors where the
    kernel had no rows to return (None)."""
    loss, grad, labels = out
    if grad is None:
        grad = loss.new_empty(0, features.shape[2] ** 2)
        labels = loss.new_empty(0, dtype=torch.int64)
    return loss, grad, labels


@_mask_predictor_loss_op.register_fake
def _(features, weight, bias, targets, labels, compute_grad):
    return _fake_forward(features, compute_grad)


def _fake_forward(features: Tensor, compute_grad: bool):
    n, _, m, _ = features.shape
    rows = n if compute_grad else 0
    dtype = compute_dtype(features.dtype)
    return (features.new_empty((), dtype=dtype), features.new_empty(rows, m * m, dtype=dtype),
            features.new_empty(rows, dtype=torch.int64))


@torch.library.custom_op("maskrcnn_triton::maskrcnn_predictor_loss", mutates_args=())
def _maskrcnn_predictor_loss_op(features: Tensor, weight: Tensor, bias: Tensor,
                                proposals: list[Tensor], gt_masks: list[Tensor],
                                gt_labels: list[Tensor], matched: list[Tensor],
                                compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _op_outputs(features, _sampled_kernel(features)(
        features, weight, bias, proposals, gt_masks, gt_labels, matched, compute_grad))


@_maskrcnn_predictor_loss_op.register_fake
def _(features, weight, bias, proposals, gt_masks, gt_labels, matched, compute_grad):
    return _fake_forward(features, compute_grad)


@torch.library.custom_op("maskrcnn_triton::mask_predictor_loss_backward", mutates_args=())
def _mask_predictor_loss_backward_op(grad: Tensor, features: Tensor, weight: Tensor,
                                     labels: Tensor,
                                     grad_sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_features, grad_weight, grad_bias = _backward_kernel(features)(
        grad, features, weight, labels, grad_sel)
    # a custom op's outputs must not alias each other (the kernel's share one buffer)
    return grad_features, grad_weight.clone(), grad_bias.clone()


@_mask_predictor_loss_backward_op.register_fake
def _(grad, features, weight, labels, grad_sel):
    grad_features = torch.empty_like(features, memory_format=memory_format(features))
    return grad_features, torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _predictor_setup(ctx, inputs, output):
    features, weight = inputs[:2]
    ctx.save_for_backward(features, weight, output[2], output[1])
    ctx.no_grads = no_grads(inputs[3:])


def _predictor_grad(ctx, grad, *_):
    grad_features, grad_weight, grad_bias = _mask_predictor_loss_backward_op(
        grad, *ctx.saved_tensors)
    return (grad_features, grad_weight, grad_bias) + ctx.no_grads


_mask_predictor_loss_op.register_autograd(_predictor_grad, setup_context=_predictor_setup)
_maskrcnn_predictor_loss_op.register_autograd(_predictor_grad, setup_context=_predictor_setup)


class _EagerPredictorLoss(torch.autograd.Function):
    """Either predictor loss in eager code: ``kernel(features, weight, bias, *rest, True)``
    returns the loss, d loss / d logit and each row's label; the backward runs the device's
    backward kernel directly."""

    @staticmethod
    def forward(ctx, kernel, features, weight, bias, *rest):
        loss, grad_sel, labels = kernel(features, weight, bias, *rest, True)
        ctx.save_for_backward(features, weight, labels, grad_sel)
        ctx.rest = len(rest)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features = ctx.saved_tensors[0]
        grads = _backward_kernel(features)(grad, *ctx.saved_tensors)
        return (None, *grads) + (None,) * ctx.rest


def _loss(op, kernel, features: Tensor, weight: Tensor, bias: Tensor, rest: tuple,
          tensors: tuple) -> Tensor:
    """The loss through the custom op while tracing, else the device kernel (through
    :class:`_EagerPredictorLoss` where a gradient is wanted)."""
    grad = needs_grad(features, weight, bias)
    if not eager(features, weight, bias, *tensors):
        return op(features, weight, bias, *rest, grad)[0]
    if grad:
        return _EagerPredictorLoss.apply(kernel(features), features, weight, bias, *rest)
    return kernel(features)(features, weight, bias, *rest, False)[0]


# ---------------------------------------------------------------------------------------
# Public API: validation, then the ops

def _check_predictor(features, weight, bias) -> tuple[int, int, int, int]:
    """Check the features and the 1x1 predictor; return N, C, M and K."""
    check_tensor("features", features, ndim=4, what="a 4-D (N, C, M, M) tensor")
    check_float_dtype("features", features)
    n, c, m, mw = features.shape
    if m != mw:
        raise ValueError(f"features must hold square M x M maps, got shape "
                         f"{tuple(features.shape)}")
    check_tensor("weight", weight, ndim=4, what="a (K, C, 1, 1) tensor")
    if weight.shape[1:] != (c, 1, 1):
        raise ValueError(f"weight must have shape (K, {c}, 1, 1), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    k = weight.shape[0]
    check_tensor("bias", bias, ndim=1, what="a 1-D (K,) tensor")
    if bias.shape[0] != k:
        raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    check_same_device(features=features, weight=weight, bias=bias)
    return n, c, m, k


def _parameters(features: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The predictor's weight as (K, C, 1, 1) and its bias, in the features' dtype (as
    conv2d under autocast) and contiguous: the kernels read weight row ``label`` at
    ``label * C``. No copy where they already are."""
    dtype = features.dtype
    if weight.dtype != dtype or bias.dtype != dtype:
        weight, bias = weight.to(dtype), bias.to(dtype)
    return weight.contiguous(), bias.contiguous()


def _zero_loss(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """N == 0: a zero connected to features, weight and bias."""
    return (features.sum() + weight.sum() + bias.sum()).to(features.dtype) * 0


def mask_predictor_loss(features: Tensor, weight: Tensor, bias: Tensor,
                        gt_masks: Tensor, gt_labels: Tensor) -> Tensor:
    """``mask_loss(F.conv2d(features, weight, bias), gt_masks, gt_labels)`` without the logits.

    features: (N, C, M, M) float32/float16/bfloat16 (float64: reference path), NCHW or
    channels_last; weight (K, C, 1, 1) and bias (K,) of the 1x1 mask predictor, cast to
    features' dtype (as conv2d under autocast). Only row ``weight[label]`` is applied per
    instance, so no (N, K, M, M) tensor is allocated in forward or backward; gradients for
    features, weight and bias equal autograd through conv2d + gather + BCE, and the loss
    has its dtype (features' promoted with a float gt_masks'). Values are checked in one host
    sync. N == 0 returns a zero connected to features, weight and bias.
    """
    n, c, m, k = _check_predictor(features, weight, bias)
    check_targets("gt_masks", gt_masks, (n, m, m))
    check_labels("gt_labels", gt_labels, n)
    check_same_device(features=features, gt_masks=gt_masks, gt_labels=gt_labels)
    if n == 0:
        return _zero_loss(features, weight, bias)
    if values_checked(features):
        check_ranges(indices=[("gt_labels", gt_labels, k)], unit=[("gt_masks", gt_masks)])
    weight, bias = _parameters(features, weight, bias)
    loss = _loss(_mask_predictor_loss_op, _predictor_kernel, features, weight, bias,
                 (gt_masks, gt_labels), (gt_masks, gt_labels))
    return loss.to(loss_dtype(features.dtype, gt_masks.dtype))


def maskrcnn_predictor_loss(features: Tensor, weight: Tensor, bias: Tensor,
                            proposals: list[Tensor], gt_masks: list[Tensor],
                            gt_labels: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """torchvision's ``maskrcnn_loss(F.conv2d(features, weight, bias), proposals, gt_masks,
    gt_labels, mask_matched_idxs)`` without the logits and without the targets.

    features, weight, bias as :func:`mask_predictor_loss`; the per-image lists as
    :func:`kernels.maskrcnn_loss` (sum(n_i) = N). Each target is sampled from the
    uint8/bool/float gt masks inside the loss kernel, as ``maskrcnn_loss`` does: training
    never makes a float copy of the full-resolution masks nor an (N, M, M) target tensor
    (the reference path, float64 and CPU tensors, materializes them). Gradients flow to
    features, weight and bias; the loss has torchvision's dtype (features' promoted with
    the proposals'). Values are checked in one host sync, not while compiling.
    """
    n, c, m, k = _check_predictor(features, weight, bias)
    args = check_images({"features": features}, k, proposals, gt_masks, gt_labels,
                        mask_matched_idxs)
    if n == 0:
        return _zero_loss(features, weight, bias)
    weight, bias = _parameters(features, weight, bias)
    loss = _loss(_maskrcnn_predictor_loss_op, _sampled_kernel, features, weight, bias, args,
                 tuple(t for part in args for t in part))
    return loss.to(loss_dtype(features.dtype, *(p.dtype for p in args[0])))


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launchers can pick (for the GPU compile check and
    the GPU kit's memory check, which runs these on CUDA): each dtype and layout of the
    features, each kind of target, given and sampled (``mask_loss.loss_examples``)."""
    weight = torch.randn(3, 5, 1, 1, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    for features, targets, gt, (labels, boxes, matched) in loss_examples(5, device):
        mask_predictor_loss(features, weight, bias, targets, labels).backward()
        maskrcnn_predictor_loss(features, weight, bias, boxes, [gt], [labels],
                                matched).backward()
    # a crop of larger maps: planes that are not one run (FLAT_PIXELS=False)
    crop = torch.randn(2, 5, 6, 6, device=device)[:, :, 1:5, 1:5].requires_grad_()
    mask_predictor_loss(crop, weight, bias, targets, labels).backward()
