"""The model: torchvision weight compatibility and parity, training, fine-tuning recipe.

Speed (the suite runs on a 2-core CPU, under TRITON_INTERPRET=1 in the project's test
command, where every kernel op on CPU tensors goes through Triton's interpreter): images are
small (<= 160 px) and proposal counts are cut. The ResNet-50 parity test and the training
tests run under ``reference_path()`` (the kernels' PyTorch path): they check the model's
composition and training logic, and a ResNet-50 through the interpreter takes minutes.
``test_kernel_path_matches_torchvision_ops`` runs the kernels themselves (interpreter on
CPU) inside a narrow model, against the same model built on torchvision's ops.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

import torch.utils._pytree as pytree
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import maskrcnn
from kernels import _utils
from kernels._utils import reference_path
from maskrcnn.data import SyntheticShapes, collate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def r50_pair():
    small = dict(min_size=128, max_size=160, rpn_pre_nms_top_n_test=200,
                 rpn_post_nms_top_n_test=40, box_score_thresh=0.0, box_detections_per_img=20)
    torch.manual_seed(1234)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **small).eval()
    ours = maskrcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **small).eval()
    return tv, ours


def test_resnet50_state_dict_is_torchvisions(r50_pair):
    tv, ours = r50_pair
    assert list(ours.state_dict()) == list(tv.state_dict())
    result = ours.load_state_dict(tv.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # and the other way round
    tv.load_state_dict(ours.state_dict(), strict=True)


def test_resnet50_eval_parity_with_torchvision(r50_pair):
    tv, ours = r50_pair
    # fresh random weights for every parameter, shared by both models
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(-0.1, 0.1)
        # BatchNorm running stats too, so the backbone is not near-identity
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(tv.state_dict(), strict=True)
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 128)]
    with torch.no_grad(), reference_path():
        expected = tv(images)
        got = ours(images)
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0
        g = _order_score_ties_as(g, e)
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        assert g["masks"].shape == e["masks"].shape
        gm, em = g["masks"][:, 0] > 0.5, e["masks"][:, 0] > 0.5
        inter = (gm & em).flatten(1).sum(1).float()
        union = (gm | em).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert iou.min() > 0.99, iou.min()
        torch.testing.assert_close(g["masks"], e["masks"], rtol=1e-3, atol=1e-3)


def _order_score_ties_as(got: dict, expected: dict, tol: float = 1e-5) -> dict:
    """``got`` with detections whose scores tie ``expected``'s within float rounding put in
    ``expected``'s order (their relative order is rounding, not semantics): each position
    takes, among the not yet placed detections scored within ``tol`` of the expected one,
    the one with the closest box. Detections with distinct scores never move."""
    n = len(got["scores"])
    assert n == len(expected["scores"]), (n, len(expected["scores"]))
    order, free = [], list(range(n))
    for i in range(n):
        near = [j for j in free if abs(float(got["scores"][j] - expected["scores"][i])) <= tol]
        j = min(near or free[:1], key=lambda j: float(
            (got["boxes"][j] - expected["boxes"][i]).abs().max()))
        order.append(j)
        free.remove(j)
    idx = torch.tensor(order, dtype=torch.long)
    return {k: v[idx] for k, v in got.items()}


def _assert_same_detections(got, expected):
    """Same detections image by image; an image without detections compares nothing, so
    every image must have some (box_score_thresh=0 keeps them)."""
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g["masks"], e["masks"], rtol=1e-3, atol=1e-3)


def test_kernel_path_matches_torchvision_ops(backend):
    # the default op set (kernels: on each backend) vs torchvision's ops, in one narrow
    # model with the same weights: eval detections, training losses and gradients
    kw = dict(fpn_channels=8, representation_size=16, mask_layers=(8, 8, 8, 8),
              mask_dim_reduced=8, rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=12,
              rpn_pre_nms_top_n_train=30, rpn_post_nms_top_n_train=12,
              box_batch_size_per_image=8, box_score_thresh=0.0, box_detections_per_img=4)
    torch.manual_seed(7)
    ours = _tiny_model(**kw)
    ref = _tiny_model(ops="torchvision", **kw)
    ref.load_state_dict(ours.state_dict())
    dev = backend.device
    ours, ref = ours.to(dev), ref.to(dev)
    images = [torch.rand(3, 64, 80, device=dev)]
    with torch.no_grad():
        _assert_same_detections(ours.eval()(images), ref.eval()(images))
    _, target = SyntheticShapes(1, image_size=64, seed=9)[0]
    target = {k: v.to(dev) for k, v in target.items()}
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dev)
    losses = []
    for model in (ours, ref):
        torch.manual_seed(3)  # same proposal sampling
        loss_dict = model.train()([image], [target])
        sum(loss_dict.values()).backward()
        losses.append(loss_dict)
    for k in losses[1]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_ops_argument_swaps_every_op():
    model = maskrcnn.maskrcnn_resnet18_fpn(num_classes=3, ops="torchvision", fpn_channels=32,
                                           representation_size=64)
    ref = maskrcnn.TORCHVISION
    assert model.rpn.nms is ref.batched_nms
    assert model.roi_heads.nms is ref.batched_nms
    assert model.roi_heads.mask_loss is ref.maskrcnn_predictor_loss
    assert model.transform.paste_masks is ref.paste_masks_in_image
    assert type(model.roi_heads.box_roi_pool) is ref.multiscale_roi_align
    with pytest.raises(ValueError, match="ops"):
        maskrcnn.maskrcnn_resnet18_fpn(num_classes=3, ops="nope")
    with pytest.raises(TypeError, match="box_scor_thresh"):
        maskrcnn.maskrcnn_resnet18_fpn(num_classes=3, box_scor_thresh=0.1)


def test_fused_mask_loss_matches_torchvision_formula():
    # the op the training path uses vs torchvision's maskrcnn_loss on conv2d logits
    c, k, m = 8, 5, 14
    feats = torch.randn(7, c, m, m, dtype=torch.float64, requires_grad=True)
    w = torch.randn(k, c, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, dtype=torch.float64, requires_grad=True)
    proposals, masks, labels, idxs = [], [], [], []
    for n, (h, wd) in zip((4, 3), ((30, 41), (25, 19))):
        xy = torch.rand(n, 2, dtype=torch.float64) * torch.tensor([wd, h]) * 0.6
        wh = torch.rand(n, 2, dtype=torch.float64) * torch.tensor([wd, h]) * 0.4 + 1
        proposals.append(torch.cat([xy, xy + wh], 1))
        masks.append((torch.rand(2, h, wd) > 0.5).to(torch.uint8))
        labels.append(torch.randint(0, k, (2,)))
        idxs.append(torch.randint(0, 2, (n,)))
    inst = (proposals, masks, labels, idxs)
    ours = maskrcnn.KERNELS.maskrcnn_predictor_loss(feats, w, b, *inst)
    g1 = torch.autograd.grad(ours, (feats, w, b))
    ref = maskrcnn.TORCHVISION.maskrcnn_predictor_loss(feats, w, b, *inst)
    g2 = torch.autograd.grad(ref, (feats, w, b))
    torch.testing.assert_close(ours, ref)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e)


def _tiny_model(num_classes=4, **kw):
    # a narrow ResNet-18-FPN with few proposals: fast enough for a few CPU steps
    args = dict(num_classes=num_classes, fpn_channels=32, representation_size=64,
                mask_layers=(32, 32, 32, 32), mask_dim_reduced=32, min_size=96, max_size=96,
                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                box_batch_size_per_image=32, rpn_batch_size_per_image=64,
                rpn_anchor_generator=maskrcnn.builders.small_anchor_generator(),
                box_detections_per_img=10)
    args.update(kw)
    return maskrcnn.maskrcnn_resnet18_fpn(**args)


def test_training_steps_lower_the_loss():
    data = SyntheticShapes(num_images=4, image_size=96, seed=3)
    images, targets = collate([data[i] for i in range(4)])
    model = _tiny_model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    with reference_path():
        for _ in range(8):
            loss_dict = model(images, targets)
            assert set(loss_dict) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                                      "loss_box_reg", "loss_mask"}
            loss = sum(loss_dict.values())
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert min(losses[-3:]) < losses[0] * 0.8, losses
    # every parameter that trains got a gradient (the fused mask loss reaches the predictor)
    pred = model.roi_heads.mask_predictor.mask_fcn_logits
    assert pred.weight.grad is not None and pred.weight.grad.abs().sum() > 0


def test_training_never_copies_gt_masks():
    """The mask loss samples its targets from the uint8 gt masks on the Triton path: inside
    the RoI heads no float tensor of a gt mask's size and no (N, M, M) target appears
    (torchvision's maskrcnn_loss makes both)."""
    if not _utils.INTERPRET:
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    data = SyntheticShapes(num_images=2, image_size=96, seed=5)
    images, targets = collate([data[i] for i in range(2)])
    # torchvision's ops but our mask loss: only the loss runs through the interpreter
    ops = dataclasses.replace(maskrcnn.TORCHVISION, name="mixed",
                              maskrcnn_predictor_loss=kernels.maskrcnn_predictor_loss)
    model = _tiny_model(ops=ops).train()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen.append(tuple(t.shape))
            return out

    masks = []
    mode = Record()
    def enter(module, args, kwargs):
        masks.extend(t["masks"] for t in kwargs.get("targets", args[-1]))
        mode.__enter__()

    model.roi_heads.register_forward_pre_hook(enter, with_kwargs=True)
    model.roi_heads.register_forward_hook(lambda *_: mode.__exit__(None, None, None))
    loss = sum(model(images, targets).values())
    mask_sizes = {tuple(m.shape[-2:]) for m in masks}
    assert masks and all(m.dtype == torch.uint8 for m in masks)
    assert seen and not [s for s in seen if len(s) >= 2 and s[-2:] in mask_sizes]
    size = model.roi_heads.mask_roi_pool.output_size[0] * 2
    assert not [s for s in seen if s[-2:] == (size, size) and len(s) in (3, 4)
                and (len(s) == 3 or s[1] == 1)]
    loss.backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool])
