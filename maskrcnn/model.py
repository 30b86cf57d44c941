"""Mask R-CNN as a composition of modules, state-dict compatible with torchvision's.

``MaskRCNN`` takes a transform, a backbone, an RPN and RoI heads; the ops they need (NMS,
the multi-level pooler, the mask loss, mask pasting) are injected when they are built
(see ``maskrcnn.ops`` and ``maskrcnn.builders``), so a single ``ops=`` argument swaps our
kernels for torchvision's. Module and parameter names follow torchvision's so that its
``maskrcnn_resnet50_fpn`` state dict loads strictly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads as _TVRoIHeads
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import (GeneralizedRCNNTransform,
                                                    resize_boxes)
from torchvision.ops import boxes as box_ops


class MaskRCNN(nn.Module):
    """images (list of CHW float tensors in [0, 1]) -> losses (training) or detections (eval).

    Same call convention as ``torchvision.models.detection.MaskRCNN``: in training pass
    ``targets`` (list of dicts with ``boxes`` (L, 4) xyxy float, ``labels`` (L,) int64,
    ``masks`` (L, H, W) uint8/bool) and get a dict of losses; in eval get one dict per image
    with ``boxes``, ``labels``, ``scores`` and ``masks`` (L, 1, H, W) probabilities (or bool
    masks when the transform thresholds them).
    """

    def __init__(self, *, transform: nn.Module, backbone: nn.Module, rpn: nn.Module,
                 roi_heads: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images, targets = self.transform(images, targets)
        if targets is not None:
            _check_boxes(targets)
        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(images, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, images.image_sizes,
                                                     targets)
        if self.training:
            return {**proposal_losses, **detector_losses}
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)


def _check_boxes(targets: list[dict[str, Tensor]]) -> None:
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be (L, 4), got {tuple(boxes.shape)}")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            raise ValueError(f"targets[{i}]['boxes'] has a box of non-positive size: "
                             f"{boxes[bad][0].tolist()}")


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's resize/normalize/batch transform, with the mask paste injected.

    ``mask_threshold``: None keeps float mask probabilities (torchvision's output); a float
    returns bool masks ``prob > mask_threshold``.
    """

    def __init__(self, *, min_size, max_size: int, image_mean: list[float],
                 image_std: list[float], paste_masks: Callable[..., Tensor],
                 mask_threshold: Optional[float] = None, **kwargs) -> None:
        super().__init__(min_size, max_size, image_mean, image_std, **kwargs)
        self.paste_masks = paste_masks
        self.mask_threshold = mask_threshold

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                # with a threshold the paste thresholds in the same pass (no float image)
                pred["masks"] = self.paste_masks(pred["masks"], pred["boxes"], o_im_s,
                                                 threshold=self.mask_threshold)
        return result


class RPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork with the NMS injected (``nms``: batched_nms)."""

    def __init__(self, *, anchor_generator: nn.Module, head: nn.Module,
                 nms: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int],
                 nms_thresh: float = 0.7, score_thresh: float = 0.0) -> None:
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, pre_nms_top_n,
                         post_nms_top_n, nms_thresh, score_thresh)
        self.nms = nms

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                            for i, n in enumerate(num_anchors_per_level)])
        levels = levels.reshape(1, -1).expand_as(objectness)
        # top-n per level before NMS, as torchvision
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        probs = torch.sigmoid(objectness)

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, probs, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = self.nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class MaskRCNNPredictor(nn.Module):
    """The classic mask predictor: 2x deconv + ReLU, then a per-class 1x1 conv.

    Parameter names match torchvision's ``MaskRCNNPredictor``. ``features`` is the deconv
    output; ``mask_fcn_logits`` is applied by ``forward`` in inference and folded into the
    fused loss in training.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.conv5_mask(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(self.features(x))


def project_masks_on_boxes(roi_align: Callable[..., Tensor], gt_masks: Tensor, boxes: Tensor,
                           matched_idxs: Tensor, size: int) -> Tensor:
    """Crop-and-resize each matched gt mask to its proposal: the (N, M, M) loss targets."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


class RoIHeads(_TVRoIHeads):
    """Box and mask heads (torchvision's sampling and box loss) with the ops injected.

    ``nms``: batched_nms for box post-processing. ``roi_align``: projects gt masks onto
    proposals. ``mask_loss(features, weight, bias, targets, labels)``: the predictor's 1x1
    conv fused with the class-selected BCE, so training never builds N x K x M x M logits.
    """

    def __init__(self, *, box_roi_pool: nn.Module, box_head: nn.Module,
                 box_predictor: nn.Module, mask_roi_pool: nn.Module, mask_head: nn.Module,
                 mask_predictor: nn.Module,
                 nms: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 roi_align: Callable[..., Tensor], mask_loss: Callable[..., Tensor],
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: Optional[tuple[float, ...]] = None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100) -> None:
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights,
                         score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool=mask_roi_pool, mask_head=mask_head,
                         mask_predictor=mask_predictor)
        self.nms = nms
        self.roi_align = roi_align
        self.mask_loss = mask_loss

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            self._check_target_dtypes(targets)
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    @staticmethod
    def _check_target_dtypes(targets):
        for i, t in enumerate(targets):
            if not t["boxes"].is_floating_point():
                raise TypeError(f"targets[{i}]['boxes'] must be floating point, "
                                f"got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"targets[{i}]['labels'] must be int64, got {t['labels'].dtype}")

    def _losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, regression_targets = \
            self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                      regression_targets)

        # the mask branch trains on positive proposals only
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[i] for p, i in zip(proposals, pos)]
        pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
        mask_features = self.mask_predictor.features(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        size = mask_features.shape[-1]
        mask_targets = torch.cat([
            project_masks_on_boxes(self.roi_align, t["masks"], p, m, size)
            for t, p, m in zip(targets, mask_proposals, pos_matched)])
        mask_labels = torch.cat([t["labels"][m] for t, m in zip(targets, pos_matched)])
        predictor = self.mask_predictor.mask_fcn_logits
        loss_mask = self.mask_loss(mask_features, predictor.weight, predictor.bias,
                                   mask_targets, mask_labels)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                "loss_mask": loss_mask}

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                            proposals, image_shapes)
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        picked = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device),
                             torch.cat(labels)][:, None].sigmoid()
        masks = picked.split([len(b) for b in boxes])
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m}
                for b, lab, s, m in zip(boxes, labels, scores, masks)]

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image)
        pred_scores = F.softmax(class_logits, -1).split(per_image)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            # every (proposal, non-background class) pair is a candidate detection
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = self.nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


__all__ = ["MaskRCNN", "DetectionTransform", "RPN", "RoIHeads", "MaskRCNNPredictor",
           "project_masks_on_boxes"]
