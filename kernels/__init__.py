"""Triton kernels for Mask R-CNN's hot operations, drop-in for torchvision.ops."""
from .ops.roi_align import RoIAlign, roi_align
from .ops.multiscale_roi_align import MultiScaleRoIAlign, multiscale_roi_align
from .ops.nms import batched_nms, batched_nms_mask, nms
from .ops.mask_loss import mask_loss, maskrcnn_loss
from .ops.mask_predictor_loss import mask_predictor_loss, maskrcnn_predictor_loss
from .ops.paste_masks_in_image import paste_masks_in_image
from .patch import patch_torchvision
from . import _script  # noqa: F401  (TorchScript twins of roi_align, nms, batched_nms)
from ._utils import check_values, skip_data_checks

__all__ = [
    "roi_align", "RoIAlign", "multiscale_roi_align", "MultiScaleRoIAlign",
    "nms", "batched_nms", "batched_nms_mask",
    "mask_loss", "maskrcnn_loss", "mask_predictor_loss", "maskrcnn_predictor_loss",
    "paste_masks_in_image", "patch_torchvision", "check_values", "skip_data_checks",
]