def test_transform_resizes_masks_as_uint8_like_torchvision(mask_dtype):
    """Our transform's targets equal torchvision's GeneralizedRCNNTransform's (same random
    size draw), while no float copy of the gt masks is made."""
    kw = dict(min_size=(64, 80, 96), max_size=120, image_mean=[0.485, 0.456, 0.406],
              image_std=[0.229, 0.224, 0.225])
    ours = maskrcnn.model.DetectionTransform(paste_masks=None, **kw).train()
    ref = GeneralizedRCNNTransform(**kw).train()
    images = [torch.rand(3, 97, 131), torch.rand(3, 50, 41)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
                "masks": (torch.rand(3, *im.shape[-2:]) > 0.5).to(mask_dtype)} for im in images]
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend(tuple(t.shape) for t in pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.is_floating_point())
            return out

    for _ in range(3):
        state = torch.random.get_rng_state()
        with Record():
            batch, out = ours(images, targets)
        torch.random.set_rng_state(state)
        ref_batch, ref_out = ref(images, targets)
        assert torch.equal(batch.tensors, ref_batch.tensors)
        for o, r in zip(out, ref_out):
            assert o["masks"].dtype == r["masks"].dtype == torch.uint8
            assert torch.equal(o["masks"], r["masks"]) and torch.equal(o["boxes"], r["boxes"])
    assert not [s for s in seen if len(s) == 4 and s[0] == 3 and s[1] == 1]


