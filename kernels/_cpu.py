"""The CPU path: where a faster CPU kernel computes our op's result, it runs instead of the
reference (decided per op and dtype from the CPU benchmark; the references stay the oracle).

* torchvision's C++ kernels (they compute in float32/float64: float16/bfloat16 inputs are
  upcast to float32 and the result rounded once, as our kernels and references do): RoI
  Align at one level and per level of a pyramid, forward and backward (their loops beat our
  sparse matrix product at every benchmarked shape); NMS below ``NMS_CROSSOVER`` boxes in
  the longest class, where its O(N^2) loop is still cheap (above, our blocked path wins).
  torchvision's ``maskrcnn_loss`` targets are its ``roi_align`` of the gt masks: that too.
* PyTorch's fused CPU ops for the mask losses' BCE, every dtype (in float32): the same
  formula as the reference, one kernel instead of six.

Two forms: the launcher stand-ins below (``pick_path(cpu=...)`` in the custom ops, which
return what the Triton launchers return), and the autograd forms at the end, which the
public functions call on the CPU path instead of the custom op where the op's structure
costs time the CPU does not need to spend: MultiScaleRoIAlign's flat gradient buffer (one
kernel launch on a GPU, an extra copy here) and the mask losses' gradient-in-forward (one
pass on a GPU, a wasted one when only the forward runs).

Each function takes the arguments of the launcher it stands in for, as the references do,
and says which dtypes it serves (``dtypes``) and what the report calls it (``path``).
The fused predictor loss and the one-pass paste have no faster CPU kernel with the same
result: they stay on the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from . import reference
from ._sampling import Pyramid
from ._utils import FLOAT_DTYPES, compute_dtype


def _serves(dtypes, path: str):
    def mark(fn):
        fn.dtypes, fn.path = dtypes, path
        return fn
    return mark


# torchvision's C++ CPU kernels compute in float32/float64; half types are upcast to
# float32 first and the result rounded once, which is what our kernels and references do.
TORCHVISION = _serves(FLOAT_DTYPES, "torchvision")
TORCH = _serves(FLOAT_DTYPES, "torch")

# Boxes in the longest class at which our path overtakes torchvision's nms on the CPU
# (2-core x86: 4k boxes in one class ours 1.0x, 8k 1.3x; 5k in 80 classes theirs 2-3x).
NMS_CROSSOVER = 4096


@TORCHVISION
def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    cdt = compute_dtype(input.dtype)
    out = torch.ops.torchvision.roi_align(input.to(cdt), rois.to(cdt), spatial_scale,
                                          pooled_h, pooled_w, sampling_ratio, aligned)
    return out.to(input.dtype)


@TORCHVISION
def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    n, c, h, w = input_shape
    cdt = compute_dtype(grad.dtype)
    out = torch.ops.torchvision._roi_align_backward(
        grad.to(cdt).contiguous(), rois.to(cdt), spatial_scale, pooled_h, pooled_w, n, c, h,
        w, sampling_ratio, aligned).to(grad.dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@TORCHVISION
def multiscale_roi_align_forward(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                                 pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    return reference.multiscale_roi_align_forward(features, rois, pyramid, pooled_h, pooled_w,
                                                  sampling_ratio, pool=roi_align_forward)


@TORCHVISION
def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, pyramid: Pyramid,
                                  pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    return reference.multiscale_roi_align_backward(grad, rois, pyramid, pooled_h, pooled_w,
                                                   sampling_ratio, pool=roi_align_backward)


# torchvision's own batched_nms, held before patch_torchvision() could replace it by ours
_BATCHED_NMS = torchvision.ops.boxes.batched_nms


def nms_wins(boxes: Tensor, scores: Tensor, longest: int) -> bool:
    """torchvision's nms is the faster CPU path for this call (``longest``: the longest
    class, or an upper bound; -1 when unknown) and computes our result: IoU in float32
    (float64 for float64 boxes), the scores held exactly in that dtype."""
    exact = compute_dtype(boxes.dtype) == torch.float64 or scores.dtype != torch.float64
    return 0 <= longest < NMS_CROSSOVER and exact


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    cdt = compute_dtype(boxes.dtype)
    return torch.ops.torchvision.nms(boxes.to(cdt), scores.to(cdt), iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    cdt = compute_dtype(boxes.dtype)
    return _BATCHED_NMS(boxes.to(cdt), scores.to(cdt), idxs, iou_threshold)


@TORCH
def mask_loss_forward(logits: Tensor, targets: Tensor, labels: Tensor,
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    n, _, m, _ = logits.shape
    cdt = compute_dtype(logits.dtype)
    x = logits[torch.arange(n, device=logits.device), labels].to(cdt)
    t = targets.to(cdt)
    loss = F.binary_cross_entropy_with_logits(x, t)
    grad = (torch.sigmoid(x) - t) / x.numel() if compute_grad else x.new_empty(0, m, m)
    return loss, grad


@TORCH
def maskrcnn_loss_forward(logits: Tensor, rois: Tensor, labels: Tensor,
                          gt_masks: list[Tensor], rows: list[int],
                          compute_grad: bool) -> tuple[Tensor, Tensor]:
    """torchvision's targets (its C++ roi_align of each image's gt masks, float32: what
    ``project_masks_on_boxes`` computes), then :func:`mask_loss_forward`."""
    size, cdt = logits.shape[-1], compute_dtype(logits.dtype)
    targets, start = [], 0
    for masks, r in zip(gt_masks, rows):
        if r:
            boxes = rois[start:start + r].to(cdt)
            targets.append(torch.ops.torchvision.roi_align(
                masks[:, None].to(cdt), boxes, 1.0, size, size, -1, False)[:, 0])
        start += r
    targets = torch.cat(targets) if targets else rois.new_zeros(0, size, size, dtype=cdt)
    return mask_loss_forward(logits, targets, labels, compute_grad)


# ---------------------------------------------------------------------------------------
# Autograd forms: torchvision's and PyTorch's own ops, their own backward.

def multiscale_roi_align(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                         pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """torchvision's MultiScaleRoIAlign computation: levels, then its roi_align per level
    (its autograd), half types upcast to float32 and the result rounded once."""
    dtype = features[0].dtype
    cdt = compute_dtype(dtype)
    levels = pyramid.levels(rois, cdt)
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], pooled_h, pooled_w,
                                dtype=cdt)
    for lvl, (feature, scale) in enumerate(zip(features, pyramid.scales)):
        idx = torch.where(levels == lvl)[0]
        out = out.index_put((idx,), torch.ops.torchvision.roi_align(
            feature.to(cdt), rois[idx].to(cdt), scale, pooled_h, pooled_w, sampling_ratio,
            False))
    return out.to(dtype)


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """``F.binary_cross_entropy_with_logits(logits[arange(N), labels], targets)`` in
    float32 (float64 for float64), with its own backward (to the logits only, as the op)."""
    cdt = compute_dtype(logits.dtype)
    picked = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(picked.to(cdt), targets.detach().to(cdt))


def maskrcnn_loss(logits: Tensor, rois: Tensor, labels: Tensor, gt_masks: list[Tensor],
                  rows: list[int]) -> Tensor:
    """torchvision's targets (its roi_align of the gt masks), then :func:`mask_loss`."""
    size, cdt = logits.shape[-1], compute_dtype(logits.dtype)
    targets, start = [], 0
    for masks, r in zip(gt_masks, rows):
        if r:
            targets.append(torch.ops.torchvision.roi_align(
                masks[:, None].to(cdt), rois[start:start + r].to(cdt), 1.0, size, size, -1,
                False)[:, 0])
        start += r
    return mask_loss(logits, torch.cat(targets), labels)
