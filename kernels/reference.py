"""Pure-PyTorch references of every op, in one place: the test oracle, and the CPU path where
no faster kernel computes the same result (see :mod:`kernels._cpu`).

Naming rule: each reference is named after the launcher it stands in for and takes that
launcher's arguments (less launch hints, such as NMS's longest segment), so a custom op's
body reads ``impl = roi_align_forward if use_triton(x) else reference.roi_align_forward``.
GPU code paths never call into this module; what both need (RoI sampling geometry, box
arithmetic) lives in :mod:`kernels._sampling` and :mod:`kernels._boxes`.

They are written differently from the kernels on purpose, so that one checks the other:
explicit formulas, vectorized, float32 accumulation (float64 for float64 inputs), no
autograd. RoI Align's bilinear sampling is separable: a sample's weight is (weight along y)
x (weight along x), and torchvision's out-of-range rule (y < -1 or y > H or x < -1 or
x > W gives 0) is per axis too. So the whole op is one sparse matrix S (rows: output
bins, columns: input pixels, values: weight_y * weight_x / count) applied to the input
viewed as (N*H*W, C): ``out = S @ X``, and its gradient is ``S^T @ dout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._boxes import (Segments, expand_scale, expanded_int_boxes, image_rows, iou_over, iou_rows,
                     sampled_labels, sampled_rois, threshold_in)
from ._sampling import Pyramid, axis_samples, sampling_entries
from ._utils import compute_dtype, memory_format


# ---------------------------------------------------------------------------------------
# RoI Align, single level and pyramid

def _sampling_matrix(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                     sampling_ratio: int, aligned: bool, shape, dtype: torch.dtype) -> Tensor:
    """Sparse (K*PH*PW, N*H*W) matrix S with out = S @ input-as-(N*H*W, C)."""
    n, c, h, w = shape
    rows, cols, vals = sampling_entries(rois.cpu(), spatial_scale, pooled_h, pooled_w,
                                        sampling_ratio, aligned, shape, dtype)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals,
                                   (rois.shape[0] * pooled_h * pooled_w, n * h * w),
                                   check_invariants=False)


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoI Align forward; input (N, C, H, W), rois (K, 5) -> (K, C, PH, PW) in input.dtype."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    mat = _sampling_matrix(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                           input.shape, dtype).to(input.device)
    flat = input.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = torch.sparse.mm(mat, flat)                     # (K*PH*PW, C)
    return out.reshape(k, pooled_h, pooled_w, c).permute(0, 3, 1, 2).contiguous().to(
        input.dtype)


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    """Gradient of :func:`roi_align_forward` w.r.t. its input: (N, C, H, W) in grad.dtype,
    channels_last when ``channels_last``."""
    n, c, h, w = input_shape
    dtype = compute_dtype(grad.dtype)
    mat = _sampling_matrix(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                           input_shape, dtype).to(grad.device)
    flat = grad.to(dtype).permute(0, 2, 3, 1).reshape(-1, c)   # (K*PH*PW, C)
    grad_flat = torch.sparse.mm(mat.t(), flat)                  # (N*H*W, C)
    out = grad_flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(grad.dtype)
    return out.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)


def multiscale_roi_align_forward(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                                 pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """Levels computed vectorized, then :func:`roi_align_forward` per level."""
    n, c = features[0].shape[:2]
    levels = pyramid.levels(rois, compute_dtype(features[0].dtype))
    out = torch.zeros(rois.shape[0], c, pooled_h, pooled_w, dtype=features[0].dtype,
                      device=features[0].device)
    for lvl, (feature, scale) in enumerate(zip(features, pyramid.scales)):
        idx = (levels == lvl).nonzero().flatten()
        if idx.numel():
            out[idx] = roi_align_forward(feature, rois[idx], scale, pooled_h, pooled_w,
                                         sampling_ratio, False)
    return out


def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, pyramid: Pyramid,
                                  pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """Every level's input gradient (:func:`roi_align_backward` per level), flattened as
    ``Pyramid.flatten`` does."""
    levels = pyramid.levels(rois, compute_dtype(grad.dtype))
    grads = []
    for lvl, (scale, shape) in enumerate(zip(pyramid.scales, pyramid.shapes)):
        idx = (levels == lvl).nonzero().flatten()
        grads.append(roi_align_backward(grad[idx], rois[idx], scale, pooled_h, pooled_w,
                                        sampling_ratio, False, shape, False))
    return pyramid.flatten(grads)


# ---------------------------------------------------------------------------------------
# Mask losses

def _bce_reference(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element loss and d loss / d x, in x's dtype."""
    loss = x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    return loss, torch.sigmoid(x) - t


