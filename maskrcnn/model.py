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
from torchvision.models.detection.rpn import (RegionProposalNetwork,
                                              concat_box_prediction_layers)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

import kernels
from kernels._utils import values_checked

from .fixed_size import (BalancedSampler, BoxCoder, Matcher, fixed_sizes, large_enough, leading,
                         leading_rows, select_top, gt_quality, gt_valid)


class MaskRCNN(nn.Module):
    """images (list of CHW float tensors in [0, 1]) -> losses (training) or detections (eval).

    Same call convention as ``torchvision.models.detection.MaskRCNN``: in training pass
    ``targets`` (list of dicts with ``boxes`` (L, 4) xyxy float, ``labels`` (L,) int64,
    ``masks`` (L, H, W) uint8/bool) and get a dict of losses; in eval get one dict per image
    with ``boxes``, ``labels``, ``scores`` and ``masks`` (L, 1, H, W) probabilities (or bool
    masks when the transform thresholds them).

    ``static_shapes``: every output padded to ``box_detections_per_img`` rows, with the
    image's row count as ``num_detections`` (an int64 scalar tensor); padding rows are
    zero. Nothing in it reads a tensor's values on the host, so on CUDA it never syncs and
    replays as a CUDA graph (see maskrcnn.fixed_size).

    Training reads no tensor value on the host either, in every mode (on CUDA: no sync;
    one graph under ``torch.compile(fullgraph=True)``), and inference on a GPU reads one:
    each image's detection count, at the end. On CPU tensors, eager inference selects with
    data-dependent sizes, as torchvision (less work where few candidates survive).
    """

    def __init__(self, *, transform: nn.Module, backbone: nn.Module, rpn: nn.Module,
                 roi_heads: nn.Module, static_shapes: bool = False) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.static_shapes = static_shapes

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode")
        fixed = fixed_sizes(self.static_shapes, images)
        if self.static_shapes and not torch.compiler.is_compiling():
            with kernels.skip_data_checks():   # the static mode reads no tensor value
                return self._finish(*self._run(images, targets, fixed))
        out, image_sizes, original_sizes = self._run(images, targets, fixed)
        if fixed and not (self.training or self.static_shapes):
            # Cut each image's padded detections to its valid rows: the default mode's one
            # host sync. Done here, in forward's own frame, this is also the one graph break
            # when traced (a break inside a nested call would break each caller's frame).
            counts = torch.stack([d["valid"].sum() for d in out])
            rows = leading_rows([d[k] for d in out for k in _FIELDS], counts)
            n = len(_FIELDS)
            out = [dict(zip(_FIELDS, rows[i * n:(i + 1) * n])) for i in range(len(out))]
        return self._finish(out, image_sizes, original_sizes)

    def _run(self, images, targets, fixed: bool):
        """transform, backbone, RPN, heads: losses (training) or the detections before
        postprocessing, with each image's ``valid`` rows; plus the sizes postprocess needs."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images, targets = self.transform(images, targets)
        if targets is not None:
            _check_targets(targets, self.roi_heads.box_predictor)
        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, valid, proposal_losses = self.rpn(images, features, targets, fixed=fixed)
        detections, detector_losses = self.roi_heads(features, proposals, valid,
                                                     images.image_sizes, targets, fixed=fixed)
        if self.training:
            return {**proposal_losses, **detector_losses}, None, None
        return detections, images.image_sizes, original_sizes

    def _finish(self, out, image_sizes, original_sizes):
        if self.training:
            return out
        if self.static_shapes:
            return self.transform.postprocess_static(out, image_sizes, original_sizes,
                                                     self.roi_heads.detections_per_img)
        for d in out:
            d.pop("valid", None)
        return self.transform.postprocess(out, image_sizes, original_sizes)


_FIELDS = ("boxes", "labels", "scores", "masks")


def _check_targets(targets: list[dict[str, Tensor]], box_predictor: nn.Module) -> None:
    """Shapes always; values (a box of non-positive size, as torchvision checks, and labels
    outside the predictor's classes) where the ops check values: CPU tensors always, CUDA
    tensors inside ``kernels.check_values()`` (one host sync for the batch), never while
    traced. The losses then run with the ops' own checks off (their padding rows are
    invalid by design)."""
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be (L, 4), got {tuple(boxes.shape)}")
        if t["labels"].shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels'] must be ({boxes.shape[0]},) as its boxes, "
                             f"got {tuple(t['labels'].shape)}")
        valid = t.get("valid")
        if valid is not None and (valid.shape != boxes.shape[:1] or valid.dtype != torch.bool):
            raise ValueError(f"targets[{i}]['valid'] must be a bool ({boxes.shape[0]},) as its "
                             f"boxes, got {valid.dtype} {tuple(valid.shape)}")
    if not targets or not values_checked(targets[0]["boxes"]):
        return
    classes = getattr(getattr(box_predictor, "cls_score", None), "out_features", None)
    flags = []
    for t in targets:
        boxes, labels, valid = t["boxes"], t["labels"], gt_valid(t)
        degenerate = ((boxes[:, 2:] <= boxes[:, :2]).any(dim=1) & valid).any()
        outside = ((((labels < 0) | (labels >= classes)) & valid).any() if classes is not None
                   else torch.zeros((), dtype=torch.bool, device=labels.device))
        flags.append(torch.stack([degenerate, outside.to(degenerate.device)]))
    for i, (degenerate, outside) in enumerate(torch.stack(flags).tolist()):   # one read
        boxes = targets[i]["boxes"]
        if degenerate:
            first = boxes[(boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
                          & gt_valid(targets[i])][0].tolist()
            raise ValueError(f"targets[{i}]['boxes'] has a box of non-positive size: {first}")
        if outside:
            raise ValueError(f"targets[{i}]['labels'] must be in [0, {classes}) (the box "
                             f"predictor's classes)")


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

    def torch_choice(self, k: list[int]) -> int:
        # torchvision's draw, so the generator advances as in torchvision; read on the host
        # only when there is a choice (a single size compiles without a graph break)
        draw = torch.empty(1).uniform_(0.0, float(len(k)))
        return k[0] if len(k) == 1 else k[int(draw.item())]

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        """torchvision's resize, the uint8/bool gt masks resized as uint8: the same nearest
        neighbours (tested) without torchvision's float32 copy of the masks (4x the bytes)."""
        masks = None
        if target is not None and "masks" in target and not target["masks"].is_floating_point():
            target = dict(target)
            masks = target.pop("masks")
        image, target = super().resize(image, target)
        if masks is not None:
            target["masks"] = masks if self.training and self._skip_resize else F.interpolate(
                masks[:, None].to(torch.uint8), size=image.shape[-2:])[:, 0]
        return image, target

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point (values in [0, 1]), "
                            f"got {image.dtype}")
        # constants filled on the device: no host-to-device copy (a CUDA sync) per image
        mean = torch.stack([image.new_full((1, 1), m) for m in self.image_mean])
        std = torch.stack([image.new_full((1, 1), s) for s in self.image_std])
        return (image - mean) / std

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

    def postprocess_static(self, result, image_shapes, original_image_sizes, rows: int):
        """``postprocess`` on padded detections: every tensor padded to ``rows`` rows (the
        selection gives fewer when there are fewer candidates), padding rows zero,
        ``num_detections`` counting the valid rows."""
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            for k, v in pred.items():
                pred[k] = torch.cat([v, v.new_zeros(rows - v.shape[0], *v.shape[1:])])
            valid = pred.pop("valid")
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s) * valid[:, None]
            pred["labels"] = pred["labels"] * valid
            pred["scores"] = pred["scores"] * valid
            masks = self.paste_masks(pred["masks"], pred["boxes"], o_im_s,
                                     threshold=self.mask_threshold)
            pred["masks"] = masks * valid.view(-1, 1, 1, 1)
            pred["num_detections"] = valid.sum()
        return result


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """torchvision's ``resize_boxes`` (float32 ratios on the boxes' device), its constants
    filled on the device instead of copied from the host (a copy would sync CUDA)."""
    def ratio(new: int, orig: int) -> Tensor:
        def full(v):
            return torch.full((), v, dtype=torch.float32, device=boxes.device)
        return full(new) / full(orig)

    ratio_h, ratio_w = ratio(new_size[0], original_size[0]), ratio(new_size[1], original_size[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _fixed_size_parts(head: nn.Module, fg_iou_thresh: float, bg_iou_thresh: float,
                      low_quality: bool, batch_size_per_image: int, positive_fraction: float,
                      nms: Callable, nms_mask: Callable) -> None:
    """Give the RPN or the RoI heads the sync-free box coder, matcher and sampler
    (:mod:`maskrcnn.fixed_size`) in place of torchvision's, and their NMS ops."""
    head.box_coder = BoxCoder(head.box_coder.weights)
    head.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh,
                                    allow_low_quality_matches=low_quality)
    head.fg_bg_sampler = BalancedSampler(batch_size_per_image, positive_fraction)
    head.nms = nms
    head.nms_mask = nms_mask


class RPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork with the NMS injected (``nms``: batched_nms,
    ``nms_mask``: its keep-mask form, for fixed sizes). ``forward`` also returns each
    image's valid-proposal mask (all True unless sizes are fixed)."""

    def __init__(self, *, anchor_generator: nn.Module, head: nn.Module,
                 nms: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 nms_mask: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int],
                 nms_thresh: float = 0.7, score_thresh: float = 0.0) -> None:
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, pre_nms_top_n,
                         post_nms_top_n, nms_thresh, score_thresh)
        _fixed_size_parts(self, fg_iou_thresh, bg_iou_thresh, True, batch_size_per_image,
                          positive_fraction, nms, nms_mask)

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's, its labels set with ``torch.where`` instead of boolean-mask
        assignments (each a host sync on CUDA): 1 matched, 0 background, -1 discarded."""
        labels, matched_gt_boxes = [], []
        for anchors_per_image, t in zip(anchors, targets):
            gt_boxes = t["boxes"]
            if gt_boxes.numel() == 0:      # an image with no object: every anchor background
                matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32,
                                                    device=anchors_per_image.device))
                labels.append(torch.zeros(anchors_per_image.shape[0], dtype=torch.float32,
                                          device=anchors_per_image.device))
                continue
            matched = self.proposal_matcher(
                gt_quality(self.box_similarity(gt_boxes, anchors_per_image), t))
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
            labels.append(torch.where(
                matched >= 0, 1.0,
                torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0, 0.0)))
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        """torchvision's RPN losses over the sampled anchors, as masked sums."""
        positive, negative = (torch.cat(m) for m in self.fg_bg_sampler(labels))
        sampled = positive | negative
        count = sampled.sum()
        box_loss = F.smooth_l1_loss(pred_bbox_deltas, torch.cat(regression_targets),
                                    beta=1 / 9, reduction="none").sum(1)
        # where, not a product: unsampled anchors of a gt-less image have infinite targets
        box_loss = torch.where(positive, box_loss, 0.0).sum() / count
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten(), torch.cat(labels), reduction="none")
        objectness_loss = torch.where(sampled, objectness_loss, 0.0).sum() / count
        return objectness_loss, box_loss

    def forward(self, images, features, targets=None, *, fixed: bool = False):
        features = list(features.values())
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # proposals carry no gradient, as in torchvision
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, valid = self.filter_proposals(proposals, objectness, images.image_sizes,
                                             per_level, fixed=fixed)
        losses = {}
        if self.training:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, valid, losses

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level,
                         fixed: bool = False):
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

        final_boxes, final_valid = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, probs, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            valid = large_enough(boxes, self.min_size) & (scores >= self.score_thresh)
            rows, ok = select_top(self.nms, self.nms_mask, boxes, scores, lvl, valid,
                                  self.nms_thresh, self.post_nms_top_n(), fixed)
            final_boxes.append(boxes[rows])
            final_valid.append(ok)
        return final_boxes, final_valid


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
        return F.relu(self.conv5_mask(x), inplace=True)     # as torchvision's nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(self.features(x))


