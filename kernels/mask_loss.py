"""Mask R-CNN's mask loss as fused Triton kernels.

Three ops, all ``mean`` binary cross-entropy with logits over each instance's own class plane:

* :func:`mask_loss` — ``F.binary_cross_entropy_with_logits(mask_logits[arange(N), labels],
  gt_masks)``. One pass reads only the selected class planes of the (N, K, M, M) logits and
  writes the loss partial sums and the gradient of those planes (gradient-in-forward, as
  Liger's cross-entropy); the backward only scales that gradient by ``grad_output`` and
  writes the dense (N, K, M, M) gradient in one pass.
* :func:`maskrcnn_loss` — torchvision's ``roi_heads.maskrcnn_loss``: the targets (RoI Align
  of the full-image gt masks over the proposals, ``sampling_ratio=-1, aligned=False``) are
  sampled inside the loss kernel from the uint8/bool/float masks, with RoI Align's own
  ``roi_box``/``bilinear_axis`` helpers, instead of being materialized as N x M x M floats.
* :func:`fused_mask_predictor_loss` — the mask predictor's 1x1 conv and the loss in one:
  only row ``W[label]`` of the predictor is applied per instance, so the (N, K, M, M) logits
  never exist. Forward keeps d loss / d logit (N, M*M float32) for the backward, which
  reads the features once and writes their gradient plus per-instance weight-row gradients.

The reference implementations (the CPU path, float64 and the gradcheck dtype) sit beside
the kernels at the end of the kernel section; they use explicit formulas, and the tests
check both against PyTorch autograd and torchvision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (FLOAT_DTYPES, cdiv, check_same_device, check_tensor, is_tracing, launch,
                     pick_tuning, register_lanes, register_tuning, use_triton)
from ._sampling import along_c, along_p, bilinear_axis, p_major, roi_box

# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _bce_with_logits(x, t):
    """Numerically stable BCE with logits per element, and its derivative sigmoid(x) - t."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows, even at |x| = 100
    # log1p(e) without libdevice (the interpreter lacks it): its series where 1 + e rounds
    softplus = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    loss = tl.maximum(x, 0.0) - x * t + softplus
    sigmoid = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, sigmoid - t


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
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < M * M
    h = offs // M
    w = offs % M
    label = tl.load(labels_ptr + n)
    x = tl.load(logits_ptr + n * l_stride_n + label * l_stride_k + h * l_stride_h
                + w * l_stride_w, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(targets_ptr + n * t_stride_n + h * t_stride_h + w * t_stride_w,
                mask=mask, other=0).to(tl.float32)
    loss, dx = _bce_with_logits(x, t)
    tl.store(partial_ptr + n * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + n * M * M + offs, dx * inv_count, mask=mask)


# Each image's gt mask size and strides would otherwise specialize the kernel (== 1,
# divisible by 16): a new compile per size pattern in the first steps of a run.
@triton.jit(do_not_specialize=["H", "W", "m_stride_g", "m_stride_h", "m_stride_w"])
def _mask_loss_sampled_fwd_kernel(
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
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < M * M
    h = offs // M
    w = offs % M
    # The target: torchvision's roi_align(gt_masks[:, None], rois, (M, M), 1.0)[:, 0],
    # i.e. spatial scale 1, adaptive sampling, aligned=False.
    g, start_h, start_w, bin_h, bin_w, grid_h, grid_w = roi_box(
        rois_ptr, r, 1.0, M, M, -1, False)
    ph = h.to(tl.float32)
    pw = w.to(tl.float32)
    base = masks_ptr + g * m_stride_g
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        y_lo, y_hi, wy_lo, wy_hi, valid_y = bilinear_axis(y, H)
        row_lo = y_lo.to(tl.int64) * m_stride_h
        row_hi = y_hi.to(tl.int64) * m_stride_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            x_lo, x_hi, wx_lo, wx_hi, valid_x = bilinear_axis(x, W)
            m = valid_y & valid_x & mask
            col_lo = x_lo.to(tl.int64) * m_stride_w
            col_hi = x_hi.to(tl.int64) * m_stride_w
            v1 = tl.load(base + row_lo + col_lo, mask=m, other=0).to(tl.float32)
            v2 = tl.load(base + row_lo + col_hi, mask=m, other=0).to(tl.float32)
            v3 = tl.load(base + row_hi + col_lo, mask=m, other=0).to(tl.float32)
            v4 = tl.load(base + row_hi + col_hi, mask=m, other=0).to(tl.float32)
            acc += wy_lo * wx_lo * v1 + wy_lo * wx_hi * v2 + wy_hi * wx_lo * v3 + wy_hi * wx_hi * v4
    t = acc / tl.maximum(grid_h * grid_w, 1).to(tl.float32)

    label = tl.load(labels_ptr + r)
    x = tl.load(logits_ptr + r * l_stride_n + label * l_stride_k + h * l_stride_h
                + w * l_stride_w, mask=mask, other=0.0).to(tl.float32)
    loss, dx = _bce_with_logits(x, t)
    tl.store(partial_ptr + r * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + r * M * M + offs, dx * inv_count, mask=mask)


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


@triton.jit
def _mask_predictor_loss_fwd_kernel(
    features_ptr,  # (N, C, M, M) float, any strides
    weight_ptr,  # (K, C) contiguous, features dtype: the 1x1 predictor conv
    bias_ptr,  # (K,) features dtype
    targets_ptr,  # (N, M, M) float or uint8, any strides
    labels_ptr,  # (N,) int64 in [0, K)
    partial_ptr,  # (N, num_programs(1)) float32: loss sum of each program
    dsum_ptr,  # (N, num_programs(1)) float32: sum of d loss / d logit of each program
    grad_ptr,  # (N, M*M) float32: d loss / d logit of the instance's class
    C, M, f_stride_n, f_stride_c, f_stride_h, f_stride_w, t_stride_n, t_stride_h, t_stride_w,
    inv_count,  # 1 / (N * M * M)
    WRITE_GRAD: tl.constexpr, P_MAJOR: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < M * M
    h = offs_p // M
    w = offs_p % M
    label = tl.load(labels_ptr + n)
    f_base = features_ptr + n * f_stride_n + along_p(h * f_stride_h + w * f_stride_w, P_MAJOR)
    # logit = b[label] + sum_c W[label, c] * f[c]: only the instance's own class row.
    # Tiles are (C, P) with lanes along pixels for NCHW features (P_MAJOR), (P, C) with
    # lanes along channels for channels_last ones.
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
    t = tl.load(targets_ptr + n * t_stride_n + h * t_stride_h + w * t_stride_w,
                mask=mask_p, other=0).to(tl.float32)
    loss, dx = _bce_with_logits(x, t)
    slot = n * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + slot, tl.sum(tl.where(mask_p, loss, 0.0), axis=0))
    if WRITE_GRAD:
        dx = tl.where(mask_p, dx * inv_count, 0.0)
        tl.store(dsum_ptr + slot, tl.sum(dx, axis=0))
        tl.store(grad_ptr + n * M * M + offs_p, dx, mask=mask_p)


@triton.jit
def _mask_predictor_loss_bwd_kernel(
    grad_out_ptr,  # () float: gradient of the scalar loss
    features_ptr,  # (N, C, M, M) float, any strides
    weight_ptr,  # (K, C) contiguous, features dtype
    labels_ptr,  # (N,) int64 in [0, K)
    grad_sel_ptr,  # (N, M*M) float32: the forward's d loss / d logit
    grad_features_ptr,  # (N, C, M, M) features dtype, strides given below
    grad_rows_ptr,  # (N, C) float32: d loss / d W[label_n] from instance n alone
    C, M, f_stride_n, f_stride_c, f_stride_h, f_stride_w,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    P_MAJOR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
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
    for p0 in range(0, M * M, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < M * M
        h = offs_p // M
        w = offs_p % M
        tile = along_c(mask_c, P_MAJOR) & along_p(mask_p, P_MAJOR)
        dx = tl.load(grad_sel_ptr + n * M * M + offs_p, mask=mask_p, other=0.0)
        f = tl.load(f_base + along_p(h * f_stride_h + w * f_stride_w, P_MAJOR), mask=tile,
                    other=0.0).to(tl.float32)
        acc += f * along_p(dx, P_MAJOR)
        tl.store(g_base + along_p(h * g_stride_h + w * g_stride_w, P_MAJOR),
                 (along_c(wv, P_MAJOR) * along_p(dx, P_MAJOR)).to(
                     grad_features_ptr.dtype.element_ty), mask=tile)
    if P_MAJOR:
        rows = tl.sum(acc, axis=1)
    else:
        rows = tl.sum(acc, axis=0)
    tl.store(grad_rows_ptr + n * C + offs_c, rows * g, mask=mask_c)


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
# Predictor tiles at 4-8 elements per thread. sm_90 registers (occupancy): forward
# [16 channels, 128 pixels] 32 (100%) on Triton 3.8/3.9, 64 (50%) on 3.6, where [32, 128]
# took 145 (12%); backward [16, 64] 48 (62%), its tile reading 256 contiguous bytes per
# channel row of NCHW features ([32, 64] took 80, 38%).
_TUNING_PREDICTOR = [
    {"BLOCK_C": 16, "BLOCK_P": 128, "num_warps": 8},
]
_TUNING_PREDICTOR_BWD = [
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
]
register_tuning(_mask_loss_fwd_kernel, _TUNING_PIXELS)
register_tuning(_mask_loss_sampled_fwd_kernel, _TUNING_SAMPLED)
register_tuning(_mask_loss_bwd_kernel, _TUNING_DENSE)
register_tuning(_mask_predictor_loss_fwd_kernel, _TUNING_PREDICTOR)
register_tuning(_mask_predictor_loss_bwd_kernel, _TUNING_PREDICTOR_BWD)



def _predictor_lanes(constexprs: dict) -> dict:
    """The predictor's feature tiles: (C, P) for NCHW features (P_MAJOR, lanes along
    pixels), (P, C) for channels_last ones (lanes along channels); the launcher picks
    P_MAJOR with ``p_major``. The loss kernels' other accesses are 1-D."""
    if constexprs["P_MAJOR"]:
        return {"NCHW": {"load": 1, "store": 1}}
    return {"channels_last": {"load": 1, "store": 1}}


register_lanes(_mask_predictor_loss_fwd_kernel, _predictor_lanes)
register_lanes(_mask_predictor_loss_bwd_kernel, _predictor_lanes)


def _pixel_tuning(pixels: int) -> dict:
    return _TUNING_PIXELS[0] if pixels <= 256 else _TUNING_PIXELS[1]


# ---------------------------------------------------------------------------------------
# Reference implementations (CPU path, float64, test oracle): explicit formulas, no autograd.

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bce_reference(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element loss and d loss / d x, in x's dtype."""
    loss = x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    return loss, torch.sigmoid(x) - t


def mask_loss_reference(logits: Tensor, targets: Tensor, labels: Tensor,
                        compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d selected logits (N, M, M)), both in the compute dtype."""
    n, _, m, _ = logits.shape
    cdt = _compute_dtype(logits.dtype)
    x = logits[torch.arange(n, device=logits.device), labels].to(cdt)
    loss, dx = _bce_reference(x, targets.to(cdt))
    grad = dx / x.numel() if compute_grad else x.new_empty(0, m, m)
    return loss.mean(), grad


def mask_loss_backward_reference(grad: Tensor, grad_sel: Tensor, labels: Tensor,
                                 classes: int, channels_last: bool,
                                 dtype: torch.dtype) -> Tensor:
    n, m, _ = grad_sel.shape
    out = torch.zeros(n, classes, m, m, dtype=dtype, device=grad.device)
    out[torch.arange(n, device=labels.device), labels] = (grad_sel * grad).to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _axis_weights(lo: Tensor, length: Tensor, size_out: int, size_in: int, g_max: int,
                  grid: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bilinear neighbours and weights of every sample along one axis of each box.

    torchvision's roi_align with spatial scale 1, aligned=False: the box length is at least
    1, bin p's sample i sits at lo + p*bin + (i + 0.5)*bin/grid, and a sample outside
    [-1, size_in] weighs 0. Returns (index, weight), each (k, size_out, g_max, 2).
    """
    bin_size = length / size_out
    i = torch.arange(g_max, dtype=dtype, device=lo.device)
    p = torch.arange(size_out, dtype=dtype, device=lo.device)
    pos = (lo[:, None, None] + p[:, None] * bin_size[:, None, None]
           + (i + 0.5) * bin_size[:, None, None] / grid.clamp(min=1).to(dtype)[:, None, None])
    weight_ok = (i < grid[:, None, None]) & (pos >= -1) & (pos <= size_in)
    pos = pos.clamp(min=0, max=size_in - 1)        # past the last pixel: all weight on it
    low = pos.floor().clamp(max=size_in - 1)
    frac = pos - low
    index = torch.stack([low, (low + 1).clamp(max=size_in - 1)], -1).long()
    weight = torch.stack([1 - frac, frac], -1) * weight_ok[..., None]
    return index, weight


def _project_masks(masks: Tensor, rois: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Targets of one image, (R, M, M): a gather of each sample's 2x2 neighbours, weighted.

    RoIs are sorted by sample count and processed in chunks of bounded memory.
    """
    r = rois.to(dtype)
    length_w = (r[:, 3] - r[:, 1]).clamp(min=1)
    length_h = (r[:, 4] - r[:, 2]).clamp(min=1)
    grid_h = torch.ceil(length_h / size).long()
    grid_w = torch.ceil(length_w / size).long()
    count = (grid_h * grid_w).clamp(min=1).to(dtype)
    order = torch.argsort(grid_h * grid_w).tolist()
    out = torch.empty(len(order), size, size, dtype=dtype, device=rois.device)
    h, w = masks.shape[1:]
    start = 0
    while start < len(order):
        gh, gw = int(grid_h[order[start]].clamp(min=1)), int(grid_w[order[start]].clamp(min=1))
        per_roi = size * size * 4 * gh * gw
        idx = order[start:start + max(1, (1 << 22) // per_roi)]
        gh = max(int(grid_h[idx].max()), 1)       # sorted: the chunk's last is its largest
        gw = max(int(grid_w[idx].max()), 1)
        iy, wy = _axis_weights(r[idx, 2], length_h[idx], size, h, gh, grid_h[idx], dtype)
        ix, wx = _axis_weights(r[idx, 1], length_w[idx], size, w, gw, grid_w[idx], dtype)
        b = r[idx, 0].long()
        vals = masks[b[:, None, None, None, None, None, None],
                     iy[:, :, :, :, None, None, None], ix[:, None, None, None]].to(dtype)
        out[idx] = torch.einsum("kpab,kpabqcd,kqcd->kpq", wy, vals, wx) / count[idx, None, None]
        start += len(idx)
    return out


def project_masks_reference(gt_masks: list[Tensor], rois: Tensor, rows: list[int],
                            size: int, dtype: torch.dtype) -> Tensor:
    """torchvision's project_masks_on_boxes for every image: (N, M, M) targets."""
    out, start = [], 0
    for masks, r in zip(gt_masks, rows):
        if r:
            out.append(_project_masks(masks, rois[start:start + r], size, dtype))
        start += r
    return torch.cat(out) if out else rois.new_zeros(0, size, size, dtype=dtype)


def mask_predictor_loss_reference(features: Tensor, weight: Tensor, bias: Tensor,
                                  targets: Tensor, labels: Tensor, compute_grad: bool):
    """(loss, d loss / d logit (N, M*M), its per-instance sums (N,)) of the fused predictor."""
    n, c, m, _ = features.shape
    cdt = _compute_dtype(features.dtype)
    f = features.to(cdt).reshape(n, c, m * m)
    x = torch.einsum("ncp,nc->np", f, weight[labels].to(cdt)) + bias[labels].to(cdt)[:, None]
    loss, dx = _bce_reference(x, targets.to(cdt).reshape(n, m * m))
    if not compute_grad:
        return loss.mean(), x.new_empty(0, m * m), x.new_empty(0)
    dx = dx / x.numel()
    return loss.mean(), dx, dx.sum(1)


def mask_predictor_loss_backward_reference(grad, features, weight, labels, grad_sel, dsum):
    n, c, m, _ = features.shape
    cdt = grad_sel.dtype
    g = grad.to(cdt)
    w = weight[labels].to(cdt) * g                                     # (N, C)
    grad_features = (w[:, :, None] * grad_sel[:, None, :]).reshape(n, c, m, m)
    rows = torch.einsum("ncp,np->nc", features.to(cdt).reshape(n, c, m * m), grad_sel) * g
    grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device).index_add_(
        0, labels, rows)
    grad_bias = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device).index_add_(
        0, labels, dsum * g)
    return (grad_features.to(features.dtype).contiguous(memory_format=_memory_format(features)),
            grad_weight.to(weight.dtype), grad_bias.to(weight.dtype))


# ---------------------------------------------------------------------------------------
# Host launchers (inputs already validated by the public functions)

def _is_channels_last(t: Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def _kernel_targets(t: Tensor) -> Tensor:
    """Targets as the kernels load them: bool viewed as uint8, float64 as float32."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.float64:
        return t.float()
    return t


def mask_loss_forward(logits: Tensor, targets: Tensor, labels: Tensor,
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    n, _, m, _ = logits.shape
    targets = _kernel_targets(targets)
    tuning = pick_tuning(_mask_loss_fwd_kernel, _pixel_tuning(m * m))
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
    tuning = pick_tuning(_mask_loss_sampled_fwd_kernel, _TUNING_SAMPLED[0])
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=logits.device)
    grad = torch.empty(n if compute_grad else 0, m, m, dtype=torch.float32,
                       device=logits.device)
    inv_count = 1.0 / (n * m * m)
    start = 0
    for masks, r in zip(gt_masks, rows):
        if r:
            masks = _kernel_targets(masks)
            end = start + r
            launch(_mask_loss_sampled_fwd_kernel, (r, blocks), logits[start:end],
                   rois[start:end], masks, labels[start:end], partial[start:end],
                   grad[start:end] if compute_grad else grad, m, masks.shape[1],
                   masks.shape[2], *logits.stride(), *masks.stride(), inv_count,
                   tuning=tuning, WRITE_GRAD=bool(compute_grad))
        start += r
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


def mask_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                targets: Tensor, labels: Tensor, compute_grad: bool):
    n, c, m, _ = features.shape
    weight = weight.contiguous()
    bias = bias.contiguous()
    targets = _kernel_targets(targets)
    tuning = pick_tuning(_mask_predictor_loss_fwd_kernel, _TUNING_PREDICTOR[0])
    blocks = cdiv(m * m, tuning["BLOCK_P"])
    partial = torch.empty(n, blocks, dtype=torch.float32, device=features.device)
    dsum = torch.empty(n if compute_grad else 0, blocks, dtype=torch.float32,
                       device=features.device)
    grad = torch.empty(n if compute_grad else 0, m * m, dtype=torch.float32,
                       device=features.device)
    inv_count = 1.0 / (n * m * m)
    launch(_mask_predictor_loss_fwd_kernel, (n, blocks), features, weight, bias, targets,
           labels, partial, dsum, grad, c, m, *features.stride(), *targets.stride(),
           inv_count, tuning=tuning, WRITE_GRAD=bool(compute_grad),
           P_MAJOR=p_major([features]))
    return partial.sum() * inv_count, grad, dsum.sum(1)


def mask_predictor_loss_backward(grad: Tensor, features: Tensor, weight: Tensor,
                                 labels: Tensor, grad_sel: Tensor, dsum: Tensor):
    n, c, m, _ = features.shape
    weight = weight.contiguous()
    grad_features = torch.empty(features.shape, dtype=features.dtype, device=features.device,
                                memory_format=_memory_format(features))
    rows = torch.empty(n, c, dtype=torch.float32, device=features.device)
    tuning = pick_tuning(_mask_predictor_loss_bwd_kernel, _TUNING_PREDICTOR_BWD[0])
    launch(_mask_predictor_loss_bwd_kernel, (n, cdiv(c, tuning["BLOCK_C"])), grad, features,
           weight, labels, grad_sel, grad_features, rows, c, m, *features.stride(),
           *grad_features.stride(), tuning=tuning, P_MAJOR=p_major([features]))
    # Instances of one class add into the same weight row: an index_add of the (N, C)
    # per-instance rows (exact float32; atomic on CUDA unless deterministic algorithms are
    # on), tiny next to the features.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32,
                              device=weight.device).index_add_(0, labels, rows)
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32,
                            device=weight.device).index_add_(0, labels, dsum * grad)
    return grad_features, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd

def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("maskrcnn_triton::mask_loss", mutates_args=())
def _mask_loss_op(logits: Tensor, targets: Tensor, labels: Tensor,
                  compute_grad: bool) -> tuple[Tensor, Tensor]:
    if use_triton(logits):
        return mask_loss_forward(logits, targets, labels, compute_grad)
    return mask_loss_reference(logits, targets, labels, compute_grad)


@_mask_loss_op.register_fake
def _(logits, targets, labels, compute_grad):
    n, _, m, _ = logits.shape
    dtype = _grad_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dtype),
            logits.new_empty(n if compute_grad else 0, m, m, dtype=dtype))


@torch.library.custom_op("maskrcnn_triton::maskrcnn_mask_loss", mutates_args=())
def _maskrcnn_loss_op(logits: Tensor, rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                      rows: list[int], compute_grad: bool) -> tuple[Tensor, Tensor]:
    if use_triton(logits):
        return maskrcnn_loss_forward(logits, rois, labels, gt_masks, rows, compute_grad)
    targets = project_masks_reference(gt_masks, rois, rows, logits.shape[-1],
                                      _compute_dtype(logits.dtype))
    return mask_loss_reference(logits, targets, labels, compute_grad)


@_maskrcnn_loss_op.register_fake
def _(logits, rois, labels, gt_masks, rows, compute_grad):
    n, _, m, _ = logits.shape
    return (logits.new_empty(()),
            logits.new_empty(n if compute_grad else 0, m, m, dtype=_grad_dtype(logits.dtype)))


@torch.library.custom_op("maskrcnn_triton::mask_loss_backward", mutates_args=())
def _mask_loss_backward_op(grad: Tensor, grad_sel: Tensor, labels: Tensor, classes: int,
                           channels_last: bool, dtype: torch.dtype) -> Tensor:
    if use_triton(grad_sel):
        return mask_loss_backward(grad, grad_sel, labels, classes, channels_last, dtype)
    return mask_loss_backward_reference(grad, grad_sel, labels, classes, channels_last, dtype)


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
    ctx.channels_last = _is_channels_last(logits)
    # no gradient for the rest; list inputs (the gt masks) need a list of Nones
    ctx.no_grads = tuple([None] * len(x) if isinstance(x, (list, tuple)) and x
                         and isinstance(x[0], Tensor) else None for x in inputs[1:])


def _mask_loss_grad(ctx, grad, _grad_sel_grad):
    grad_sel, labels = ctx.saved_tensors
    grad_logits = _mask_loss_backward_op(grad, grad_sel, labels, ctx.classes,
                                         ctx.channels_last, ctx.dtype)
    return (grad_logits,) + ctx.no_grads


_mask_loss_op.register_autograd(_mask_loss_grad, setup_context=_mask_loss_setup)
_maskrcnn_loss_op.register_autograd(_mask_loss_grad, setup_context=_mask_loss_setup)


@torch.library.custom_op("maskrcnn_triton::mask_predictor_loss", mutates_args=())
def _mask_predictor_loss_op(features: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                            labels: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(features):
        return mask_predictor_loss_forward(features, weight, bias, targets, labels,
                                           compute_grad)
    return mask_predictor_loss_reference(features, weight, bias, targets, labels, compute_grad)


@_mask_predictor_loss_op.register_fake
def _(features, weight, bias, targets, labels, compute_grad):
    n, _, m, _ = features.shape
    rows = n if compute_grad else 0
    dtype = _grad_dtype(features.dtype)
    return (features.new_empty((), dtype=dtype), features.new_empty(rows, m * m, dtype=dtype),
            features.new_empty(rows, dtype=dtype))


@torch.library.custom_op("maskrcnn_triton::mask_predictor_loss_backward", mutates_args=())
def _mask_predictor_loss_backward_op(grad: Tensor, features: Tensor, weight: Tensor,
                                     labels: Tensor, grad_sel: Tensor,
                                     dsum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(features):
        return mask_predictor_loss_backward(grad, features, weight, labels, grad_sel, dsum)
    return mask_predictor_loss_backward_reference(grad, features, weight, labels, grad_sel,
                                                  dsum)


@_mask_predictor_loss_backward_op.register_fake
def _(grad, features, weight, labels, grad_sel, dsum):
    grad_features = torch.empty_like(features, memory_format=_memory_format(features))
    return grad_features, torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _predictor_setup(ctx, inputs, output):
    features, weight, _, _, labels, _ = inputs
    ctx.save_for_backward(features, weight, labels, output[1], output[2])


def _predictor_grad(ctx, grad, _grad_sel_grad, _dsum_grad):
    features, weight, labels, grad_sel, dsum = ctx.saved_tensors
    grad_features, grad_weight, grad_bias = _mask_predictor_loss_backward_op(
        grad, features, weight, labels, grad_sel, dsum)
    return grad_features, grad_weight, grad_bias, None, None, None


_mask_predictor_loss_op.register_autograd(_predictor_grad, setup_context=_predictor_setup)


# ---------------------------------------------------------------------------------------
# Public API: validation, then the ops

_TARGET_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.bool)


def _check_logits(name: str, t) -> tuple[int, int, int]:
    check_tensor(name, t, ndim=4, what="a 4-D (N, K, M, M) tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    n, k, mh, mw = t.shape
    if mh != mw:
        raise ValueError(f"{name} must hold square M x M masks, got shape {tuple(t.shape)}")
    return n, k, mh


def _check_labels(name: str, t, n: int) -> None:
    check_tensor(name, t, ndim=1, what=f"a 1-D (N,) = ({n},) tensor")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per instance), got {t.shape[0]}")


def _check_targets(name: str, t, shape: tuple[int, ...] | None) -> None:
    check_tensor(name, t, dtypes=_TARGET_DTYPES)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


# How far past [0, 1] a float target may stray (float32 rounding of bilinear weights).
_UNIT_SLACK = 1e-6


def _check_values(indices=(), unit=(), finite=()) -> None:
    """Value checks in one host sync (skipped while tracing).

    indices: (name, integer tensor, bound) — every value in [0, bound);
    unit: (name, mask tensor) — float values in [0, 1]; finite: (name, tensor).
    """
    if is_tracing():
        return
    stats, checks = [], []       # stats: two float64 values per check
    for name, t, bound in indices:
        if t.numel():
            stats.append(torch.stack(torch.aminmax(t)).double())
            checks.append(("index", name, bound))
    for name, t in unit:
        if t.numel() and t.is_floating_point():
            stats.append(torch.stack(torch.aminmax(t)).double())
            checks.append(("unit", name, None))
    for name, t in finite:
        if t.numel():
            stats.append(torch.isfinite(t).all().double().expand(2))
            checks.append(("finite", name, None))
    if not stats:
        return
    values = torch.cat(stats).tolist()
    for i, (kind, name, bound) in enumerate(checks):
        lo, hi = values[2 * i], values[2 * i + 1]
        if kind == "index" and not (lo >= 0 and hi < bound):
            raise ValueError(f"{name} must be in [0, {bound}), got values in [{lo:g}, {hi:g}]")
        # a few ulps of slack: bilinear targets (RoI Align of 0/1 masks) can round past 1
        if kind == "unit" and not (lo >= -_UNIT_SLACK and hi <= 1 + _UNIT_SLACK):
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo!r}, {hi!r}]")
        if kind == "finite" and not lo:
            raise ValueError(f"{name} must be finite, got NaN or infinite values")


def _loss_dtype(input_dtype: torch.dtype, *target_dtypes: torch.dtype) -> torch.dtype:
    """What F.binary_cross_entropy_with_logits returns: input and float targets promoted."""
    for t in target_dtypes:
        if t.is_floating_point:
            input_dtype = torch.promote_types(input_dtype, t)
    return input_dtype


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
    _check_targets("gt_masks", gt_masks, (n, m, m))
    _check_labels("gt_labels", gt_labels, n)
    check_same_device(mask_logits=mask_logits, gt_masks=gt_masks, gt_labels=gt_labels)
    if n == 0:
        return mask_logits.sum() * 0
    _check_values(indices=[("gt_labels", gt_labels, k)], unit=[("gt_masks", gt_masks)])
    loss, _ = _mask_loss_op(mask_logits, gt_masks, gt_labels.long(),
                            _needs_grad(mask_logits))
    return loss.to(_loss_dtype(mask_logits.dtype, gt_masks.dtype))


def _check_list(name: str, value, length: int | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per image), "
                        f"got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per image ({length}), got {len(value)}")
    return list(value)


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
    proposals = _check_list("proposals", proposals, None)
    images = len(proposals)
    gt_masks = _check_list("gt_masks", gt_masks, images)
    gt_labels = _check_list("gt_labels", gt_labels, images)
    idxs = _check_list("mask_matched_idxs", mask_matched_idxs, images)
    rows = []
    for i in range(images):
        check_tensor(f"proposals[{i}]", proposals[i], ndim=2)
        if proposals[i].shape[1] != 4 or not proposals[i].is_floating_point():
            raise ValueError(f"proposals[{i}] must be a float Tensor[L, 4], got "
                             f"{proposals[i].dtype} of shape {tuple(proposals[i].shape)}")
        check_tensor(f"gt_masks[{i}]", gt_masks[i], ndim=3, dtypes=_TARGET_DTYPES,
                     what="a 3-D (G, H, W) tensor")
        _check_labels(f"gt_labels[{i}]", gt_labels[i], gt_masks[i].shape[0])
        _check_labels(f"mask_matched_idxs[{i}]", idxs[i], proposals[i].shape[0])
        check_same_device(mask_logits=mask_logits, **{
            f"proposals[{i}]": proposals[i], f"gt_masks[{i}]": gt_masks[i],
            f"gt_labels[{i}]": gt_labels[i], f"mask_matched_idxs[{i}]": idxs[i]})
        rows.append(int(proposals[i].shape[0]))
    if sum(rows) != n:
        raise ValueError(f"mask_logits has {n} rows but the proposals hold {sum(rows)} boxes")
    if n == 0:
        return mask_logits.sum() * 0
    _check_values(
        indices=[(f"gt_labels[{i}]", gt_labels[i], k) for i in range(images)]
        + [(f"mask_matched_idxs[{i}]", idxs[i], gt_masks[i].shape[0]) for i in range(images)],
        unit=[(f"gt_masks[{i}]", gt_masks[i]) for i in range(images)],
        finite=[(f"proposals[{i}]", proposals[i]) for i in range(images)])
    idx = [i.long() for i in idxs]
    labels = torch.cat([lab.long()[i] for lab, i in zip(gt_labels, idx)])
    rois = torch.cat([torch.cat(idx).to(torch.float32)[:, None],
                      torch.cat([p.to(torch.float32) for p in proposals])], 1)
    loss, _ = _maskrcnn_loss_op(mask_logits, rois, labels, gt_masks, rows,
                                _needs_grad(mask_logits))
    # torchvision's targets take the proposals' dtype
    return loss.to(_loss_dtype(mask_logits.dtype, *(p.dtype for p in proposals)))


def fused_mask_predictor_loss(features: Tensor, weight: Tensor, bias: Tensor,
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
    check_tensor("features", features, ndim=4, what="a 4-D (N, C, M, M) tensor")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be float32, float16, bfloat16 or float64, "
                        f"got {features.dtype}")
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
    check_tensor("bias", bias, ndim=1, what=f"a 1-D (K,) = ({k},) tensor")
    if bias.shape[0] != k:
        raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    _check_targets("gt_masks", gt_masks, (n, m, m))
    _check_labels("gt_labels", gt_labels, n)
    check_same_device(features=features, weight=weight, bias=bias, gt_masks=gt_masks,
                      gt_labels=gt_labels)
    if n == 0:
        return (features.sum() + weight.sum() + bias.sum()).to(features.dtype) * 0
    _check_values(indices=[("gt_labels", gt_labels, k)], unit=[("gt_masks", gt_masks)])
    weight2d = weight.to(features.dtype).reshape(k, c)
    bias = bias.to(features.dtype)
    loss, _, _ = _mask_predictor_loss_op(features, weight2d, bias, gt_masks, gt_labels.long(),
                                         _needs_grad(features, weight2d, bias))
    return loss.to(_loss_dtype(features.dtype, gt_masks.dtype))


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launchers can pick (for the GPU compile check and
    the GPU kit's memory check, which runs these on CUDA).

    Each dtype and layout of the logits/features, each kind of target (the logits' own
    float dtype, float32, bool, uint8); the compile check expands each over its tuning table.
    """
    n, k, c, m = 2, 3, 5, 4
    labels = torch.tensor([0, 2], device=device)
    matched = [torch.tensor([1, 0], device=device)]
    boxes = [torch.tensor([[0.5, 1.0, 8.0, 7.5], [2.0, 0.0, 5.0, 9.0]], device=device)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            logits = torch.randn(n, k, m, m, dtype=dtype, device=device).contiguous(
                memory_format=fmt)
            features = torch.randn(n, c, m, m, dtype=dtype, device=device).contiguous(
                memory_format=fmt)
            weight = torch.randn(k, c, 1, 1, device=device)
            bias = torch.randn(k, device=device)
            for v in (logits, features, weight, bias):
                v.requires_grad_()
            for target_dtype in (dtype, torch.float32, torch.bool, torch.uint8):
                targets = (torch.rand(n, m, m, device=device) > 0.5).to(target_dtype)
                gt = (torch.rand(2, 9, 11, device=device) > 0.5).to(target_dtype)
                mask_loss(logits, targets, labels).backward()
                maskrcnn_loss(logits, boxes, [gt], [labels], matched).backward()
                fused_mask_predictor_loss(features, weight, bias, targets, labels).backward()