def _selected_planes(logits: Tensor, labels: Tensor,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each row's own class plane of (N, K, M, M) ``logits`` in ``dtype``, and whether its
    label is in [0, K) (a row whose label is not is ignored: no loss, no gradient)."""
    labels, ok = _class_rows(labels, logits.shape[1])
    return logits[torch.arange(logits.shape[0], device=logits.device), labels].to(dtype), ok


def mask_loss_forward(logits: Tensor, targets: Tensor, labels: Tensor,
                        compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d selected logits (N, M, M)), both in the compute dtype."""
    n, _, m, _ = logits.shape
    cdt = compute_dtype(logits.dtype)
    x, ok = _selected_planes(logits, labels, cdt)
    loss, dx = _bce_reference(x, targets.to(cdt))
    ok = ok[:, None, None]
    loss = torch.where(ok, loss, torch.zeros_like(loss))
    grad = (torch.where(ok, dx, torch.zeros_like(dx)) / x.numel() if compute_grad
            else x.new_empty(0, m, m))
    return loss.mean(), grad


def mask_loss_backward(grad: Tensor, grad_sel: Tensor, labels: Tensor,
                                 classes: int, channels_last: bool,
                                 dtype: torch.dtype) -> Tensor:
    """The dense (N, K, M, M) gradient: each row's class plane the saved gradient times
    ``grad`` (an ignored row's label was given a zero gradient: it writes zeros)."""
    n, m, _ = grad_sel.shape
    out = torch.zeros(n, classes, m, m, dtype=dtype, device=grad.device)
    labels = _class_rows(labels, classes)[0]
    out[torch.arange(n, device=labels.device), labels] = (grad_sel * grad).to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


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
        # torchvision's roi_align at spatial scale 1, aligned=False (box length >= 1)
        iy, wy = axis_samples(r[idx, 2], length_h[idx] / size, grid_h[idx], size, h, gh, dtype)
        ix, wx = axis_samples(r[idx, 1], length_w[idx] / size, grid_w[idx], size, w, gw, dtype)
        b = r[idx, 0].long()
        vals = masks[b[:, None, None, None, None, None, None],
                     iy[:, :, :, :, None, None, None], ix[:, None, None, None]].to(dtype)
        out[idx] = torch.einsum("kpab,kpabqcd,kqcd->kpq", wy, vals, wx) / count[idx, None, None]
        start += len(idx)
    return out


def _image_targets(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int,
                   dtype: torch.dtype) -> Tensor:
    """torchvision's ``project_masks_on_boxes`` targets of every image, (N, M, M)
    (materialized here, sampled inside the kernels on the Triton path)."""
    targets = [_project_masks(masks, rois[i], size, dtype) if masks.shape[0]
               else rois.new_zeros(i.stop - i.start, size, size, dtype=dtype)
               for i, masks in image_rows(gt_masks, rows)]
    return torch.cat(targets) if targets else rois.new_zeros(0, size, size, dtype=dtype)


def _per_image_targets(proposals: list[Tensor], gt_masks: list[Tensor],
                       gt_labels: list[Tensor], matched: list[Tensor], size: int,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(targets (N, M, M), labels (N,)) of torchvision's per-image loss arguments; an
    ignored row (label -1: ``sampled_labels``) gets a zero target."""
    labels = sampled_labels(proposals, gt_labels, matched)
    rois = sampled_rois(proposals, matched)
    rois = torch.where((labels >= 0)[:, None], rois, torch.zeros_like(rois))
    rows = [p.shape[0] for p in proposals]
    return _image_targets(rois, gt_masks, rows, size, dtype), labels


def maskrcnn_loss_forward(logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                          gt_labels: list[Tensor], matched: list[Tensor],
                          compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mask_loss_forward` on the projected targets of every image, and each row's
    label (empty unless ``compute_grad``, as the kernel's)."""
    size, cdt = logits.shape[-1], compute_dtype(logits.dtype)
    targets, labels = _per_image_targets(proposals, gt_masks, gt_labels, matched, size, cdt)
    loss, grad = mask_loss_forward(logits, targets, labels, compute_grad)
    return loss, grad, labels if compute_grad else labels[:0]


def mask_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                  targets: Tensor, labels: Tensor, compute_grad: bool):
    """(loss, d loss / d logit (N, M*M), each row's label in [0, K): an ignored row's is 0,
    with a zero gradient) of the fused predictor; no rows unless ``compute_grad``."""
    n, c, m, _ = features.shape
    cdt = compute_dtype(features.dtype)
    labels, ok = _class_rows(labels, weight.shape[0])
    weight = weight.reshape(weight.shape[0], -1)      # (K, C, 1, 1) or (K, C)
    f = features.to(cdt).reshape(n, c, m * m)
    x = torch.einsum("ncp,nc->np", f, weight[labels].to(cdt)) + bias[labels].to(cdt)[:, None]
    loss, grad = _selected_logits_loss(x, targets.to(cdt).reshape(n, m * m), compute_grad, ok)
    return loss, grad, labels if compute_grad else labels[:0]


def _class_rows(labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Labels clamped into [0, K) (safe to index with), and which were in range: a row
    whose label is not is ignored (no loss, no gradient), as in the kernels."""
    labels = labels.long()
    return labels.clamp(0, max(classes - 1, 0)), (labels >= 0) & (labels < classes)


def _selected_logits_loss(x: Tensor, targets: Tensor, compute_grad: bool, ok: Tensor):
    """The fused predictor's loss from its selected logits ``x`` (N, P) and ``targets``
    (N, P), rows ``ok`` only: (mean BCE, d loss / d x)."""
    loss, dx = _bce_reference(x, targets)
    loss = torch.where(ok[:, None], loss, torch.zeros_like(loss))
    if not compute_grad:
        return loss.mean(), x.new_empty(0, x.shape[1])
    return loss.mean(), torch.where(ok[:, None], dx, torch.zeros_like(dx)) / x.numel()


def maskrcnn_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                    proposals: list[Tensor], gt_masks: list[Tensor],
                                    gt_labels: list[Tensor], matched: list[Tensor],
                                    compute_grad: bool):
    """:func:`mask_predictor_loss_forward` on the projected targets of every image."""
    size, cdt = features.shape[-1], compute_dtype(features.dtype)
    targets, labels = _per_image_targets(proposals, gt_masks, gt_labels, matched, size, cdt)
    return mask_predictor_loss_forward(features, weight, bias, targets, labels, compute_grad)


def mask_predictor_loss_backward(grad, features, weight, labels, grad_sel):
    n, c, m, _ = features.shape
    cdt = grad_sel.dtype
    g = grad.to(cdt)
    labels = _class_rows(labels, weight.shape[0])[0]    # an ignored row's gradient is zero
    w = weight.reshape(weight.shape[0], -1)[labels].to(cdt) * g        # (N, C)
    grad_features = (w[:, :, None] * grad_sel[:, None, :]).reshape(n, c, m, m)
    rows = torch.einsum("ncp,np->nc", features.to(cdt).reshape(n, c, m * m), grad_sel) * g
    return (grad_features.to(features.dtype).contiguous(memory_format=memory_format(features)),
            *_predictor_param_grads(weight, labels, rows, grad_sel.sum(1) * g))


def _predictor_param_grads(weight: Tensor, labels: Tensor, rows: Tensor,
                           bias_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The predictor's weight and bias gradients from per-instance rows (N, C) and (N,):
    instances of one class add into its row (index_add in the rows' dtype), then the
    parameters' dtype."""
    grad_weight = torch.zeros(weight.shape[0], rows.shape[1], dtype=rows.dtype,
                              device=weight.device).index_add_(0, labels, rows)
    grad_bias = torch.zeros(weight.shape[0], dtype=rows.dtype,
                            device=weight.device).index_add_(0, labels, bias_rows)
    return grad_weight.to(weight.dtype).view(weight.shape), grad_bias.to(weight.dtype)


# ---------------------------------------------------------------------------------------
# Host launchers (inputs already validated by the public functions)


# ---------------------------------------------------------------------------------------
# NMS

def nms_forward(p: Segments, iou_threshold: float) -> Tensor:
    """PyTorch path, the same algorithm: 64-box blocks, fixed point, forward suppression.

    Boxes of different segments never meet: a block's suppression only reaches the
    columns up to the end of its rows' segments, and the segment test masks the rest.
    Columns already removed are skipped (the kernels skip whole removed words).
    """
    n = p.n
    boxes, iou_threshold = iou_rows(p.boxes, iou_threshold)
    area = boxes[4]
    seg_lo, seg_hi = p.seg_lo, p.seg_hi
    removed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = torch.zeros(n, dtype=torch.int8, device=boxes.device)
    upper = torch.ones(64, 64, dtype=torch.bool, device=boxes.device).triu_(1)
    for start in range(0, n, 64):
        stop = min(start + 64, n)
        cand = ~removed[start:stop]
        if not bool(cand.any()):
            continue
        m = stop - start
        lo = seg_lo[start:stop]
        over = iou_over(boxes[:, start:stop], area[start:stop],
                        boxes[:, start:stop], area[start:stop], iou_threshold)
        diag = over & (lo[:, None] == lo[None, :]) & upper[:m, :m]
        kept = cand
        while True:  # fixed point: settles in at most 64 rounds
            new = cand & ~(diag & kept[:, None]).amax(0)
            if torch.equal(new, kept):
                break
            kept = new
        keep[start:stop] = kept.to(torch.int8)
        end = int(seg_hi[stop - 1])  # the last row's segment ends last
        if end > stop and bool(kept.any()):
            alive = stop + torch.nonzero(~removed[stop:end]).flatten()
            rows = start + torch.nonzero(kept).flatten()
            # Kept rows from an earlier segment than the block's last row must not reach
            # the last row's segment.
            mixed = p.segmented and bool(seg_lo[rows[0]] != seg_lo[stop - 1])
            row_boxes = boxes.index_select(1, rows)  # index_select: [:, idx] is 100x slower
            # Chunks under torch's parallel grain (32768 elements): these ops are too small
            # to gain from threads, and on a busy CPU waking them costs more than the work.
            step = max(64, 32767 // len(rows))
            for c in range(0, len(alive), step):
                cols = alive[c:c + step]
                hit = iou_over(row_boxes, area[rows], boxes.index_select(1, cols),
                               area[cols], iou_threshold)
                if mixed:
                    hit &= seg_lo[rows][:, None] == seg_lo[cols][None, :]
                removed[cols] |= hit.amax(0)  # amax: any(0) is 20x slower on CPU
    return keep


# ---------------------------------------------------------------------------------------
# Mask pasting

def _axis_matrix(lo: Tensor, hi: Tensor, size: int, mp: int, dtype: torch.dtype) -> Tensor:
    """(N, size, mp) interpolation matrices along one axis: row p holds the two weights
    F.interpolate(align_corners=False) gives output pixel p of the box lo..hi (resized to
    max(hi - lo + 1, 1) pixels) over the mp padded-mask pixels; rows outside the box are 0."""
    pos = torch.arange(size, device=lo.device)
    length = (hi - lo + 1).clamp(min=1).to(dtype)
    scale = torch.full_like(length, float(mp)) / length
    d = pos[None, :] - lo[:, None]
    inside = ((d >= 0) & (pos[None, :] <= hi[:, None])).to(dtype)
    src = (scale[:, None] * (d.to(dtype) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=mp - 1).long()
    i1 = (i0 + 1).clamp(max=mp - 1)
    l1 = src - i0.to(dtype)
    mat = torch.zeros(lo.shape[0], size, mp, dtype=dtype, device=lo.device)
    mat.scatter_add_(2, i0[..., None], ((1 - l1) * inside)[..., None])
    mat.scatter_add_(2, i1[..., None], (l1 * inside)[..., None])
    return mat


def paste_masks_in_image_forward(masks: Tensor, boxes: Tensor, img_h: int, img_w: int,
                                 padding: int, threshold: float | None,
                                 out_dtype: torch.dtype) -> Tensor:
    """Vectorized PyTorch paste: the CPU path. Bilinear resizing is separable, so each mask's
    image is ``Ay @ padded_mask @ Ax^T`` with sparse-in-effect interpolation matrices Ay
    (H x MPH) and Ax (W x MPW); masks are processed in chunks so the float image of all N
    masks never exists when thresholding."""
    n, _, mh, mw = masks.shape
    out = torch.empty(n, 1, img_h, img_w, dtype=out_dtype, device=masks.device)
    if n == 0:
        return out
    compute = torch.float64 if masks.dtype == torch.float64 else torch.float32
    ib = expanded_int_boxes(boxes, expand_scale(mw, padding))
    thr = None if threshold is None else threshold_in(masks.dtype, threshold)
    chunk = max(1, (1 << 24) // (img_h * img_w))  # about 64 MiB of float32 per step
    for s in range(0, n, chunk):
        b = ib[s:s + chunk]
        padded = F.pad(masks[s:s + chunk, 0].to(compute), (padding,) * 4)
        ay = _axis_matrix(b[:, 1], b[:, 3], img_h, mh + 2 * padding, compute)
        ax = _axis_matrix(b[:, 0], b[:, 2], img_w, mw + 2 * padding, compute)
        rows = torch.bmm(ay, padded)
        if thr is None and out_dtype == compute:
            torch.bmm(rows, ax.transpose(1, 2), out=out[s:s + chunk, 0])
        elif thr is None:
            out[s:s + chunk, 0] = torch.bmm(rows, ax.transpose(1, 2))
        else:
            img = torch.bmm(rows, ax.transpose(1, 2))
            out[s:s + chunk, 0] = img.to(masks.dtype).to(compute) > thr
    return out
