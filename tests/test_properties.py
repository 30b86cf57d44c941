"""Property-based tests (hypothesis): every public op against torchvision or its formula.

Shapes include 0, 1 and primes; dtypes float32/float16/bfloat16; boxes inside, outside and
degenerate. Each example runs on the PyTorch reference path and, under TRITON_INTERPRET=1
(or on CUDA), through the Triton kernels. Example counts are kept small for the
interpreter; set HYPOTHESIS_PROFILE=thorough for a longer search.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import kernels
from conftest import backend_selected, tol
from kernels._utils import INTERPRET, reference_path

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SIZES = st.sampled_from([1, 2, 3, 5, 7, 11])


pytestmark = pytest.mark.multi_backend


def paths():
    """(name, device, context) for every path the ops take on this machine (those selected
    by TEST_BACKENDS, when set)."""
    out = [("reference", "cpu", reference_path)]
    if INTERPRET:
        out.append(("interpreter", "cpu", contextlib.nullcontext))
    if torch.cuda.is_available():
        out.append(("cuda", "cuda", contextlib.nullcontext))
    selected = [p for p in out if backend_selected(p[0])]
    if not selected:   # never pass on nothing
        pytest.skip("none of the selected backends (TEST_BACKENDS) runs on this machine")
    return selected


def leaf(t: torch.Tensor, device: str, channels_last: bool = False) -> torch.Tensor:
    """A fresh leaf copy on device (never the caller's tensor: paths must not share grads)."""
    t = t.detach().to(device).clone()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_()


@st.composite
def boxes_xyxy(draw, k: int, width: float, height: float):
    """k boxes: inside, partly or wholly outside, zero-size or inverted."""
    rows = []
    for _ in range(k):
        kind = draw(st.sampled_from(["inside", "outside", "zero", "inverted", "any"]))
        x1 = draw(st.floats(-0.5 * width, 1.5 * width, width=32))
        y1 = draw(st.floats(-0.5 * height, 1.5 * height, width=32))
        bw = draw(st.floats(0, width, width=32))
        bh = draw(st.floats(0, height, width=32))
        if kind == "inside":
            x1, y1 = abs(x1) % width, abs(y1) % height
        elif kind == "outside":
            x1 = -x1 - bw - 2 if x1 >= 0 else x1 - bw - 2
        elif kind == "zero":
            bw = 0.0
        elif kind == "inverted":
            bw, bh = -bw, -bh
        rows.append([x1, y1, x1 + bw, y1 + bh])
    return torch.tensor(rows, dtype=torch.float32).reshape(k, 4)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 2), c=SIZES, h=SIZES, w=SIZES,
       k=st.integers(0, 5), ph=st.integers(1, 3), pw=st.integers(1, 3),
       sampling=st.integers(-1, 3), aligned=st.booleans(),
       scale=st.sampled_from([1.0, 0.5, 0.25]), dtype=DTYPES,
       channels_last=st.booleans())
def test_roi_align_property(data, n, c, h, w, k, ph, pw, sampling, aligned, scale, dtype,
                            channels_last):
    boxes = data.draw(boxes_xyxy(k, w / scale, h / scale))
    batch = torch.tensor([data.draw(st.integers(0, n - 1)) for _ in range(k)]).float()
    rois = torch.cat([batch[:, None], boxes], 1)
    x = torch.randn(n, c, h, w).to(dtype)
    grad = torch.randn(k, c, ph, pw)
    xt = x.float().requires_grad_()
    ref = torchvision.ops.roi_align(xt, rois, (ph, pw), scale, sampling, aligned)
    ref.backward(grad)
    for name, device, ctx in paths():
        with ctx():
            xo = leaf(x, device, channels_last)
            out = kernels.roi_align(xo, rois.to(device), (ph, pw), scale, sampling, aligned)
            out.backward(grad.to(device, dtype))
        assert_close(out.float().cpu(), ref, **tol(dtype), msg=lambda m: f"{name}: {m}")
        # one input pixel can take many samples: scale the tolerance by the sample count
        assert_close(xo.grad.float().cpu(), xt.grad, **tol(dtype, 4),
                     msg=lambda m: f"{name} grad: {m}")


