"""``train --weights``: fine-tuning from a torchvision state dict or a checkpoint of ours, on a
COCO-format folder this test writes (PNG images and an instances JSON with polygons), then
``evaluate`` and ``predict`` on the result.

Runs on the reference path (``reference_path()``), as test_cli does: these tests check the
weights, the layers that train and the CLI, not the kernels.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import requires_pycocotools
from kernels._utils import reference_path
from maskrcnn import cli, engine

pytestmark = pytest.mark.usefixtures("one_thread")

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]   # ids need not be 1..K


def _run(argv):
    with reference_path():
        return cli.main(argv)


def _coco_folder(root, n=4, size=64, seed=0):
    """n images with one filled square (category 3) and one bar (category 7) each, and
    their instances JSON, polygons written here by hand."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(n):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        shapes = []
        x, y, s = (int(v) for v in rng.integers(4, 24, 3))
        shapes.append((3, x, y, s + 8, s + 8))
        x2, y2 = (int(v) for v in rng.integers(30, 50, 2))
        shapes.append((7, x2, y2, 12, 4))
        for cat, x0, y0, w, h in shapes:
            pixels[y0:y0 + h, x0:x0 + w] = (200, 80 + 40 * (cat == 7), 40)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]})
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": CATEGORIES}))
    return str(root / "images"), str(ann)


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A state dict of torchvision's maskrcnn_resnet50_fpn (91 classes) in the layout of its
    COCO weights: FrozenBatchNorm2d buffers (no num_batches_tracked), running statistics
    that are not the identity."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                            num_classes=91)
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k in state:
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_resnet50_fpn.pth"
    torch.save(state, path)
    return str(path), state


