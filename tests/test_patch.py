"""patch_torchvision(): an unmodified torchvision Mask R-CNN runs our kernels, same results."""
from __future__ import annotations

import torch
import torchvision
from torch.testing import assert_close
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, roi_heads, transform
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import kernels


_SMALL = dict(num_classes=5, min_size=96, max_size=128, rpn_pre_nms_top_n_test=80,
              rpn_post_nms_top_n_test=40, rpn_pre_nms_top_n_train=80,
              rpn_post_nms_top_n_train=40, box_batch_size_per_image=16,
              box_score_thresh=0.0, box_detections_per_img=8)


def _model(backend):
    """torchvision's maskrcnn_resnet50_fpn, unmodified. Through Triton's interpreter its
    256-channel poolers take minutes, so there the same torchvision MaskRCNN class is built
    on a ResNet-18 FPN with 16 channels; CUDA and the reference path run the ResNet-50."""
    if backend.name == "interpreter":
        body = resnet18(weights=None)
        fpn = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2",
                                     "layer4": "3"}, [64, 128, 256, 512], 16)
        model = MaskRCNN(fpn, **_SMALL)
    else:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **_SMALL)
    # make the random heads produce confident, varied detections
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    return model


def _images():
    return [torch.rand(3, 96, 112), torch.rand(3, 90, 120)]


def test_patch_is_undone_and_context_manager():
    originals = (torchvision.ops.roi_align, torchvision.ops.boxes.batched_nms,
                 roi_heads.maskrcnn_loss, transform.paste_masks_in_image,
                 torchvision.ops.poolers._multiscale_roi_align)
    with kernels.patch_torchvision() as p:
        assert p.active
        assert torchvision.ops.roi_align is kernels.roi_align
        assert torchvision.ops.boxes.batched_nms is kernels.batched_nms
        assert roi_heads.maskrcnn_loss is kernels.maskrcnn_loss
        assert transform.paste_masks_in_image is kernels.paste_masks_in_image
    assert (torchvision.ops.roi_align, torchvision.ops.boxes.batched_nms,
            roi_heads.maskrcnn_loss, transform.paste_masks_in_image,
            torchvision.ops.poolers._multiscale_roi_align) == originals
    p = kernels.patch_torchvision()
    assert torchvision.ops.nms is kernels.nms
    p.undo()
    assert torchvision.ops.nms is not kernels.nms
    assert not p.active


def test_patched_model_gives_the_same_detections(backend):
    model = _model(backend).eval().to(backend.device)
    images = [i.to(backend.device) for i in _images()]
    with torch.no_grad():
        ref = model(images)
        with kernels.patch_torchvision():
            ours = model(images)
    assert torchvision.ops.roi_align is not kernels.roi_align
    for r, o in zip(ref, ours):
        assert len(r["boxes"]) > 0
        torch.testing.assert_close(o["labels"], r["labels"])
        assert_close(o["boxes"], r["boxes"], rtol=1e-4, atol=1e-3)
        assert_close(o["scores"], r["scores"], rtol=1e-4, atol=1e-4)
        # float32 sums in another order through the mask head: probabilities within 1e-3
        assert_close(o["masks"], r["masks"], rtol=1e-3, atol=1e-3)


def test_patched_model_gives_the_same_training_losses(backend):
    model = _model(backend).train().to(backend.device)
    images = [i.to(backend.device) for i in _images()]
    targets = []
    for img in images:
        h, w = img.shape[1:]
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 100.0, 85.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 12:70, 10:60] = 1
        masks[1, 30:85, 40:100] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    targets = [{k: v.to(backend.device) for k, v in t.items()} for t in targets]
    torch.manual_seed(1)
    ref = model(images, targets)
    torch.manual_seed(1)  # the samplers draw the same positives/negatives
    with kernels.patch_torchvision():
        ours = model(images, targets)
    assert ref.keys() == ours.keys()
    for k in ref:
        assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5)