@given(data=st.data(), n=st.sampled_from([0, 1, 2, 7, 31, 64, 67]),
       threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
       classes=st.integers(1, 5), dtype=DTYPES)
def test_nms_property(data, n, threshold, classes, dtype):
    # boxes on a coarse grid, scores from few values: duplicates and exact ties abound
    xy = torch.tensor(data.draw(st.lists(st.integers(0, 8), min_size=2 * n, max_size=2 * n)),
                      dtype=torch.float32).reshape(n, 2) * 4
    wh = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=2 * n, max_size=2 * n)),
                      dtype=torch.float32).reshape(n, 2) * 4
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
                          dtype=torch.float32).to(dtype)
    idxs = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=n,
                                           max_size=n)), dtype=torch.int64)
    ref_keep = torchvision.ops.nms(boxes.float(), scores.float(), threshold)
    ref_batched = torchvision.ops.batched_nms(boxes.float(), scores.float(), idxs, threshold)
    for name, device, ctx in paths():
        with ctx():
            keep = kernels.nms(boxes.to(device), scores.to(device), threshold).cpu()
            batched = kernels.batched_nms(boxes.to(device), scores.to(device),
                                          idxs.to(device), threshold).cpu()
            mask = kernels.batched_nms_mask(boxes.to(device), scores.to(device),
                                            idxs.to(device), threshold).cpu()
        # same kept set; same order up to exactly tied scores (sorted by score, then index)
        assert set(keep.tolist()) == set(ref_keep.tolist()), name
        assert set(batched.tolist()) == set(ref_batched.tolist()), name
        assert torch.equal(scores[keep].float(), scores[ref_keep].float()), name
        assert torch.equal(mask.nonzero().flatten(), batched.sort().values), name


@given(n=st.sampled_from([0, 1, 2, 5]), k=st.integers(1, 4), m=SIZES, dtype=DTYPES,
       data=st.data())
def test_mask_loss_property(n, k, m, dtype, data):
    logits = (torch.randn(n, k, m, m) * data.draw(st.sampled_from([1.0, 10.0, 100.0])))
    logits = logits.to(dtype)
    targets = torch.rand(n, m, m)
    labels = torch.randint(0, k, (n,))
    lt = logits.float().requires_grad_()
    ref = (F.binary_cross_entropy_with_logits(lt[torch.arange(n), labels], targets)
           if n else lt.sum() * 0)
    ref.backward()
    for name, device, ctx in paths():
        with ctx():
            lo = leaf(logits, device)
            loss = kernels.mask_loss(lo, targets.to(device), labels.to(device))
            loss.backward()
        assert_close(loss.float().cpu(), ref.detach(), **tol(dtype),
                     msg=lambda msg: f"{name}: {msg}")
        assert_close(lo.grad.float().cpu(), lt.grad, **tol(dtype),
                     msg=lambda msg: f"{name} grad: {msg}")


@given(data=st.data(), n=st.integers(0, 4), m=st.sampled_from([2, 3, 5, 7]),
       h=st.integers(3, 17), w=st.integers(3, 17), padding=st.integers(0, 2), dtype=DTYPES)
def test_paste_masks_in_image_property(data, n, m, h, w, padding, dtype):
    # torchvision's loop fails on boxes wholly outside the image: every box meets it
    x1 = torch.tensor(data.draw(st.lists(st.floats(-5, w - 1, width=32), min_size=n,
                                         max_size=n)), dtype=torch.float32)
    y1 = torch.tensor(data.draw(st.lists(st.floats(-5, h - 1, width=32), min_size=n,
                                         max_size=n)), dtype=torch.float32)
    bw = torch.tensor(data.draw(st.lists(st.floats(0, 2 * w, width=32), min_size=n,
                                         max_size=n)), dtype=torch.float32)
    bh = torch.tensor(data.draw(st.lists(st.floats(0, 2 * h, width=32), min_size=n,
                                         max_size=n)), dtype=torch.float32)
    boxes = torch.stack([x1, y1, (x1 + bw).clamp(min=0.5), (y1 + bh).clamp(min=0.5)], 1)
    masks = torch.rand(n, 1, m, m).to(dtype)
    ref = tv_paste(masks.float(), boxes, (h, w), padding)
    for name, device, ctx in paths():
        with ctx():
            out = kernels.paste_masks_in_image(masks.to(device), boxes.to(device), (h, w),
                                               padding)
        assert out.shape == (n, 1, h, w)
        assert_close(out.float().cpu(), ref, **tol(dtype), msg=lambda msg: f"{name}: {msg}")


