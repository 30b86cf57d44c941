"""Values nobody checked: on CUDA the public functions read no tensor data by default (as
torchvision's CUDA kernels), so the kernels themselves must stay in bounds and give a
defined result for every value — a RoI whose batch index is out of range, or whose box is
not finite, pools zeros; a loss row whose label, matched index or proposal is invalid adds
no loss and gets no gradient; a huge box costs what the map holds, not what the box asks
for. Each case runs with the checks off (``skip_data_checks``) on every path: the
reference, the Triton interpreter (where an out-of-bounds access reads garbage or ends the
process), the CPU path, and CUDA when present. The oracles are torchvision and PyTorch on
the valid part of the same inputs."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.testing import assert_close
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from kernels import _utils
from conftest import backend_selected, tol


pytestmark = pytest.mark.multi_backend


@pytest.fixture(params=["reference", "interpreter", "cpu path", "cuda"])
def path(request, monkeypatch):
    """The device of every path, checks off throughout: the reference, the Triton
    interpreter, the CPU path (torchvision's C++ kernels, PyTorch's operations, even where
    the suite runs the interpreter) and CUDA; each only where present and selected
    (TEST_BACKENDS: the CPU path goes with the reference)."""
    name = request.param
    if not backend_selected("reference" if name == "cpu path" else name):
        pytest.skip(f"{name}: not among TEST_BACKENDS")
    if name == "interpreter" and not _utils.INTERPRET:
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "cpu path":
        monkeypatch.setattr(_utils, "INTERPRET", False)
    forced = _utils.reference_path() if name == "reference" else contextlib.nullcontext()
    with forced, _utils.skip_data_checks():
        yield "cuda" if name == "cuda" else "cpu"


def _rois(device, batch_index):
    rois = torch.tensor([[0.0, 1.0, 1.5, 9.0, 7.0], [1.0, 0.5, 0.0, 6.0, 11.0],
                         [0.0, 2.0, 2.0, 12.0, 12.0], [1.0, 3.0, 1.0, 5.0, 4.0]],
                        device=device)
    bad = rois.clone()
    bad[1, 0] = batch_index
    bad[3, 3] = float("nan")        # a non-finite box: pools nothing either
    return rois, bad


@pytest.mark.parametrize("batch_index", [7.0, -3.0, 2.0, float("nan"), 1e30])
def test_roi_align_with_an_invalid_batch_index_pools_zeros(path, batch_index):
    x = torch.randn(2, 3, 13, 14, device=path, requires_grad=True)
    rois, bad = _rois(path, batch_index)
    out = kernels.roi_align(x, bad, (3, 4), 0.9, 2)
    expected = torchvision.ops.roi_align(x.detach().cpu(), rois.cpu(), (3, 4), 0.9, 2)
    assert not out[[1, 3]].any()
    assert_close(out[[0, 2]].cpu(), expected[[0, 2]], **tol(torch.float32))
    grad = torch.randn_like(out)
    out.backward(grad)
    xt = x.detach().cpu().requires_grad_()
    torchvision.ops.roi_align(xt, rois[[0, 2]].cpu(), (3, 4), 0.9, 2).backward(
        grad[[0, 2]].cpu())
    assert_close(x.grad.cpu(), xt.grad, **tol(torch.float32))


def test_multiscale_roi_align_with_non_finite_boxes_pools_zeros(path):
    feats = {"0": torch.randn(1, 2, 16, 16, device=path),
             "1": torch.randn(1, 2, 8, 8, device=path)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 25.0], [0.0, float("inf"), 5.0, 9.0],
                           [3.0, 3.0, float("nan"), 20.0]], device=path)]
    out = kernels.MultiScaleRoIAlign(["0", "1"], 2, 2)(feats, boxes, [(32, 32)])
    expected = torchvision.ops.MultiScaleRoIAlign(["0", "1"], 2, 2)(
        {k: v.cpu() for k, v in feats.items()}, [boxes[0][:1].cpu()], [(32, 32)])
    assert not out[1:].any()
    assert_close(out[:1].cpu(), expected, **tol(torch.float32))


def _plane_loss(logits, targets, labels, keep):
    """PyTorch's BCE over the rows ``keep`` only, as a mean over every row's pixels."""
    rows = torch.arange(logits.shape[0])[keep]
    x = logits[rows, labels[keep]]
    return F.binary_cross_entropy_with_logits(x, targets[keep], reduction="sum") / (
        targets.numel())


@pytest.mark.parametrize("label", [9, -1, 1_000_000])
def test_mask_loss_ignores_a_row_whose_label_is_out_of_range(path, label):
    logits = torch.randn(5, 4, 6, 6, device=path, requires_grad=True)
    targets = torch.rand(5, 6, 6, device=path)
    labels = torch.tensor([0, 3, label, 1, 2], device=path)
    loss = kernels.mask_loss(logits, targets, labels)
    loss.backward()
    keep = torch.tensor([True, True, False, True, True])
    y = logits.detach().cpu().requires_grad_()
    expected = _plane_loss(y, targets.cpu(), labels.cpu(), keep)
    expected.backward()
    assert_close(loss.cpu(), expected, **tol(torch.float32))
    assert_close(logits.grad.cpu(), y.grad, **tol(torch.float32))
    assert not logits.grad[2].any()


def test_predictor_loss_ignores_a_row_whose_label_is_out_of_range(path):
    features = torch.randn(4, 5, 6, 6, device=path, requires_grad=True)
    weight = torch.randn(3, 5, 1, 1, device=path, requires_grad=True)
    bias = torch.randn(3, device=path, requires_grad=True)
    targets = torch.rand(4, 6, 6, device=path)
    labels = torch.tensor([0, 2, 70_000, 1], device=path)
    loss = kernels.mask_predictor_loss(features, weight, bias, targets, labels)
    grads = torch.autograd.grad(loss, (features, weight, bias))
    leaves = [t.detach().cpu().requires_grad_() for t in (features, weight, bias)]
    keep = torch.tensor([True, True, False, True])
    expected = _plane_loss(F.conv2d(leaves[0], leaves[1], leaves[2]), targets.cpu(),
                           labels.cpu(), keep)
    expected_grads = torch.autograd.grad(expected, leaves)
    assert_close(loss.cpu(), expected, **tol(torch.float32))
    for got, want in zip(grads, expected_grads):
        assert_close(got.cpu(), want, **tol(torch.float32, 4))


def _image(device):
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 20, 24, generator=g) > 0.5).to(device)
    proposals = torch.tensor([[1.0, 2.0, 15.0, 18.0], [0.0, 0.0, 23.0, 19.0],
                              [4.0, 3.0, 9.0, 11.0], [2.0, 5.0, 20.0, 7.0],
                              [6.0, 1.0, 12.0, 12.0]], device=device)
    return masks, proposals, torch.tensor([1, 2, 0], device=device)


@pytest.mark.parametrize("predictor", [False, True])
def test_maskrcnn_losses_ignore_invalid_matches_and_boxes(path, predictor):
    """A matched index outside the image's gt masks and a non-finite proposal: rows with
    no loss and no gradient, whatever the rest of the batch does."""
    masks, proposals, gt_labels = _image(path)
    matched = torch.tensor([0, 5, 2, 1, 1], device=path)     # row 1: no such mask
    bad = proposals.clone()
    bad[3, 2] = float("inf")                                 # row 3: not finite
    keep = torch.tensor([True, False, True, False, True])
    logits = torch.randn(5, 4, 7, 7, device=path, requires_grad=True)
    if predictor:
        weight = torch.randn(4, 4, 1, 1, device=path)
        features = logits
        loss = kernels.maskrcnn_predictor_loss(features, weight, torch.zeros(4, device=path),
                                               [bad], [masks], [gt_labels], [matched])
    else:
        loss = kernels.maskrcnn_loss(logits, [bad], [masks], [gt_labels], [matched])
    loss.backward()
    y = logits.detach().cpu().requires_grad_()
    x = F.conv2d(y, weight.cpu()) if predictor else y
    rows = keep.nonzero().flatten()
    expected = tv_maskrcnn_loss(x[rows], [proposals.cpu()[rows]], [masks.cpu()],
                                [gt_labels.cpu()], [matched.cpu()[rows]]) * len(rows) / 5
    expected.backward()
    assert_close(loss.cpu(), expected, **tol(torch.float32))
    assert_close(logits.grad.cpu(), y.grad, **tol(torch.float32))
    assert not logits.grad[~keep].any()


def _per_class_nms(boxes, scores, idxs, threshold):
    """torchvision's nms within each class, merged by decreasing score."""
    keep = torch.cat([torch.where(idxs == c)[0][torchvision.ops.nms(
        boxes[idxs == c], scores[idxs == c], threshold)] for c in idxs.unique()])
    return keep[scores[keep].sort(descending=True, stable=True)[1]]


