"""Mask pasting: parity with torchvision's roi_heads.paste_masks_in_image, thresholding,
dtypes, layouts, empty input, boxes partly or wholly outside the image, bad input."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import kernels
from conftest import tol


def random_boxes(n: int, height: int, width: int, device="cpu") -> torch.Tensor:
    """(n, 4) float32 boxes, cycling through: inside, partly outside at the top/left,
    partly outside at the bottom/right, tiny (< 1 px), zero-size, larger than the image.
    Every box meets the image (torchvision's paste fails on boxes wholly outside)."""
    size = torch.tensor([width, height], dtype=torch.float32)
    kind = torch.arange(n)[:, None] % 6
    r1, r2 = torch.rand(n, 2), torch.rand(n, 2)
    lo = torch.where(kind == 0, r1 * 0.6 * size, torch.zeros(n, 2))
    hi = torch.where(kind == 0, lo + 1 + r2 * 0.35 * size, torch.zeros(n, 2))
    lo = torch.where(kind == 1, -r1 * 0.3 * size, lo)                  # top/left outside
    hi = torch.where(kind == 1, 1 + r2 * 0.5 * size, hi)
    lo = torch.where(kind == 2, (0.5 + 0.4 * r1) * size, lo)           # bottom/right outside
    hi = torch.where(kind == 2, size * (1 + 0.3 * r2), hi)
    lo = torch.where(kind >= 3, 1 + r1 * (size - 3), lo)               # tiny / zero-size
    hi = torch.where(kind == 3, lo + r2, hi)
    hi = torch.where(kind == 4, lo, hi)
    lo = torch.where(kind == 5, -r1 * 0.5 * size, lo)                  # larger than image
    hi = torch.where(kind == 5, size * (1 + 0.5 * r2), hi)
    return torch.cat([lo, hi], 1).to(device)


def tv_reference(masks, boxes, img_shape, padding=1):
    """torchvision's paste in float32 (its loop needs no dtype support of ours)."""
    return tv_paste(masks.float().cpu(), boxes.float().cpu(), img_shape, padding)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_parity_with_torchvision(backend, poison, padding):
    n, m, h, w = 12, 6, 19, 27
    masks = torch.rand(n, 1, m, m, device=backend.device)
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w), padding)
    assert out.shape == (n, 1, h, w) and out.dtype == torch.float32
    assert_close(out.cpu(), tv_reference(masks, boxes, (h, w), padding), **tol(torch.float32))


@pytest.mark.parametrize("padding", [1, 2])
def test_integer_box_arithmetic_matches_torchvision(backend, poison, padding):
    # Coordinates on a quarter-pixel grid, negative ones included: the expanded box's
    # float32 rounding and its truncation toward zero decide which pixels a mask covers.
    n, m, h, w = 16, 5, 14, 22
    size = torch.tensor([w, h])
    lo = (torch.rand(n, 2) * (size - 2 + 3) * 4).floor() / 4 - 3  # in [-3, size - 2)
    hi = lo.clamp(min=0) + torch.randint(0, 40, (n, 2)).float() / 4  # meets the image
    boxes = torch.cat([lo, hi], 1).to(backend.device)
    masks = torch.rand(n, 1, m, m, device=backend.device) + 0.5
    out = kernels.paste_masks_in_image(masks, boxes, (h, w), padding)
    assert_close(out.cpu(), tv_reference(masks, boxes, (h, w), padding), **tol(torch.float32))


def test_boxes_wholly_outside_paste_nothing(backend, poison):
    h, w = 9, 13
    inside = random_boxes(3, h, w)
    outside = torch.tensor([[-30.0, 2, -4, 6], [20, 1, 40, 5], [2, -20, 6, -5], [3, 15, 8, 30]])
    boxes = torch.cat([inside, outside]).to(backend.device)
    masks = torch.rand(len(boxes), 1, 4, 4, device=backend.device) + 0.1
    out = kernels.paste_masks_in_image(masks, boxes, (h, w))
    assert_close(out[:3].cpu(), tv_reference(masks[:3], boxes[:3], (h, w)),
                 **tol(torch.float32))
    assert torch.count_nonzero(out[3:]) == 0


