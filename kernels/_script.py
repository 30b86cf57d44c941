"""TorchScript twins of the drop-in functions torchvision's scripted code calls.

``torch.jit.script`` compiles a Python function, and a scripted module's calls, from their
source; our public functions (argument forms, checks, the eager path) are not TorchScript.
Each twin here takes torchvision's argument forms and calls the custom op; the public
function hands it over through ``__prepare_scriptable__`` (which ``torch.jit.script`` and its
recursive compiler call first), so ``torch.jit.script(kernels.roi_align)``, or a torchvision
module scripted under ``patch_torchvision()``, compiles it. Scripted calls read no tensor
value, as torchvision's own; quantized tensors go to torchvision's functions.
"""
from __future__ import annotations

from typing import List, Union

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import check_roi_boxes_shape, convert_boxes_to_roi_format

from .ops import nms as _nms_ops
from .ops import roi_align as _roi_align_ops

_TORCHVISION_ROI_ALIGN = _roi_align_ops._TORCHVISION_ROI_ALIGN
_TORCHVISION_NMS = _nms_ops._TORCHVISION_NMS
_TORCHVISION_BATCHED_NMS = _nms_ops._TORCHVISION_BATCHED_NMS


def scripted_roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]],
                       output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
                       sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``kernels.roi_align`` in TorchScript: the boxes in torchvision's forms, the op."""
    if input.is_quantized:
        return _TORCHVISION_ROI_ALIGN(input, boxes, output_size, spatial_scale, sampling_ratio,
                                      aligned)
    check_roi_boxes_shape(boxes)
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(boxes)
    size = _pair(output_size)
    return torch.ops.maskrcnn_triton.roi_align(input, rois, spatial_scale, size[0], size[1],
                                               sampling_ratio, aligned)


def scripted_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``kernels.nms`` in TorchScript (nothing read before the op: -1)."""
    if boxes.is_quantized:
        return _TORCHVISION_NMS(boxes, scores, iou_threshold)
    return torch.ops.maskrcnn_triton.nms(boxes, scores, iou_threshold, -1)


def scripted_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor,
                         iou_threshold: float) -> Tensor:
    """``kernels.batched_nms`` in TorchScript."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.is_quantized:
        return _TORCHVISION_BATCHED_NMS(boxes, scores, idxs, iou_threshold)
    return torch.ops.maskrcnn_triton.batched_nms(boxes, scores, idxs, iou_threshold, -1)


_roi_align_ops.roi_align.__prepare_scriptable__ = lambda: scripted_roi_align
_nms_ops.nms.__prepare_scriptable__ = lambda: scripted_nms
_nms_ops.batched_nms.__prepare_scriptable__ = lambda: scripted_batched_nms
