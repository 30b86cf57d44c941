"""torch.library.opcheck on every custom op: schema, fake (meta) kernel against the real one,
autograd registration, AOT dispatch with dynamic shapes — over float32, float16/bfloat16,
empty and channels_last samples, on the reference path and on the Triton interpreter."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import kernels  # noqa: F401  (registers the ops)

OPS = torch.ops.maskrcnn_triton
CL = torch.channels_last


def _rois():
    return torch.tensor([[0.0, 0.5, 0.5, 6.0, 7.0], [1.0, 1.0, 0.0, 4.0, 3.0]])


def _boxes(n=20):
    xy = torch.rand(n, 2) * 20
    return torch.cat([xy, xy + 5], 1)


def _leaf(t, dtype=torch.float32, fmt=torch.contiguous_format):
    return t.to(dtype).contiguous(memory_format=fmt).requires_grad_()


def _pyramid(dtype=torch.float32, fmt=torch.contiguous_format):
    feats = [_leaf(torch.randn(1, 3, 16, 16), dtype, fmt),
             _leaf(torch.randn(1, 3, 8, 8), dtype, fmt)]
    rois = torch.tensor([[0.0, 1.0, 2.0, 30.0, 20.0], [0.0, 0.0, 0.0, 3.0, 4.0]])
    return feats, rois, [0.5, 0.25], 1, 2, 224.0, 4.0, 1e-6, 2, 2, 2


LABELS = torch.tensor([0, 2])


def _image(masks):
    """One image's (proposals, gt masks, gt labels, matched indices) lists."""
    return ([torch.tensor([[0.5, 1.0, 8.0, 7.5], [2.0, 0.0, 5.0, 9.0]])], [masks],
            [torch.tensor([2, 0])], [torch.tensor([1, 0])])

SAMPLES = {
    "roi_align": [
        lambda: (_leaf(torch.randn(2, 3, 8, 8)), _rois(), 1.0, 2, 2, -1, False),
        lambda: (_leaf(torch.randn(2, 3, 8, 8), torch.bfloat16, CL), _rois(), 0.5, 2, 3, 2, True),
        lambda: (_leaf(torch.randn(2, 3, 8, 8), torch.float16), _rois()[:0], 1.0, 2, 2, -1, False),
    ],
    "roi_align_backward": [
        lambda: (torch.randn(2, 3, 2, 2), _rois(), 1.0, 2, 2, -1, False, 2, 3, 8, 8, False),
        lambda: (torch.randn(2, 3, 2, 2).bfloat16(), _rois(), 1.0, 2, 2, -1, True, 2, 3, 8, 8,
                 True),
    ],
    "multiscale_roi_align": [
        lambda: _pyramid(),
        lambda: _pyramid(torch.bfloat16, CL),
    ],
    "multiscale_roi_align_backward": [
        lambda: (torch.randn(2, 3, 2, 2), *_pyramid()[1:], 1, 3, [16, 8], [16, 8],
                 [False, False]),
        lambda: (torch.randn(2, 3, 2, 2).half(), *_pyramid()[1:], 1, 3, [16, 8], [16, 8],
                 [True, True]),
    ],
    "nms": [
        lambda: (_boxes(), torch.rand(20), 0.5, -1),
        lambda: (_boxes().half(), torch.rand(20).half(), 0.3, 20),
        lambda: (_boxes()[:0], torch.rand(0), 0.5, -1),
    ],
    "batched_nms": [
        lambda: (_boxes(), torch.rand(20), torch.randint(0, 3, (20,)), 0.5, -1),
        lambda: (_boxes().bfloat16(), torch.rand(20), torch.randint(0, 3, (20,)), 0.5, -1),
    ],
    "batched_nms_mask": [
        lambda: (_boxes(), torch.rand(20), torch.randint(0, 3, (20,)), 0.5),
        lambda: (_boxes()[:0], torch.rand(0), torch.zeros(0, dtype=torch.long), 0.5),
    ],
    "mask_loss": [
        lambda: (_leaf(torch.randn(2, 3, 4, 4)), torch.rand(2, 4, 4), LABELS, True),
        lambda: (_leaf(torch.randn(2, 3, 4, 4), torch.bfloat16, CL), torch.rand(2, 4, 4) > 0.5,
                 LABELS, True),
    ],
    "mask_loss_backward": [
        lambda: (torch.tensor(1.0), torch.rand(2, 4, 4), LABELS, 3, False, torch.float32),
        lambda: (torch.tensor(2.0), torch.rand(2, 4, 4), LABELS, 3, True, torch.bfloat16),
    ],
    "maskrcnn_loss": [
        lambda: (_leaf(torch.randn(2, 3, 4, 4)), *_image(torch.rand(2, 9, 11) > 0.5), True),
        lambda: (_leaf(torch.randn(2, 3, 4, 4), torch.bfloat16),
                 *_image((torch.rand(2, 9, 11) > 0.5).to(torch.uint8)), True),
    ],
    "mask_predictor_loss": [
        lambda: (_leaf(torch.randn(2, 5, 4, 4)), _leaf(torch.randn(3, 5, 1, 1)),
                 _leaf(torch.randn(3)), torch.rand(2, 4, 4), LABELS, True),
        lambda: (_leaf(torch.randn(2, 5, 4, 4), torch.float16, CL),
                 _leaf(torch.randn(3, 5, 1, 1), torch.float16),
                 _leaf(torch.randn(3), torch.float16), torch.rand(2, 4, 4), LABELS, True),
    ],
    "maskrcnn_predictor_loss": [
        lambda: (_leaf(torch.randn(2, 5, 4, 4)), _leaf(torch.randn(3, 5, 1, 1)),
                 _leaf(torch.randn(3)), *_image((torch.rand(2, 9, 11) > 0.5).to(torch.uint8)),
                 True),
        lambda: (_leaf(torch.randn(2, 5, 4, 4), torch.bfloat16, CL),
                 _leaf(torch.randn(3, 5, 1, 1), torch.bfloat16),
                 _leaf(torch.randn(3), torch.bfloat16), *_image(torch.rand(2, 9, 11) > 0.5),
                 True),
    ],
    "mask_predictor_loss_backward": [
        lambda: (torch.tensor(1.0), torch.randn(2, 5, 4, 4), torch.randn(3, 5, 1, 1), LABELS,
                 torch.rand(2, 16)),
    ],
    "paste_masks_in_image": [
        lambda: (torch.rand(2, 1, 4, 4), _boxes(2), 12, 14, 1, None, torch.float32),
        lambda: (torch.rand(2, 1, 4, 4).bfloat16(), _boxes(2), 12, 14, 2, 0.5, torch.bool),
        lambda: (torch.rand(0, 1, 4, 4), _boxes(0), 12, 14, 1, None, torch.float32),
    ],
}


def test_every_custom_op_has_samples():
    registered = {n for n in dir(OPS) if not n.startswith("_") and n != "name"}
    assert registered == set(SAMPLES)


@pytest.mark.parametrize("name, index", [(name, i) for name, samples in SAMPLES.items()
                                         for i in range(len(samples))])
def test_opcheck(backend, name, index):
    args = SAMPLES[name][index]()
    result = opcheck(getattr(OPS, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_on_the_cpu_path(monkeypatch):
    """The CPU path (torchvision's kernels, PyTorch's fused BCE) against the same fakes."""
    from kernels import _utils
    monkeypatch.setattr(_utils, "INTERPRET", False)
    for name, samples in SAMPLES.items():
        for make in samples:
            result = opcheck(getattr(OPS, name).default, make())
            assert all(v == "SUCCESS" for v in result.values()), (name, result)