def test_nms_with_nan_boxes_is_torchvisions(path):
    """A NaN coordinate's IoU compares false: the box suppresses nothing and nothing
    suppresses it, in torchvision's nms kernel as in ours; batched_nms is that per class
    (torchvision's own batched_nms offsets every box by the largest coordinate, NaN here,
    and so keeps every box)."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + 10], 1)
    boxes[[3, 17], 1] = float("nan")
    scores = torch.rand(40, generator=g)
    idxs = torch.randint(0, 3, (40,), generator=g)
    d = path
    assert torch.equal(kernels.nms(boxes.to(d), scores.to(d), 0.4).cpu(),
                       torchvision.ops.nms(boxes, scores, 0.4))
    assert torch.equal(kernels.batched_nms(boxes.to(d), scores.to(d), idxs.to(d), 0.4).cpu(),
                       _per_class_nms(boxes, scores, idxs, 0.4))


def test_batched_nms_with_nan_classes_keeps_each_nan_box(path):
    """A NaN class equals no class, not even itself: each NaN-class box is a class of its
    own (kept, suppressing nothing), the other classes as torchvision's nms within each."""
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(60, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + 12], 1)
    scores = torch.rand(60, generator=g)
    idxs = torch.randint(0, 3, (60,), generator=g).float()
    nan = torch.zeros(60, dtype=torch.bool)
    nan[[2, 9, 10, 33, 59]] = True
    idxs[nan] = float("nan")
    finite = torch.where(~nan)[0]
    keep = torch.cat([finite[_per_class_nms(boxes[~nan], scores[~nan], idxs[~nan], 0.3)],
                      torch.where(nan)[0]])
    keep = keep[scores[keep].sort(descending=True, stable=True)[1]]
    d = path
    assert torch.equal(kernels.batched_nms(boxes.to(d), scores.to(d), idxs.to(d), 0.3).cpu(),
                       keep)
    mask = kernels.batched_nms_mask(boxes.to(d), scores.to(d), idxs.to(d), 0.3).cpu()
    assert torch.equal(torch.where(mask)[0], keep.sort()[0])