def test_boxes_across_tile_boundaries(backend, poison):
    # wide enough for several column tiles of either output kind (256 and 512 pixels)
    h, w = 21, 530
    boxes = torch.tensor([[200.3, 3.5, 300.8, 17.2], [480.0, -2.0, 545.5, 9.0],
                          [-4.0, 10.2, 530.0, 25.0]], device=backend.device)
    masks = torch.rand(3, 1, 6, 6, device=backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w))
    ref = tv_reference(masks, boxes, (h, w))
    assert_close(out.cpu(), ref, **tol(torch.float32))
    binary = kernels.paste_masks_in_image(masks, boxes, (h, w), threshold=0.5)
    sure = (ref - 0.5).abs() > 1e-4
    assert torch.equal(binary.cpu()[sure], (ref > 0.5)[sure])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, poison, dtype):
    n, m, h, w = 6, 7, 16, 21
    masks = torch.rand(n, 1, m, m, device=backend.device).to(dtype)
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w))
    assert out.dtype == dtype
    assert_close(out.float().cpu(), tv_reference(masks, boxes, (h, w)), **tol(dtype))


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.bool),
                                              (torch.float32, torch.uint8),
                                              (torch.bfloat16, torch.bool)])
def test_threshold_in_the_same_pass(backend, poison, dtype, out_dtype):
    n, m, h, w = 8, 6, 17, 23
    masks = torch.rand(n, 1, m, m, device=backend.device).to(dtype)
    boxes = random_boxes(n, h, w, backend.device)
    threshold = 0.25 + 0.5 * torch.rand(()).item()
    out = kernels.paste_masks_in_image(masks, boxes, (h, w), 2, threshold=threshold,
                                       out_dtype=out_dtype)
    assert out.shape == (n, 1, h, w) and out.dtype == out_dtype
    ref = tv_reference(masks, boxes, (h, w), 2)
    expected = (ref.to(dtype) > threshold).to(out_dtype)
    # pixels within rounding of the threshold may go either way
    sure = (ref - threshold).abs() > tol(dtype)["atol"] * 2
    # the compared pixels hold both outcomes, so a constant output cannot pass
    assert expected[sure].bool().any() and not expected[sure].bool().all()
    assert torch.equal(out.cpu()[sure], expected[sure])
    assert set(out.view(torch.uint8).unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_masks(backend, poison, layout):
    n, m, h, w = 5, 6, 15, 18
    base = torch.rand(n, 2, m * 2, m, device=backend.device)
    masks = base[:, :1, ::2] if layout == "strided" else base[:, 1:, :m].transpose(2, 3)
    assert not masks.is_contiguous()
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w))
    assert_close(out.cpu(), tv_reference(masks, boxes, (h, w)), **tol(torch.float32))


def test_non_square_masks(backend, poison):
    # torchvision's expansion factor comes from the mask width for both axes
    n, h, w = 6, 13, 17
    masks = torch.rand(n, 1, 4, 7, device=backend.device)
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w), 2)
    assert_close(out.cpu(), tv_reference(masks, boxes, (h, w), 2), **tol(torch.float32))


def test_out_dtype(backend, poison):
    n, m, h, w = 4, 5, 11, 14
    masks = torch.rand(n, 1, m, m, device=backend.device)
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (h, w), out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert_close(out.float().cpu(), tv_reference(masks, boxes, (h, w)), **tol(torch.float16))


def test_float64_and_box_dtypes(backend, poison):
    # float64 masks run the reference path; float64/float16 boxes take torchvision's
    # arithmetic in their own dtype (the host expands them)
    n, m, h, w = 6, 5, 12, 16
    masks = torch.rand(n, 1, m, m, device=backend.device, dtype=torch.float64)
    boxes = random_boxes(n, h, w, backend.device)
    out = kernels.paste_masks_in_image(masks, boxes.double(), (h, w))
    assert out.dtype == torch.float64
    assert_close(out.cpu(), tv_paste(masks.cpu(), boxes.double().cpu(), (h, w), 1),
                 **tol(torch.float64))
    out = kernels.paste_masks_in_image(masks.float(), boxes.half(), (h, w))
    assert_close(out.cpu(), tv_paste(masks.float().cpu(), boxes.half().cpu(), (h, w), 1),
                 **tol(torch.float32))


