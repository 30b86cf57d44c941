"""Builders: torchvision's keyword arguments in, a composed ``MaskRCNN`` out.

``maskrcnn_resnet50_fpn`` is interchangeable with torchvision's (same state dict, same
detections); ``maskrcnn_resnet18_fpn`` is a small variant that trains on a CPU in minutes.
Every builder takes ``ops=`` ("kernels", the default, or "torchvision") — see maskrcnn.ops.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (BackboneWithFPN, _resnet_fpn_extractor,
                                                         _validate_trainable_layers)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN_ResNet50_FPN_Weights, MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models._utils import _ovewrite_value_param
from torchvision.models.resnet import ResNet18_Weights, ResNet50_Weights
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection._utils import overwrite_eps

from .model import DetectionTransform, MaskRCNN, MaskRCNNPredictor, RoIHeads, RPN
from .ops import Ops, resolve_ops

# torchvision.models.detection.MaskRCNN's defaults, which every builder accepts as keywords
_DEFAULTS: dict[str, Any] = dict(
    min_size=800, max_size=1333, image_mean=None, image_std=None,
    rpn_anchor_generator=None, rpn_head=None,
    rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
    rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
    rpn_batch_size_per_image=256, rpn_positive_fraction=0.5, rpn_score_thresh=0.0,
    box_roi_pool=None, box_head=None, box_predictor=None,
    box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
    box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512,
    box_positive_fraction=0.25, bbox_reg_weights=None,
    mask_roi_pool=None, mask_head=None, mask_predictor=None,
    # ours
    mask_threshold=None, static_shapes=False, representation_size=1024,
    mask_layers=(256, 256, 256, 256), mask_dim_reduced=256,
)


def small_anchor_generator() -> AnchorGenerator:
    """Anchors for ~100-200 px images (FPN levels "0".."3" and "pool"): the CPU training
    default's images (``maskrcnn.data.SyntheticShapes``)."""
    return AnchorGenerator(((12,), (24,), (48,), (96,), (160,)), ((0.5, 1.0, 2.0),) * 5)


def _part(given: dict, name: str, default):
    """The module passed as ``name``, or ``default()`` when none was (``None``): an empty
    ``nn.Sequential`` is falsy but is still a module the caller chose."""
    part = given[name]
    return default() if part is None else part


def maskrcnn_from_backbone(backbone: nn.Module, *, num_classes: int,
                           ops: Union[str, Ops] = "kernels", **kwargs) -> MaskRCNN:
    """Compose a Mask R-CNN on ``backbone`` (which has ``out_channels`` and returns an
    OrderedDict of FPN levels "0".."3" plus "pool"), with torchvision's keyword arguments.

    Extra keywords: ``mask_threshold`` (None: float mask probabilities like torchvision;
    a float: bool masks), ``static_shapes`` (outputs padded to ``box_detections_per_img``
    rows with a ``num_detections`` count, no host sync: see ``MaskRCNN``),
    ``representation_size`` (box head width), ``mask_layers`` and
    ``mask_dim_reduced`` (mask head widths).
    """
    unknown = set(kwargs) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    a = {**_DEFAULTS, **kwargs}
    ops = resolve_ops(ops)
    ch = backbone.out_channels

    anchor_generator = _part(a, "rpn_anchor_generator", lambda: AnchorGenerator(
        ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5))
    rpn_head = _part(a, "rpn_head", lambda: RPNHead(
        ch, anchor_generator.num_anchors_per_location()[0]))
    rpn = RPN(anchor_generator=anchor_generator, head=rpn_head, nms=ops.batched_nms,
              nms_mask=ops.batched_nms_mask,
              fg_iou_thresh=a["rpn_fg_iou_thresh"], bg_iou_thresh=a["rpn_bg_iou_thresh"],
              batch_size_per_image=a["rpn_batch_size_per_image"],
              positive_fraction=a["rpn_positive_fraction"],
              pre_nms_top_n=dict(training=a["rpn_pre_nms_top_n_train"],
                                 testing=a["rpn_pre_nms_top_n_test"]),
              post_nms_top_n=dict(training=a["rpn_post_nms_top_n_train"],
                                  testing=a["rpn_post_nms_top_n_test"]),
              nms_thresh=a["rpn_nms_thresh"], score_thresh=a["rpn_score_thresh"])

    levels = ["0", "1", "2", "3"]
    box_roi_pool = _part(a, "box_roi_pool", lambda: ops.multiscale_roi_align(levels, 7, 2))
    box_head = _part(a, "box_head", lambda: TwoMLPHead(ch * 7 * 7, a["representation_size"]))
    box_predictor = _part(a, "box_predictor", lambda: FastRCNNPredictor(
        a["representation_size"], num_classes))
    mask_roi_pool = _part(a, "mask_roi_pool", lambda: ops.multiscale_roi_align(levels, 14, 2))
    mask_head = _part(a, "mask_head", lambda: MaskRCNNHeads(ch, list(a["mask_layers"]), 1))
    mask_predictor = _part(a, "mask_predictor", lambda: MaskRCNNPredictor(
        list(a["mask_layers"])[-1], a["mask_dim_reduced"], num_classes))
    roi_heads = RoIHeads(
        box_roi_pool=box_roi_pool, box_head=box_head, box_predictor=box_predictor,
        mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor,
        nms=ops.batched_nms, nms_mask=ops.batched_nms_mask,
        mask_loss=ops.maskrcnn_predictor_loss,
        fg_iou_thresh=a["box_fg_iou_thresh"], bg_iou_thresh=a["box_bg_iou_thresh"],
        batch_size_per_image=a["box_batch_size_per_image"],
        positive_fraction=a["box_positive_fraction"], bbox_reg_weights=a["bbox_reg_weights"],
        score_thresh=a["box_score_thresh"], nms_thresh=a["box_nms_thresh"],
        detections_per_img=a["box_detections_per_img"])

    transform = DetectionTransform(
        min_size=a["min_size"], max_size=a["max_size"],
        image_mean=_part(a, "image_mean", lambda: [0.485, 0.456, 0.406]),
        image_std=_part(a, "image_std", lambda: [0.229, 0.224, 0.225]),
        paste_masks=ops.paste_masks_in_image, mask_threshold=a["mask_threshold"])
    return MaskRCNN(transform=transform, backbone=backbone, rpn=rpn, roi_heads=roi_heads,
                    static_shapes=a["static_shapes"])


