"""``patch_torchvision()``: route torchvision's ops and detection models to our kernels.

Replaces module globals, so existing objects are covered too: a ``torchvision.ops.RoIAlign``
or ``MultiScaleRoIAlign`` built before the patch, or a whole
``torchvision.models.detection.maskrcnn_resnet50_fpn``, runs our kernels while the patch is
active. Classes are not replaced, so ``isinstance`` checks and state dicts are unaffected.
"""
from __future__ import annotations

import importlib

from torch import Tensor

from ._boxes import boxes_to_rois
from .ops.mask_loss import maskrcnn_loss
from .ops.multiscale_roi_align import _pool
from .ops.nms import batched_nms, nms
from .ops.paste_masks_in_image import paste_masks_in_image
from .ops.roi_align import roi_align


def _multiscale_roi_align(x_filtered: list[Tensor], boxes: list[Tensor], output_size,
                          sampling_ratio: int, scales, mapper) -> Tensor:
    """Stand-in for ``torchvision.ops.poolers._multiscale_roi_align``: one launch for all
    levels. torchvision's LevelMapper carries k_min, k_max, s0, lvl0 and eps, as ours."""
    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    rois = boxes_to_rois(boxes, x_filtered[0].shape[0])
    return _pool(x_filtered, rois, output_size, sampling_ratio, scales, mapper)


# (module, attribute, replacement): every place torchvision looks these ops up at call time
_TARGETS = [
    ("torchvision.ops", "roi_align", roi_align),
    ("torchvision.ops", "nms", nms),
    ("torchvision.ops", "batched_nms", batched_nms),
    ("torchvision.ops.roi_align", "roi_align", roi_align),          # RoIAlign.forward
    ("torchvision.ops.boxes", "nms", nms),
    ("torchvision.ops.boxes", "batched_nms", batched_nms),          # RPN, RoI heads
    ("torchvision.ops.poolers", "roi_align", roi_align),
    ("torchvision.ops.poolers", "_multiscale_roi_align", _multiscale_roi_align),
    ("torchvision.models.detection.roi_heads", "roi_align", roi_align),  # mask targets
    ("torchvision.models.detection.roi_heads", "maskrcnn_loss", maskrcnn_loss),
    ("torchvision.models.detection.roi_heads", "paste_masks_in_image", paste_masks_in_image),
    ("torchvision.models.detection.transform", "paste_masks_in_image", paste_masks_in_image),
]


class TorchvisionPatch:
    """The active patch; ``undo()`` (or leaving the ``with`` block) restores torchvision."""

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []
        for module_name, attr, replacement in _TARGETS:
            module = importlib.import_module(module_name)
            if not hasattr(module, attr):  # an attribute a torchvision version lacks
                continue
            self._saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, replacement)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def undo(self) -> None:
        while self._saved:
            module, attr, original = self._saved.pop()
            setattr(module, attr, original)

    def __enter__(self) -> "TorchvisionPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_torchvision() -> TorchvisionPatch:
    """Swap torchvision's RoI Align, multi-level pooling, NMS, mask loss and mask pasting
    for ours, now. Use as ``with kernels.patch_torchvision(): ...`` to undo on exit, or keep
    the returned object and call ``undo()``."""
    return TorchvisionPatch()