def _box_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, sampled: Tensor,
                regression_targets: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` over the ``sampled`` rows, as masked sums."""
    count = sampled.sum()
    classes = labels.clamp(min=0)
    loss_classifier = F.cross_entropy(class_logits, classes, reduction="none")
    loss_classifier = torch.where(sampled, loss_classifier, 0.0).sum() / count
    rows = torch.arange(labels.shape[0], device=labels.device)
    box_loss = F.smooth_l1_loss(box_regression.reshape(labels.shape[0], -1, 4)[rows, classes],
                                regression_targets, beta=1 / 9, reduction="none").sum(1)
    box_loss = torch.where(sampled & (labels > 0), box_loss, 0.0).sum() / count
    return loss_classifier, box_loss


class RoIHeads(_TVRoIHeads):
    """Box and mask heads (torchvision's sampling and box loss) with the ops injected.

    ``nms``: batched_nms for box post-processing (``nms_mask``: its keep-mask form).
    ``mask_loss(features, weight, bias, proposals, gt_masks, gt_labels, matched_idxs)``:
    torchvision's ``maskrcnn_loss`` with the predictor's 1x1 conv folded in and the targets
    sampled from the uint8 gt masks, so training never builds N x K x M x M logits, float
    copies of the masks or N x M x M targets; rows whose matched index is -1 are padding,
    left out of the loss and its mean (``maskrcnn.ops``).
    """

    def __init__(self, *, box_roi_pool: nn.Module, box_head: nn.Module,
                 box_predictor: nn.Module, mask_roi_pool: nn.Module, mask_head: nn.Module,
                 mask_predictor: nn.Module,
                 nms: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 nms_mask: Callable[[Tensor, Tensor, Tensor, float], Tensor],
                 mask_loss: Callable[..., Tensor],
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
        _fixed_size_parts(self, fg_iou_thresh, bg_iou_thresh, False, batch_size_per_image,
                          positive_fraction, nms, nms_mask)
        self.mask_loss = mask_loss

    def forward(self, features, proposals, valid, image_shapes, targets=None, *,
                fixed: bool = False):
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            self._check_target_dtypes(targets)
            return [], self._losses(features, proposals, valid, image_shapes, targets, fixed)
        return self._detect(features, proposals, valid, image_shapes, fixed), {}

    @staticmethod
    def _check_target_dtypes(targets):
        for i, t in enumerate(targets):
            if not t["boxes"].is_floating_point():
                raise TypeError(f"targets[{i}]['boxes'] must be floating point, "
                                f"got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"targets[{i}]['labels'] must be int64, got {t['labels'].dtype}")

    def _sample(self, proposals, valid, targets):
        """torchvision's ``select_training_samples`` in fixed sizes: per image the gt boxes
        join the valid proposals, are matched and sampled; the sampled rows lead (in index
        order, as torchvision's ``torch.where``) in ``min(rows, batch_size_per_image)``
        rows, ``sampled`` flagging them. Invalid proposals are never sampled."""
        out = {k: [] for k in ("proposals", "matched", "labels", "sampled", "targets")}
        labels_all, rows_all = [], []
        for p, ok, t in zip(proposals, valid, targets):
            gt_boxes = t["boxes"].to(p.dtype)
            p = torch.cat([p, gt_boxes])
            ok = torch.cat([ok, gt_valid(t).to(ok.device)])   # padding gt rows: no proposal
            if gt_boxes.shape[0] == 0:
                matched = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                labels = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                gt_boxes = torch.zeros((1, 4), dtype=p.dtype, device=p.device)
            else:
                matched = self.proposal_matcher(gt_quality(box_ops.box_iou(gt_boxes, p), t))
                labels = t["labels"][matched.clamp(min=0)].to(torch.int64)
                labels = torch.where(matched == self.proposal_matcher.BELOW_LOW_THRESHOLD,
                                     0, labels)
                labels = torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS,
                                     -1, labels)
                matched = matched.clamp(min=0)
            labels_all.append(torch.where(ok, labels, -1))
            rows_all.append((p, matched, gt_boxes))
        positive, negative = self.fg_bg_sampler(labels_all)
        for (p, matched, gt_boxes), labels, pos, neg in zip(rows_all, labels_all, positive,
                                                            negative):
            rows, sampled = leading(pos | neg, self.fg_bg_sampler.batch_size_per_image)
            out["proposals"].append(p[rows])
            out["matched"].append(matched[rows])
            out["labels"].append(torch.where(sampled, labels[rows], -1))
            out["sampled"].append(sampled)
            out["targets"].append(gt_boxes[matched[rows]])
        out["targets"] = self.box_coder.encode(out["targets"], out["proposals"])
        return out

    def _losses(self, features, proposals, valid, image_shapes, targets,
                fixed: bool = True) -> dict[str, Tensor]:
        s = self._sample(proposals, valid, targets)
        box_features = self.box_head(self.box_roi_pool(features, s["proposals"], image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = _box_losses(
            class_logits, box_regression, torch.cat(s["labels"]), torch.cat(s["sampled"]),
            torch.cat(s["targets"]))

        # The mask branch trains on each image's positive rows (the sampler draws at most
        # `cap`). Fixed sizes (no host sync, no graph break): the positives lead, in index
        # order as torchvision's torch.where, in min(cap, rows) rows; the others are
        # padding (matched index -1), ignored by the loss. On the CPU (no sync to save)
        # the positives alone, as torchvision: the mask head then runs on fewer rows.
        cap = int(self.fg_bg_sampler.batch_size_per_image * self.fg_bg_sampler.positive_fraction)
        mask_proposals, pos_matched = [], []
        for p, m, lab in zip(s["proposals"], s["matched"], s["labels"]):
            if fixed:
                rows, pos = leading(lab > 0, cap)
                mask_proposals.append(p[rows])
                pos_matched.append(torch.where(pos, m[rows], -1))
            else:
                rows = torch.where(lab > 0)[0]
                mask_proposals.append(p[rows])
                pos_matched.append(m[rows])
        mask_features = self.mask_predictor.features(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        predictor = self.mask_predictor.mask_fcn_logits
        loss_mask = self.mask_loss(mask_features, predictor.weight, predictor.bias,
                                   mask_proposals, [t["masks"] for t in targets],
                                   [t["labels"] for t in targets], pos_matched)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                "loss_mask": loss_mask}

    def _detect(self, features, proposals, valid, image_shapes,
                fixed: bool) -> list[dict[str, Tensor]]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels, valid = self.postprocess_detections(
            class_logits, box_regression, proposals, valid, image_shapes, fixed)
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        picked = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device),
                             torch.cat(labels)][:, None].sigmoid()
        masks = picked.split([len(b) for b in boxes])
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m, "valid": v}
                for b, lab, s, m, v in zip(boxes, labels, scores, masks, valid)]

    def postprocess_detections(self, class_logits, box_regression, proposals, valid,
                               image_shapes, fixed: bool = False):
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image)
        pred_scores = F.softmax(class_logits, -1).split(per_image)
        out_boxes, out_scores, out_labels, out_valid = [], [], [], []
        for boxes, scores, ok, image_shape in zip(pred_boxes, pred_scores, valid, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            # every (proposal, non-background class) pair is a candidate detection
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            ok = (ok[:, None].expand(-1, num_classes - 1).reshape(-1)
                  & (scores > self.score_thresh) & large_enough(boxes, 1e-2))
            rows, ok = select_top(self.nms, self.nms_mask, boxes, scores, labels, ok,
                                  self.nms_thresh, self.detections_per_img, fixed)
            out_boxes.append(boxes[rows])
            out_scores.append(scores[rows])
            out_labels.append(labels[rows])
            out_valid.append(ok)
        return out_boxes, out_scores, out_labels, out_valid


__all__ = ["MaskRCNN", "DetectionTransform", "RPN", "RoIHeads", "MaskRCNNPredictor"]
