"""The op benchmarks through pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Same inputs as the ``bench_*`` modules (their builders), one representative shape per op,
each provider (ours, torchvision) as its own benchmark so pytest-benchmark's comparison
table puts them side by side. On CUDA each call is synchronized. Benchmarks never assert
time; each checks ours against torchvision once before timing.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import kernels
from benchmarks import bench_mask_loss, bench_multiscale_roi_align, bench_paste_masks_in_image
from benchmarks import bench_roi_align

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEVICE == "cpu"  # smaller shapes on the CPU, where ours is the reference path


def synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(params=["ours", "torchvision"])
def provider(request):
    return request.param


def test_roi_align(benchmark, provider):
    x, rois = bench_roi_align.make_inputs(16 if SMALL else 4, torch.float32, DEVICE,
                                          rois_per_image=64 if SMALL else 512)
    fn = kernels.roi_align if provider == "ours" else torchvision.ops.roi_align
    args = (7, 1 / (16 if SMALL else 4), 2, False)
    torch.testing.assert_close(kernels.roi_align(x, rois, *args),
                               torchvision.ops.roi_align(x, rois, *args), rtol=1e-5, atol=1e-5)
    benchmark.group = "roi_align forward"
    benchmark(synced(lambda: fn(x, rois, *args)))


def test_multiscale_roi_align(benchmark, provider):
    x, boxes, shapes = bench_multiscale_roi_align.make_inputs(
        2, 64 if SMALL else 512, torch.float32, DEVICE)
    names = list(x)
    ours = kernels.MultiScaleRoIAlign(names, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    torch.testing.assert_close(ours(x, boxes, shapes), theirs(x, boxes, shapes),
                               rtol=1e-5, atol=1e-5)
    pool = ours if provider == "ours" else theirs
    benchmark.group = "MultiScaleRoIAlign forward"
    benchmark(synced(lambda: pool(x, boxes, shapes)))


def test_batched_nms(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    n = 2000 if SMALL else 20000
    xy = torch.rand(n, 2, generator=g) * 800
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 1], 1).to(DEVICE)
    scores = torch.rand(n, generator=g).to(DEVICE)
    idxs = torch.randint(0, 80, (n,), generator=g).to(DEVICE)
    fn = kernels.batched_nms if provider == "ours" else torchvision.ops.batched_nms
    assert torch.equal(kernels.batched_nms(boxes, scores, idxs, 0.5),
                       torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    benchmark.group = "batched_nms 80 classes"
    benchmark(synced(lambda: fn(boxes, scores, idxs, 0.5)))


def test_mask_loss(benchmark, provider):
    logits, targets, labels = bench_mask_loss.make_instances(
        64 if SMALL else 512, 91, torch.float32, DEVICE)[:3]
    fn = kernels.mask_loss if provider == "ours" else bench_mask_loss.torch_mask_loss
    torch.testing.assert_close(kernels.mask_loss(logits, targets, labels),
                               bench_mask_loss.torch_mask_loss(logits, targets, labels))
    logits.requires_grad_()

    def step():
        fn(logits, targets, labels).backward()
        logits.grad = None
    benchmark.group = "mask_loss forward+backward"
    benchmark(synced(step))


def test_paste_masks_in_image(benchmark, provider):
    image = bench_paste_masks_in_image.IMAGE
    masks, boxes = bench_paste_masks_in_image.make_inputs(
        bench_paste_masks_in_image.MASKS, image, torch.float32, DEVICE)[:2]
    fn = kernels.paste_masks_in_image if provider == "ours" else tv_paste
    torch.testing.assert_close(kernels.paste_masks_in_image(masks, boxes, image),
                               tv_paste(masks, boxes, image), rtol=1e-5, atol=1e-5)
    benchmark.group = "paste 100 masks"
    benchmark(synced(lambda: fn(masks, boxes, image)))
