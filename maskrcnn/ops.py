"""Every op the model takes from outside, chosen in one place.

``KERNELS`` is what the model uses by default: every hot op from ``kernels``.
``TORCHVISION`` is torchvision's own ops, the reference; ``resolve_ops("torchvision")``
swaps the whole model over with one argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor
from torchvision.models.detection import roi_heads as _tv_roi_heads

import kernels


def maskrcnn_predictor_loss_padded(features: Tensor, weight: Tensor, bias: Tensor,
                                   proposals: list[Tensor], gt_masks: list[Tensor],
                                   gt_labels: list[Tensor],
                                   mask_matched_idxs: list[Tensor]) -> Tensor:
    """``kernels.maskrcnn_predictor_loss`` over the rows whose matched index is not -1 (the
    model's padding rows): the kernels leave such a row out of the sum when its values go
    unchecked, and the mean is rescaled from all N rows to the valid ones, on the device
    (no host sync). The model checks the targets' values itself (``model._check_targets``)."""
    valid = (torch.cat(mask_matched_idxs) >= 0).sum()
    args = (features, weight, bias, proposals, gt_masks, gt_labels, mask_matched_idxs)
    if torch.compiler.is_compiling():      # no value is read while traced
        loss = kernels.maskrcnn_predictor_loss(*args)
    else:
        with kernels.skip_data_checks():
            loss = kernels.maskrcnn_predictor_loss(*args)
    return loss * (features.shape[0] / valid.clamp(min=1))


def maskrcnn_predictor_loss_torchvision(features: Tensor, weight: Tensor, bias: Tensor,
                                        proposals: list[Tensor], gt_masks: list[Tensor],
                                        gt_labels: list[Tensor],
                                        mask_matched_idxs: list[Tensor]) -> Tensor:
    """torchvision's computation: the full (N, K, M, M) 1x1-conv logits, then its
    ``maskrcnn_loss`` (float copies of the gt masks, roi_align targets, gather, BCE) over
    the rows whose matched index is not -1 (selected with boolean masks: host syncs, as
    torchvision's own model makes)."""
    keep = [m >= 0 for m in mask_matched_idxs]
    logits = F.conv2d(features, weight, bias)[torch.cat(keep)]
    return _tv_roi_heads.maskrcnn_loss(logits, [p[k] for p, k in zip(proposals, keep)],
                                       gt_masks, gt_labels,
                                       [m[k] for m, k in zip(mask_matched_idxs, keep)])


def paste_masks_torchvision(masks: Tensor, boxes: Tensor, img_shape, padding: int = 1, *,
                            threshold: float | None = None) -> Tensor:
    """torchvision's paste, with kernels.paste_masks_in_image's ``threshold`` option
    (``> threshold`` as bool) applied afterwards."""
    out = _tv_roi_heads.paste_masks_in_image(masks, boxes, img_shape, padding)
    return out if threshold is None else out > threshold


def batched_nms_mask_torchvision(boxes: Tensor, scores: Tensor, idxs: Tensor,
                                 iou_threshold: float) -> Tensor:
    """torchvision's batched_nms as a keep mask in input order (kernels.batched_nms_mask's
    form); it reads the kept count, so it syncs like torchvision's."""
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep[torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)] = True
    return keep


@dataclass(frozen=True)
class Ops:
    """The op set a model is built with (see ``resolve_ops``)."""
    name: str
    # a class with torchvision.ops.MultiScaleRoIAlign's constructor and forward
    multiscale_roi_align: Callable[..., torch.nn.Module]
    batched_nms: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    # the same selection as a BoolTensor[N] keep mask in input order (fixed sizes)
    batched_nms_mask: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    # (masks (N,1,M,M), boxes, (H, W), padding=1, *, threshold=None) -> (N,1,H,W) float or bool
    paste_masks_in_image: Callable[..., Tensor]
    # (features (N,C,M,M), weight (K,C,1,1), bias (K,), proposals, gt_masks, gt_labels,
    # mask_matched_idxs: per-image lists as torchvision's maskrcnn_loss) -> loss; a row
    # whose matched index is -1 is padding: no loss, and not counted in the mean
    maskrcnn_predictor_loss: Callable[..., Tensor]


KERNELS = Ops(
    name="kernels",
    multiscale_roi_align=kernels.MultiScaleRoIAlign,
    batched_nms=kernels.batched_nms,
    batched_nms_mask=kernels.batched_nms_mask,
    paste_masks_in_image=kernels.paste_masks_in_image,
    maskrcnn_predictor_loss=maskrcnn_predictor_loss_padded,
)

TORCHVISION = Ops(
    name="torchvision",
    multiscale_roi_align=torchvision.ops.MultiScaleRoIAlign,
    batched_nms=torchvision.ops.batched_nms,
    batched_nms_mask=batched_nms_mask_torchvision,
    paste_masks_in_image=paste_masks_torchvision,
    maskrcnn_predictor_loss=maskrcnn_predictor_loss_torchvision,
)

_BY_NAME = {"kernels": KERNELS, "torchvision": TORCHVISION}


def resolve_ops(ops: "str | Ops") -> Ops:
    """``"kernels"`` (default everywhere), ``"torchvision"``, or an ``Ops`` instance."""
    if isinstance(ops, Ops):
        return ops
    if ops not in _BY_NAME:
        raise ValueError(f"ops must be one of {sorted(_BY_NAME)} or an Ops, got {ops!r}")
    return _BY_NAME[ops]
