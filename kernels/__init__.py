"""Triton kernels for Mask R-CNN's hot operations, drop-in for torchvision.ops."""
from .roi_align import RoIAlign, roi_align
from .mask_loss import fused_mask_predictor_loss, mask_loss, maskrcnn_loss
from .paste import paste_masks_in_image

__all__ = ["roi_align", "RoIAlign", "mask_loss", "maskrcnn_loss", "fused_mask_predictor_loss", "paste_masks_in_image"]