def test_paste_of_non_finite_and_huge_boxes_stays_in_the_image(path):
    masks = torch.rand(3, 1, 5, 5, device=path)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 8.0], [float("nan"), 0.0, 4.0, 4.0],
                          [-1e30, -5.0, 1e30, 3e9]], device=path)
    out = kernels.paste_masks_in_image(masks, boxes, (10, 12))
    assert out.shape == (3, 1, 10, 12) and torch.isfinite(out).all()
    expected = kernels.paste_masks_in_image(masks[:1], boxes[:1], (10, 12))
    assert torch.equal(out[:1], expected)


def _huge_case(device, width):
    """One RoI far wider than the map, adaptive sampling: ceil(width / bins) samples per bin
    along x, most of them off the map."""
    x = torch.randn(1, 2, 9, 8, device=device)
    rois = torch.tensor([[0.0, -width / 2, -3.0, width / 2, 6.0]], device=device)
    return x, rois


def test_a_huge_box_costs_what_the_map_holds(path):
    """A box 8,000 pixels wide over an 8-pixel map: torchvision visits its 4,000 samples per
    bin (zeros but a few); ours visits those that can land on the map, with torchvision's
    result, value and gradient."""
    x, rois = _huge_case(path, 8000.0)
    xg = x.clone().requires_grad_()
    out = kernels.roi_align(xg, rois, (2, 2), 1.0, -1)
    grad = torch.randn_like(out)
    out.backward(grad)
    xt = x.cpu().requires_grad_()
    expected = torchvision.ops.roi_align(xt, rois.cpu(), (2, 2), 1.0, -1)
    expected.backward(grad.cpu())
    assert_close(out.cpu(), expected, **tol(torch.float32))
    assert_close(xg.grad.cpu(), xt.grad, **tol(torch.float32))
    assert expected.abs().sum() > 0


