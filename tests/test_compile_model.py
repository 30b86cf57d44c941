"""torch.compile of the whole model: fewer graph breaks than torchvision's, same outputs.

Graph structure does not depend on where the ops run (each is one opaque custom op), so the
model runs on the PyTorch reference path here: the interpreter would only add minutes.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import maskrcnn
from kernels._utils import reference_path

KW = dict(num_classes=4, min_size=64, max_size=96, rpn_pre_nms_top_n_test=50,
          rpn_post_nms_top_n_test=20, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
          box_batch_size_per_image=16, box_detections_per_img=5, box_score_thresh=0.0)


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    with reference_path():
        yield
    torch._logging.set_logs()
    torch._dynamo.reset()


def models():
    ours = maskrcnn.maskrcnn_resnet18_fpn(fpn_channels=16, **KW)
    fpn = BackboneWithFPN(torchvision.models.resnet18(weights=None),
                          {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                          [64, 128, 256, 512], 16)
    return ours, MaskRCNN(fpn, **KW)


def batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for im in images:
        masks = torch.zeros(1, *im.shape[1:], dtype=torch.uint8)
        masks[0, 10:40, 12:50] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]),
                        "labels": torch.tensor([2]), "masks": masks})
    return images, targets


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fewer_graph_breaks_than_torchvision(mode):
    ours, tv = models()
    images, targets = batch()
    args = (images,) if mode == "eval" else (images, targets)
    counts = {}
    for name, model in (("ours", ours), ("torchvision", tv)):
        getattr(model, mode)()
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            counts[name] = torch._dynamo.explain(model)(*args).graph_break_count
    print(f"graph breaks ({mode}): {counts}")
    assert counts["ours"] < counts["torchvision"], counts


def test_compiled_model_matches_eager():
    ours, _ = models()
    images, targets = batch()
    compiled = torch.compile(ours, backend="aot_eager")
    ours.train()
    torch.manual_seed(3)  # the samplers draw the same positives and negatives
    eager_losses = ours(images, targets)
    torch.manual_seed(3)
    compiled_losses = compiled(images, targets)
    for k in eager_losses:
        assert_close(compiled_losses[k], eager_losses[k])
    ours.eval()
    with torch.no_grad():
        eager = ours(images)
        comp = compiled(images)
    for e, c in zip(eager, comp):
        for k in ("boxes", "labels", "scores", "masks"):
            assert_close(c[k], e[k])
