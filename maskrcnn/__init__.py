"""Mask R-CNN on the ``kernels`` ops: torchvision-weight-compatible, trains, evaluates, predicts.

    model = maskrcnn.maskrcnn_resnet50_fpn(weights=None, num_classes=91)   # torchvision's state dict
    model = maskrcnn.maskrcnn_resnet18_fpn(num_classes=4)                   # small, trains on a CPU
"""
from . import data
from .builders import (maskrcnn_from_backbone, maskrcnn_resnet18_fpn, maskrcnn_resnet50_fpn,
                       replace_predictors)
from .model import DetectionTransform, MaskRCNN, MaskRCNNPredictor, RoIHeads, RPN
from .ops import KERNELS, TORCHVISION, Ops, resolve_ops

__all__ = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet18_fpn", "maskrcnn_from_backbone",
           "replace_predictors", "MaskRCNN", "DetectionTransform", "RPN", "RoIHeads",
           "MaskRCNNPredictor", "Ops", "KERNELS", "TORCHVISION", "resolve_ops"]
