"""The CPU path: where a faster CPU kernel computes our op's result, it runs instead of the
reference (decided per op and dtype from the CPU benchmark; the references stay the oracle).

* torchvision's C++ kernels, which compute in float32/float64 (float16/bfloat16 inputs are
  upcast to float32 and the result rounded once, as our kernels and references do): RoI
  Align forward and backward (``pick_path(cpu=...)`` in its custom ops: their loops beat our
  sparse matrix product at every benchmarked shape); MultiScaleRoIAlign as torchvision
  computes it, its roi_align per level with its own autograd (no flat gradient buffer: that
  buffer serves the GPU's single launch and costs a copy here); NMS below ``NMS_CROSSOVER``
  boxes in the longest class, where its O(N^2) loop is still cheap (above, our blocked path
  wins).
* PyTorch's BCE with its own autograd for ``mask_loss`` / ``maskrcnn_loss`` (targets:
  torchvision's roi_align of the gt masks): no gradient-in-forward, which saves the GPU a
  pass but wastes one here when only the forward runs.

The public functions call the autograd forms instead of the custom op on the CPU path. The
fused predictor loss and the one-pass paste have no faster CPU kernel with the same result:
they stay on the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from ._sampling import Pyramid, image_rows
from ._utils import compute_dtype

# Boxes in the longest class at which our path overtakes torchvision's nms on the CPU
# (2-core x86: 4k boxes in one class ours 1.0x, 8k 1.3x; 5k in 80 classes theirs 2-3x).
NMS_CROSSOVER = 4096


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    cdt = compute_dtype(input.dtype)
    out = torch.ops.torchvision.roi_align(input.to(cdt), rois.to(cdt), spatial_scale,
                                          pooled_h, pooled_w, sampling_ratio, aligned)
    return out.to(input.dtype)


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    n, c, h, w = input_shape
    cdt = compute_dtype(grad.dtype)
    out = torch.ops.torchvision._roi_align_backward(
        grad.to(cdt).contiguous(), rois.to(cdt), spatial_scale, pooled_h, pooled_w, n, c, h,
        w, sampling_ratio, aligned).to(grad.dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


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


# torchvision's own batched_nms, held before patch_torchvision() could replace it by ours
_BATCHED_NMS = torchvision.ops.boxes.batched_nms


def nms_wins(boxes: Tensor, scores: Tensor, longest: int) -> bool:
    """torchvision's nms is the faster CPU path for this call (``longest``: the longest
    class, or an upper bound; -1 when unknown) and computes our result: IoU in float32
    (float64 for float64 boxes), the scores held exactly in that dtype."""
    exact = compute_dtype(boxes.dtype) == torch.float64 or scores.dtype != torch.float64
    return 0 <= longest < NMS_CROSSOVER and exact


def nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    """torchvision's nms (``idxs`` None) or batched_nms, on the compute dtype."""
    cdt = compute_dtype(boxes.dtype)
    if idxs is None:
        return torch.ops.torchvision.nms(boxes.to(cdt), scores.to(cdt), iou_threshold)
    return _BATCHED_NMS(boxes.to(cdt), scores.to(cdt), idxs, iou_threshold)


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
    targets = [torch.ops.torchvision.roi_align(masks[:, None].to(cdt), rois[i].to(cdt), 1.0,
                                               size, size, -1, False)[:, 0]
               for i, masks in image_rows(gt_masks, rows)]
    return mask_loss(logits, torch.cat(targets), labels)