@given(data=st.data(), n=st.integers(1, 2), c=st.sampled_from([1, 3]),
       k=st.integers(0, 6), sampling=st.integers(-1, 2), dtype=DTYPES,
       out=st.sampled_from([(2, 2), (3, 2)]))
def test_multiscale_roi_align_property(data, n, c, k, sampling, dtype, out):
    img = (64, 96)
    names = ["0", "1", "2", "3"]
    x = {name: torch.randn(n, c, img[0] // s, img[1] // s).to(dtype)
         for name, s in zip(names, (4, 8, 16, 32))}
    boxes = [data.draw(boxes_xyxy(k, img[1], img[0])).abs() for _ in range(n)]
    shapes = [img] * n
    xt = {key: v.float().requires_grad_() for key, v in x.items()}
    ref = torchvision.ops.MultiScaleRoIAlign(names, out, sampling)(xt, boxes, shapes)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    for name, device, ctx in paths():
        with ctx():
            xo = {key: leaf(v, device) for key, v in x.items()}
            res = kernels.MultiScaleRoIAlign(names, out, sampling)(
                xo, [b.to(device) for b in boxes], shapes)
            res.backward(grad.to(device, dtype))
            # the functional form: the same pooling, bit for bit
            same = kernels.multiscale_roi_align([xo[k] for k in names],
                                                [b.to(device) for b in boxes], shapes, out,
                                                sampling)
        assert_close(res.float().cpu(), ref, **tol(dtype), msg=lambda m: f"{name}: {m}")
        assert torch.equal(same, res), name
        for key in names:
            assert_close(xo[key].grad.float().cpu(), xt[key].grad, **tol(dtype, 4),
                         msg=lambda m: f"{name} grad {key}: {m}")


@given(n=st.sampled_from([0, 1, 3]), c=st.sampled_from([1, 4]), k=st.integers(1, 4),
       m=st.sampled_from([1, 3, 5]), dtype=DTYPES)
def test_mask_predictor_loss_property(n, c, k, m, dtype):
    feats = torch.randn(n, c, m, m).to(dtype)
    weight = torch.randn(k, c, 1, 1)
    bias = torch.randn(k)
    targets = torch.rand(n, m, m)
    labels = torch.randint(0, k, (n,))
    ft, wt, bt = (t.float().requires_grad_() for t in (feats, weight, bias))
    logits = F.conv2d(ft, wt, bt)
    ref = (F.binary_cross_entropy_with_logits(logits[torch.arange(n), labels], targets)
           if n else logits.sum() * 0)
    ref.backward()
    for name, device, ctx in paths():
        with ctx():
            fo, wo, bo = (leaf(t, device) for t in (feats, weight, bias))
            loss = kernels.mask_predictor_loss(fo, wo, bo, targets.to(device),
                                                     labels.to(device))
            loss.backward()
        scale = 1 if dtype == torch.float32 else 4   # half features feed a C-long sum
        assert_close(loss.float().cpu(), ref.detach(), **tol(dtype, scale),
                     msg=lambda msg: f"{name}: {msg}")
        for got, want in ((fo, ft), (wo, wt), (bo, bt)):
            assert_close(got.grad.float().cpu(), want.grad, **tol(dtype, scale),
                         msg=lambda msg: f"{name} grad: {msg}")


@given(data=st.data(), images=st.integers(1, 2), k=st.integers(1, 3),
       m=st.sampled_from([2, 5]), per_image=st.integers(0, 3))
def test_maskrcnn_loss_property(data, images, k, m, per_image):
    from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_loss
    h, w = 13, 17
    gt_masks = [(torch.rand(2, h, w) > 0.5).to(torch.uint8) for _ in range(images)]
    gt_labels = [torch.randint(1, k + 1, (2,)) for _ in range(images)]
    proposals = [data.draw(boxes_xyxy(per_image, w, h)) for _ in range(images)]
    matched = [torch.randint(0, 2, (per_image,)) for _ in range(images)]
    logits = torch.randn(images * per_image, k + 1, m, m)
    lt = logits.clone().requires_grad_()
    ref = tv_loss(lt, proposals, gt_masks, gt_labels, matched)
    ref.backward()
    for name, device, ctx in paths():
        with ctx():
            lo = leaf(logits, device)
            loss = kernels.maskrcnn_loss(lo, [p.to(device) for p in proposals],
                                         [g.to(device) for g in gt_masks],
                                         [g.to(device) for g in gt_labels],
                                         [i.to(device) for i in matched])
            loss.backward()
        assert_close(loss.cpu(), ref.detach(), **tol(torch.float32),
                     msg=lambda msg: f"{name}: {msg}")
        assert_close(lo.grad.cpu(), lt.grad, **tol(torch.float32),
                     msg=lambda msg: f"{name} grad: {msg}")


@given(data=st.data(), images=st.integers(1, 2), c=st.sampled_from([1, 4]),
       k=st.integers(1, 3), m=st.sampled_from([2, 5]), per_image=st.integers(0, 3))
def test_maskrcnn_predictor_loss_property(data, images, c, k, m, per_image):
    from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_loss
    h, w = 13, 17
    gt_masks = [(torch.rand(2, h, w) > 0.5).to(torch.uint8) for _ in range(images)]
    gt_labels = [torch.randint(0, k, (2,)) for _ in range(images)]
    proposals = [data.draw(boxes_xyxy(per_image, w, h)) for _ in range(images)]
    matched = [torch.randint(0, 2, (per_image,)) for _ in range(images)]
    feats = torch.randn(images * per_image, c, m, m)
    weight = torch.randn(k, c, 1, 1)
    bias = torch.randn(k)
    ft, wt, bt = (t.clone().requires_grad_() for t in (feats, weight, bias))
    ref = tv_loss(F.conv2d(ft, wt, bt), proposals, gt_masks, gt_labels, matched)
    ref.backward()
    for name, device, ctx in paths():
        with ctx():
            fo, wo, bo = (leaf(t, device) for t in (feats, weight, bias))
            loss = kernels.maskrcnn_predictor_loss(
                fo, wo, bo, [p.to(device) for p in proposals], [g.to(device) for g in gt_masks],
                [g.to(device) for g in gt_labels], [i.to(device) for i in matched])
            loss.backward()
        assert_close(loss.cpu(), ref.detach(), **tol(torch.float32),
                     msg=lambda msg: f"{name}: {msg}")
        for got, want in ((fo, ft), (wo, wt), (bo, bt)):
            assert_close(got.grad.cpu(), want.grad, **tol(torch.float32),
                         msg=lambda msg: f"{name} grad: {msg}")


def test_every_op_has_a_property_test():
    """Every forward op registered under torch.ops.maskrcnn_triton is public under its own
    name (one name per op) and called by a property test above: a new op without its
    property test fails here. The list comes from the op registry, not from this file."""
    import inspect
    ops = {name for name in dir(torch.ops.maskrcnn_triton)
           if not name.startswith("_") and name != "name" and not name.endswith("_backward")}
    assert {"roi_align", "nms", "mask_loss"} <= ops          # the registry was read
    properties = "\n".join(inspect.getsource(f) for name, f in globals().items()
                           if name.startswith("test_") and name.endswith("_property"))
    for op in sorted(ops):
        assert op in kernels.__all__, f"custom op {op} has no public function of that name"
        assert f"kernels.{op}(" in properties, f"no property test calls kernels.{op}"