def _valid_samples(start: float, bin_size: float, grid: float, p: int, size: int,
                   windows) -> int:
    """How many of bin p's samples land in [-1, size] along one axis, by torchvision's
    float32 expression ``start + p * bin + (i + 0.5) * bin / grid``, over sample windows
    that hold every sample near the map (an independent count: NumPy, every sample)."""
    f = np.float32
    i = np.concatenate([np.arange(lo, hi) for lo, hi in windows]).astype(f)
    pos = (f(start) + f(p) * f(bin_size)) + (i + f(0.5)) * f(bin_size) / f(grid)
    return int(((pos >= -1) & (pos <= size)).sum())


def test_a_box_of_a_billion_pixels_finishes(path):
    """torchvision's rule asks ceil(2e9 / 2) = 1e9 samples per bin along x here (its kernels
    would loop for hours); ours visits those that can land on the map. On a map of ones
    each bin is then (samples on the map) / (all samples), counted here over windows of
    the float32 positions near the map."""
    x = torch.ones(1, 1, 9, 8, device=path)
    rois = torch.tensor([[0.0, -1e9, -3.0, 1e9, 6.0]], device=path)
    start = time.perf_counter()
    out = kernels.roi_align(x, rois, (2, 2), 1.0, -1)
    assert time.perf_counter() - start < 60     # not a timing test: a hang guard
    grid_w, grid_h = 1e9, 5.0                   # ceil(2e9 / 2), ceil(9 / 2)
    x_windows = [(0, 4096), (int(grid_w) - 4096, int(grid_w))]
    expected = torch.tensor([[
        _valid_samples(-3.0, 4.5, grid_h, ph, 9, [(0, 5)])
        * _valid_samples(-1e9, 1e9, grid_w, pw, 8, x_windows) / (grid_h * grid_w)
        for pw in range(2)] for ph in range(2)])
    assert expected.min() > 0
    assert_close(out[0, 0].cpu(), expected, rtol=1e-5, atol=0)


def test_a_huge_proposal_samples_its_mask_target_as_torchvision_does(path):
    """A proposal 6,000 pixels wide over a 24-pixel mask: its target is torchvision's (the
    windows of samples that can land on the mask, both bins of the boundary)."""
    masks, proposals, gt_labels = _image(path)
    proposals = proposals.clone()
    proposals[2] = torch.tensor([-3000.0, 3.0, 3000.0, 11.0], device=path)
    matched = torch.tensor([0, 1, 2, 1, 1], device=path)
    logits = torch.randn(5, 4, 7, 7, device=path, requires_grad=True)
    loss = kernels.maskrcnn_loss(logits, [proposals], [masks], [gt_labels], [matched])
    loss.backward()
    y = logits.detach().cpu().requires_grad_()
    expected = tv_maskrcnn_loss(y, [proposals.cpu()], [masks.cpu()], [gt_labels.cpu()],
                                [matched.cpu()])
    expected.backward()
    assert_close(loss.cpu(), expected, **tol(torch.float32))
    assert_close(logits.grad.cpu(), y.grad, **tol(torch.float32))