def maskrcnn_resnet50_fpn(*, weights: Union[None, str, os.PathLike,
                                            MaskRCNN_ResNet50_FPN_Weights] = None,
                          progress: bool = True, num_classes: Optional[int] = None,
                          weights_backbone: Optional[ResNet50_Weights] = None,
                          trainable_backbone_layers: Optional[int] = None,
                          ops: Union[str, Ops] = "kernels", frozen_batchnorm: bool = False,
                          **kwargs) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` on our ops; same arguments, same state dict.

    ``weights``: a ``MaskRCNN_ResNet50_FPN_Weights`` (or its name, e.g. "COCO_V1" / "DEFAULT";
    downloads through torchvision) or the path of a local ``.pth`` state dict saved from
    torchvision's model (``torch.save(tv_model.state_dict(), path)``).
    ``frozen_batchnorm`` (ours): build as for given weights (FrozenBatchNorm2d,
    ``trainable_backbone_layers`` honoured) though none are given here: for weights loaded
    afterwards, as a fine-tuned checkpoint is.
    """
    path = None
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
            os.path.exists(weights) or weights.endswith((".pth", ".pt")) or os.sep in weights)):
        path, weights = os.fspath(weights), None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
    else:
        weights = MaskRCNN_ResNet50_FPN_Weights.verify(weights)
    weights_backbone = ResNet50_Weights.verify(weights_backbone)
    if weights is not None:
        weights_backbone = None
        num_classes = _ovewrite_value_param("num_classes", num_classes,
                                            len(weights.meta["categories"]))
    elif num_classes is None:
        num_classes = 91

    is_trained = (weights is not None or path is not None or weights_backbone is not None
                  or frozen_batchnorm)
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers,
                                                           5, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    backbone = resnet50(weights=weights_backbone, progress=progress, norm_layer=norm_layer)
    backbone = _resnet_fpn_extractor(backbone, trainable_backbone_layers)
    model = maskrcnn_from_backbone(backbone, num_classes=num_classes, ops=ops, **kwargs)

    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    elif path is not None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if weights == MaskRCNN_ResNet50_FPN_Weights.COCO_V1 or path is not None:
        # the COCO_V1 checkpoint was trained with FrozenBatchNorm eps 0, as torchvision does
        overwrite_eps(model, 0.0)
    return model


def maskrcnn_resnet18_fpn(*, num_classes: int = 91,
                          weights_backbone: Optional[ResNet18_Weights] = None,
                          progress: bool = True, trainable_backbone_layers: Optional[int] = None,
                          fpn_channels: int = 256, ops: Union[str, Ops] = "kernels",
                          frozen_batchnorm: bool = False, **kwargs) -> MaskRCNN:
    """A small Mask R-CNN: ResNet-18 + FPN (``fpn_channels`` wide), for CPU training.

    Without ``weights_backbone`` (or ``frozen_batchnorm``, as ``maskrcnn_resnet50_fpn``'s) the
    backbone trains from scratch with ordinary BatchNorm.
    """
    weights_backbone = ResNet18_Weights.verify(weights_backbone)
    is_trained = weights_backbone is not None or frozen_batchnorm
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers,
                                                           5, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    body = resnet18(weights=weights_backbone, progress=progress, norm_layer=norm_layer)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
    if trainable_backbone_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512], fpn_channels, extra_blocks=LastLevelMaxPool())
    return maskrcnn_from_backbone(backbone, num_classes=num_classes, ops=ops, **kwargs)


def replace_predictors(model: MaskRCNN, num_classes: int) -> MaskRCNN:
    """The fine-tuning recipe: fresh box and mask predictors for ``num_classes`` classes
    (background included), everything else kept. Returns ``model`` (changed in place)."""
    heads = model.roi_heads
    in_features = heads.box_predictor.cls_score.in_features
    heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    conv = heads.mask_predictor.conv5_mask
    heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)
    return model