def test_empty(backend, poison):
    masks = torch.zeros(0, 1, 28, 28, device=backend.device)
    boxes = torch.zeros(0, 4, device=backend.device)
    out = kernels.paste_masks_in_image(masks, boxes, (7, 9))
    assert out.shape == (0, 1, 7, 9) and out.dtype == torch.float32
    assert out.shape == tv_paste(masks.cpu(), boxes.cpu(), (7, 9)).shape
    out = kernels.paste_masks_in_image(masks, boxes, (7, 9), threshold=0.5)
    assert out.shape == (0, 1, 7, 9) and out.dtype == torch.bool


def test_no_gradient():
    masks = torch.rand(2, 1, 4, 4, requires_grad=True)
    out = kernels.paste_masks_in_image(masks, random_boxes(2, 8, 8), (8, 8))
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


def test_torch_compile_fullgraph():
    masks = torch.rand(5, 1, 6, 6)
    boxes = random_boxes(5, 12, 15)

    def f(m, b):
        return kernels.paste_masks_in_image(m, b, (12, 15), threshold=0.5).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(masks, boxes), f(masks, boxes))


def test_opcheck():
    masks = torch.rand(3, 1, 5, 5)
    boxes = random_boxes(3, 9, 11)
    for threshold, out_dtype in [(None, torch.float32), (0.5, torch.bool)]:
        torch.library.opcheck(torch.ops.maskrcnn_triton.paste_masks_in_image.default,
                              (masks, boxes, 9, 11, 1, threshold, out_dtype))


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything is launched.

def _m(n=2):
    return torch.rand(n, 1, 5, 5)


def _b(n=2):
    return torch.tensor([[1.0, 1, 4, 4]]).repeat(n, 1)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.paste_masks_in_image(_m()[:, 0], _b(), (8, 8)), ValueError, "masks"),
    (lambda: kernels.paste_masks_in_image(torch.rand(2, 3, 5, 5), _b(), (8, 8)), ValueError,
     "masks"),
    (lambda: kernels.paste_masks_in_image(torch.rand(2, 1, 0, 5), _b(), (8, 8)), ValueError,
     "masks"),
    (lambda: kernels.paste_masks_in_image(_m().long(), _b(), (8, 8)), TypeError, "masks"),
    (lambda: kernels.paste_masks_in_image("masks", _b(), (8, 8)), TypeError, "masks"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(3), (8, 8)), ValueError, "boxes"),
    (lambda: kernels.paste_masks_in_image(_m(), _b()[:, :3], (8, 8)), ValueError, "boxes"),
    (lambda: kernels.paste_masks_in_image(_m(), _b()[None], (8, 8)), ValueError, "boxes"),
    (lambda: kernels.paste_masks_in_image(_m(), _b().long(), (8, 8)), TypeError, "boxes"),
    (lambda: kernels.paste_masks_in_image(_m(), _b().to("meta"), (8, 8)), ValueError,
     "device"),
    (lambda: kernels.paste_masks_in_image(_m(), _b() * float("nan"), (8, 8)), ValueError,
     "finite"),
    (lambda: kernels.paste_masks_in_image(_m(), _b() * float("inf"), (8, 8)), ValueError,
     "finite"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 0)), ValueError, "img_shape"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8, 3)), TypeError, "img_shape"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), "8x8"), TypeError, "img_shape"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8), padding=-1), ValueError,
     "padding"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8), padding=1.5), TypeError,
     "padding"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8), threshold="0.5"), TypeError,
     "threshold"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8), threshold=0.5,
                                          out_dtype=torch.float32), TypeError, "out_dtype"),
    (lambda: kernels.paste_masks_in_image(_m(), _b(), (8, 8), out_dtype=torch.bool),
     TypeError, "out_dtype"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