def test_eval_output_format_and_bool_masks():
    model = _tiny_model(box_score_thresh=0.0, mask_threshold=0.5).eval()
    images = [torch.rand(3, 80, 100), torch.rand(3, 96, 96)]
    with reference_path(), torch.no_grad():
        out = model(images)
    for o, img in zip(out, images):
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["labels"].dtype == torch.int64
        assert o["scores"].shape == (n,)
        assert o["masks"].dtype == torch.bool
        assert o["masks"].shape == (n, 1, *img.shape[-2:])


def test_fine_tuning_recipe():
    torch.manual_seed(0)
    model = _tiny_model(num_classes=91)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maskrcnn.replace_predictors(model, num_classes=3)
    heads = model.roi_heads
    assert heads.box_predictor.cls_score.out_features == 3
    assert heads.box_predictor.bbox_pred.out_features == 12
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 3
    # everything but the two predictors is kept
    for k, v in model.state_dict().items():
        if "box_predictor" not in k and "mask_predictor" not in k:
            assert torch.equal(v, before[k]), k
    data = SyntheticShapes(num_images=2, image_size=96, seed=5, num_classes=2)
    images, targets = collate([data[0], data[1]])
    model.train()
    with reference_path():
        losses = model(images, targets)
        sum(losses.values()).backward()
    assert heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    model.eval()
    with reference_path(), torch.no_grad():
        out = model(images)
    assert all(bool((o["labels"] < 3).all()) for o in out)


def test_resnet50_loads_a_local_torchvision_state_dict(r50_pair, tmp_path):
    # the offline route to the official weights: torch.save(tv.state_dict()) -> weights=path
    tv, _ = r50_pair
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(tv.state_dict(), path)
    model = maskrcnn.maskrcnn_resnet50_fpn(weights=str(path), min_size=128, max_size=160)
    loaded = model.state_dict()
    for k, v in tv.state_dict().items():
        if not k.endswith("num_batches_tracked"):  # FrozenBatchNorm2d has no counter
            assert torch.equal(loaded[k], v), k
    # loaded weights freeze BatchNorm, as torchvision does for pretrained models
    assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
    with pytest.raises(FileNotFoundError, match="weights file"):
        maskrcnn.maskrcnn_resnet50_fpn(weights=str(tmp_path / "missing.pth"))


def test_images_without_instances_train():
    data = SyntheticShapes(1, image_size=64, seed=8)
    image, target = data[0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    model = _tiny_model(min_size=64, max_size=64).train()
    with reference_path():
        losses = model([image, image], [empty, empty])
        assert float(losses["loss_mask"]) == 0 and float(losses["loss_box_reg"]) == 0
        sum(losses.values()).backward()
        losses = model([image, image], [target, empty])
    assert float(losses["loss_mask"]) > 0
