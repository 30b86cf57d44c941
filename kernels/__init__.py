"""Triton kernels for Mask R-CNN's hot operations, drop-in for torchvision.ops."""
from .roi_align import RoIAlign, roi_align
from .mask_loss import fused_mask_predictor_loss, mask_loss, maskrcnn_loss
from .multiscale_roi_align import MultiScaleRoIAlign, multiscale_roi_align
from .paste import paste_masks_in_image
from .nms import batched_nms, batched_nms_mask, nms
from .patch import patch_torchvision

__all__ = [
    "roi_align", "RoIAlign", "multiscale_roi_align", "MultiScaleRoIAlign",
    "nms", "batched_nms", "batched_nms_mask",
    "mask_loss", "maskrcnn_loss", "fused_mask_predictor_loss",
    "paste_masks_in_image", "patch_torchvision",
]
