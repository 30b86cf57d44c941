"""Triton kernels for Mask R-CNN's hot operations, drop-in for torchvision.ops."""
from .roi_align import RoIAlign, roi_align

__all__ = ["roi_align", "RoIAlign"]