@requires_pycocotools
def test_finetune_from_torchvision_weights_then_evaluate_and_predict(torchvision_weights,
                                                                     tmp_path):
    path, state = torchvision_weights
    images, ann = _coco_folder(tmp_path)
    ckpt_path = str(tmp_path / "tuned.pt")
    assert _run(["train", "--images", images, "--annotations", ann, "--weights", path,
                 "--trainable-layers", "2", "--image-size", "64", "--batch-size", "2",
                 "--max-steps", "2", "--lr", "0.01", "--device", "cpu",
                 "--output", ckpt_path]) == 0
    ckpt = engine.load_checkpoint(ckpt_path)
    config, tuned = ckpt["config"], ckpt["model"]
    assert config["arch"] == "resnet50_fpn" and config["num_classes"] == 3   # 2 + background
    assert [c["name"] for c in config["categories"]] == ["square", "bar"]
    # new predictors sized from the data; everything else came from the file
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    assert tuned["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 12
    assert tuned["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 3
    assert set(tuned) == set(state)
    # --trainable-layers 2: layer3 and layer4 train; conv1, layer1, layer2 and every
    # FrozenBatchNorm2d buffer stay exactly the file's
    frozen = [k for k in state if k.startswith(("backbone.body.conv1", "backbone.body.bn1",
                                                "backbone.body.layer1", "backbone.body.layer2"))
              or "running_" in k or ".bn" in k or "downsample.1" in k]
    assert frozen and all(torch.equal(tuned[k], state[k]) for k in frozen)
    for prefix in ("backbone.body.layer4.", "backbone.body.layer3.", "backbone.fpn.",
                   "rpn.head.", "roi_heads.mask_head."):
        trained = [k for k in state if k.startswith(prefix) and k.endswith("weight")
                   and k not in frozen]
        assert trained and any(not torch.equal(tuned[k], state[k]) for k in trained), prefix

    # the rebuilt model: FrozenBatchNorm2d with torchvision's eps 0 for these weights
    model, _ = engine.model_from_checkpoint(ckpt_path, "cpu")
    norms = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53 and all(m.eps == 0.0 for m in norms)

    out = tmp_path / "eval.json"
    assert _run(["evaluate", "--checkpoint", ckpt_path, "--images", images, "--annotations", ann,
                 "--output", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 4 and set(metrics) >= {"bbox", "segm"}
    pred = tmp_path / "pred"
    assert _run(["predict", "--checkpoint", ckpt_path, f"{images}/0.png", "--output-dir",
                 str(pred), "--score-thresh", "0", "--device", "cpu"]) == 0
    result = json.loads((pred / "0.json").read_text())
    assert (pred / "0.png").is_file() and result["height"] == 64
    assert all(d["name"] in ("square", "bar") for d in result["detections"])


def test_loaded_backbone_computes_torchvisions_features(torchvision_weights):
    # An independent check of the layout: torchvision's own model, given the same weights
    # (its BatchNorm2d in eval mode with eps 0, what FrozenBatchNorm2d with eps 0 computes),
    # and ours built by finetune_model give the same FPN features.
    path, state = torchvision_weights
    model, config = engine.finetune_model(path, 5, [], 64, trainable_layers=3)
    assert config["bn_eps"] == 0.0 and config["num_classes"] == 5
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                            num_classes=91)
    tv.load_state_dict(state, strict=False)   # its num_batches_tracked buffers stay
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 0.0
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = model.eval().backbone(x), tv.eval().backbone(x)
    assert list(ours) == list(theirs)
    for k in ours:   # two float32 formulas of the same norm, through 50 layers
        scale = theirs[k].abs().max().item()
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=1e-4 * scale)
    # trainable_backbone_layers=3, as torchvision's: layer2..layer4 train, the rest do not
    trains = {n.split(".")[2] for n, p in model.named_parameters()
              if n.startswith("backbone.body.") and p.requires_grad}
    assert trains == {"layer2", "layer3", "layer4"}


def test_finetune_from_our_checkpoint(tmp_path):
    # a resnet18_fpn checkpoint trained from scratch (BatchNorm2d) fine-tunes too: its config
    # rebuilds the model, BatchNorm2d becomes FrozenBatchNorm2d with the same statistics
    source = str(tmp_path / "source.pt")
    tiny = ["--num-images", "4", "--image-size", "64", "--batch-size", "2", "--val-images", "0",
            "--device", "cpu", "--max-steps", "1"]
    assert _run(["train", *tiny, "--output", source]) == 0
    tuned = str(tmp_path / "tuned.pt")
    assert _run(["train", *tiny, "--weights", source, "--trainable-layers", "0",
                 "--output", tuned]) == 0
    before, after = engine.load_checkpoint(source), engine.load_checkpoint(tuned)
    assert after["config"]["arch"] == "resnet18_fpn" and after["config"]["bn_eps"] is None
    body = [k for k in after["model"] if k.startswith("backbone.body.")]
    assert body and all(torch.equal(after["model"][k], before["model"][k]) for k in body)
    assert not any(k.endswith("num_batches_tracked") for k in body)


@pytest.mark.parametrize("argv, message", [
    (["--trainable-layers", "2"], "--trainable-layers needs --weights"),
    (["--weights", "WEIGHTS", "--resume", "WEIGHTS"], "give one of them"),
    (["--weights", "WEIGHTS", "--trainable-layers", "6"], "[0, 5]"),
    (["--weights", "GARBAGE"], "cannot read"),
    (["--weights", "MISSING"], "file not found"),
    (["--weights", "OTHER"], "not a Mask R-CNN ResNet-50-FPN state dict"),
])
def test_weights_errors_exit_2_and_name_the_argument(torchvision_weights, tmp_path, capsys,
                                                     argv, message):
    garbage, other = tmp_path / "garbage.pth", tmp_path / "other.pth"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    files = {"WEIGHTS": torchvision_weights[0], "GARBAGE": str(garbage),
             "MISSING": str(tmp_path / "missing.pth"), "OTHER": str(other)}
    argv = [files.get(a, a) for a in argv]
    out = tmp_path / "never.pt"
    assert _run(["train", "--num-images", "2", "--image-size", "64", "--device", "cpu",
                 "--output", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_train_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--weights", "--trainable-layers", "--arch", "--batch-size"):
        assert option in text
