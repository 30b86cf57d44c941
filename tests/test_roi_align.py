"""RoI Align: parity with torchvision.ops.roi_align, gradients, layouts, dtypes, bad input."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.testing import assert_close

import kernels
from conftest import tol
from kernels._utils import deterministic_algorithms


def random_rois(k: int, n: int, height: int, width: int, scale: float,
                device="cpu") -> torch.Tensor:
    """(k, 5) boxes in image coordinates: inside, partly and wholly outside, zero-size."""
    img_h, img_w = height / scale, width / scale
    x1 = torch.rand(k) * img_w * 1.6 - 0.3 * img_w
    y1 = torch.rand(k) * img_h * 1.6 - 0.3 * img_h
    bw = torch.rand(k) * img_w * 0.7
    bh = torch.rand(k) * img_h * 0.7
    kind = torch.arange(k) % 5
    bw = torch.where(kind == 3, torch.zeros_like(bw), bw)        # zero width
    bh = torch.where(kind == 4, torch.zeros_like(bh), bh)        # zero height
    x1 = torch.where(kind == 2, -x1.abs() - bw - 2 / scale, x1)  # wholly left of the map
    batch = torch.randint(0, n, (k,)).float()
    return torch.stack([batch, x1, y1, x1 + bw, y1 + bh], 1).to(device)


def run_both(backend, x, rois, output_size, scale, sampling, aligned, grad=None):
    """(ours, torchvision) outputs and input gradients; torchvision runs in float32."""
    xo = x.detach().clone().requires_grad_()
    out = kernels.roi_align(xo, rois, output_size, scale, sampling, aligned)
    xt = x.detach().float().contiguous().requires_grad_()
    ref = torchvision.ops.roi_align(xt, rois.float(), output_size, scale, sampling, aligned)
    if grad is None:
        grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    return out, ref, xo.grad, xt.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 32])
def test_parity_with_torchvision(backend, poison, aligned, sampling, scale):
    n, c, h, w = 2, 3, 11, 13
    x = torch.randn(n, c, h, w, device=backend.device)
    rois = random_rois(7, n, h, w, scale, backend.device)
    for output_size in [(3, 3), (2, 5)]:
        out, ref, g, gref = run_both(backend, x, rois, output_size, scale, sampling, aligned)
        assert out.shape == (7, c, *output_size)
        assert_close(out, ref, **tol(torch.float32))
        assert_close(g, gref, **tol(torch.float32))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [-1, 2])
def test_float32_forward_is_torchvisions_bit_for_bit(backend, poison, aligned, sampling):
    """Measured, not assumed: the interpreter evaluates the coordinate arithmetic as
    torchvision's CPU kernel does, so on the CPU the outputs are identical. On CUDA both
    compilers contract it into FMAs, each its own way: measured on an H200 (Triton 3.6),
    outputs differ by up to 8.3e-7 (a few float32 ulps), so there the bound is 4 ulps."""
    if not backend.triton:
        pytest.skip("the reference path sums samples in another order (a sparse product)")
    x = torch.randn(2, 4, 13, 17, device=backend.device)
    rois = random_rois(9, 2, 13, 17, 0.5, backend.device)
    out = kernels.roi_align(x, rois, (5, 4), 0.5, sampling, aligned)
    ref = torchvision.ops.roi_align(x, rois, (5, 4), 0.5, sampling, aligned)
    if backend.device == "cpu":
        assert torch.equal(out, ref), (out - ref).abs().max()
    else:
        ulp = torch.finfo(torch.float32).eps * ref.abs().clamp(min=1.0)
        assert ((out - ref).abs() <= 4 * ulp).all(), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, poison, dtype):
    n, c, h, w = 2, 5, 9, 17
    x = torch.randn(n, c, h, w, device=backend.device).to(dtype)
    rois = random_rois(6, n, h, w, 0.5, backend.device)
    out, ref, g, gref = run_both(backend, x, rois, 4, 0.5, -1, True)
    assert out.dtype == dtype and g.dtype == dtype
    assert_close(out.float(), ref, **tol(dtype))
    assert_close(g.float(), gref, **tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, poison, layout):
    n, c, h, w = 3, 6, 10, 7
    base = torch.randn(n, c * 2, h, w, device=backend.device)
    x = (base.contiguous(memory_format=torch.channels_last)[:, :c] if layout == "channels_last"
         else base[:, ::2])
    assert not x.is_contiguous()
    rois = random_rois(8, n, h, w, 1.0, backend.device)
    out, ref, g, gref = run_both(backend, x, rois, (2, 3), 1.0, 2, False)
    assert_close(out, ref, **tol(torch.float32))
    assert_close(g, gref, **tol(torch.float32))


def test_channels_last_gradient_keeps_layout(backend):
    x = torch.randn(2, 4, 6, 6, device=backend.device).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    rois = random_rois(3, 2, 6, 6, 1.0, backend.device)
    kernels.roi_align(x, rois, 2).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_list_boxes_match_tensor_boxes(backend, poison):
    n, c, h, w = 3, 4, 8, 9
    x = torch.randn(n, c, h, w, device=backend.device)
    boxes = [random_rois(k, 1, h, w, 1.0, backend.device)[:, 1:] for k in (2, 0, 5)]
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    out_list = kernels.roi_align(x, boxes, (3, 2), 1.0, 2)
    assert_close(out_list, kernels.roi_align(x, rois, (3, 2), 1.0, 2))
    assert_close(out_list, torchvision.ops.roi_align(x, boxes, (3, 2), 1.0, 2),
                 **tol(torch.float32))


def test_empty_boxes(backend):
    x = torch.randn(2, 3, 5, 5, device=backend.device, requires_grad=True)
    out = kernels.roi_align(x, torch.zeros(0, 5, device=backend.device), (4, 2))
    assert out.shape == (0, 3, 4, 2)
    out.sum().backward()
    assert_close(x.grad, torch.zeros_like(x))
    out = kernels.roi_align(x, [torch.zeros(0, 4, device=backend.device)] * 2, 3)
    assert out.shape == (0, 3, 3, 3)


def test_module_matches_functional(backend):
    x = torch.randn(1, 2, 6, 6, device=backend.device)
    rois = random_rois(4, 1, 6, 6, 0.5, backend.device)
    m = kernels.RoIAlign((2, 2), 0.5, 2, aligned=True)
    assert "aligned=True" in repr(m)
    assert_close(m(x, rois), kernels.roi_align(x, rois, 2, 0.5, 2, True))


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_float64(aligned):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = random_rois(4, 2, 5, 6, 1.0).double()
    assert torch.autograd.gradcheck(
        lambda t: kernels.roi_align(t, rois, (2, 3), 1.0, -1, aligned), (x,))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = random_rois(5, 2, 8, 8, 1.0)

    def f(inp, r):
        return kernels.roi_align(inp, r, (2, 2), 1.0, 2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, rois)
    (g,) = torch.autograd.grad(loss, x)
    loss_ref = f(x, rois)
    (g_ref,) = torch.autograd.grad(loss_ref, x)
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything is launched.

def _x():
    return torch.randn(2, 3, 5, 5)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.roi_align(_x(), torch.zeros(3, 4), 2), ValueError, "boxes"),
    (lambda: kernels.roi_align(_x(), torch.zeros(3, 5, 1), 2), ValueError, "boxes"),
    (lambda: kernels.roi_align(_x(), [torch.zeros(3, 5)] * 2, 2), ValueError, r"boxes\[0\]"),
    (lambda: kernels.roi_align(_x(), [torch.zeros(3, 4)], 2), ValueError, "batch size"),
    (lambda: kernels.roi_align(_x(), torch.tensor([[2., 0, 0, 1, 1]]), 2), ValueError,
     "batch indices"),
    (lambda: kernels.roi_align(_x(), torch.tensor([[-1., 0, 0, 1, 1]]), 2), ValueError,
     "batch indices"),
    (lambda: kernels.roi_align(_x(), torch.tensor([[0.5, 0, 0, 1, 1]]), 2), ValueError,
     "batch indices"),
    (lambda: kernels.roi_align(_x(), torch.tensor([[0., 0, float("nan"), 1, 1]]), 2),
     ValueError, "finite"),
    (lambda: kernels.roi_align(torch.randn(3, 5, 5), torch.zeros(1, 5), 2), ValueError,
     "input"),
    (lambda: kernels.roi_align(_x(), torch.zeros(1, 5), (2, -1)), ValueError, "output_size"),
    (lambda: kernels.roi_align(_x(), torch.zeros(1, 5), "7"), TypeError, "output_size"),
    (lambda: kernels.roi_align(_x().long(), torch.zeros(1, 5), 2), TypeError, "input"),
    (lambda: kernels.roi_align(_x(), torch.zeros(1, 5, dtype=torch.long), 2), TypeError,
     "boxes"),
    (lambda: kernels.roi_align(_x(), torch.zeros(1, 5, device="meta"), 2), ValueError,
     "device"),
    (lambda: kernels.roi_align(_x(), "boxes", 2), TypeError, "boxes"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------
# Deterministic backward (torch.use_deterministic_algorithms(True)): no float atomics.

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sampling", [-1, 2])
def test_deterministic_backward_parity_and_bitwise_repeats(backend, poison, layout,
                                                           sampling):
    n, c, h, w = 2, 5, 9, 11
    x = torch.randn(n, c, h, w, device=backend.device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    # many overlapping RoIs, so pixels receive contributions from several programs
    rois = random_rois(12, n, h, w, 0.5, backend.device)
    grad = torch.randn(12, c, 3, 3, device=backend.device)
    xt = x.detach().contiguous().requires_grad_()
    torchvision.ops.roi_align(xt, rois, 3, 0.5, sampling, True).backward(grad)
    grads = []
    with deterministic_algorithms():
        for _ in range(3):
            xo = x.detach().clone().requires_grad_()
            kernels.roi_align(xo, rois, 3, 0.5, sampling, True).backward(grad)
            grads.append(xo.grad)
    assert_close(grads[0], xt.grad, **tol(torch.float32))
    for g in grads[1:]:
        assert torch.equal(g, grads[0])
    if layout == "channels_last":
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_deterministic_backward_half(backend, poison):
    x = torch.randn(1, 3, 6, 7, device=backend.device, dtype=torch.bfloat16,
                    requires_grad=True)
    rois = random_rois(5, 1, 6, 7, 1.0, backend.device)
    grad = torch.randn(5, 3, 2, 2, device=backend.device)
    with deterministic_algorithms():
        kernels.roi_align(x, rois, 2, 1.0, 2).backward(grad.bfloat16())
    # torchvision's kernel as the oracle: under deterministic algorithms torchvision runs
    # CUDA tensors through a Python fallback that differs from its kernel for boxes
    # reaching past the map (measured on an H200; on the CPU that fallback,
    # torchvision.ops.roi_align._roi_align, differs from the CPU kernel the same way)
    xt = x.detach().float().requires_grad_()
    torchvision.ops.roi_align(xt, rois, 2, 1.0, 2).backward(grad)
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad.float(), xt.grad, **tol(torch.bfloat16))
