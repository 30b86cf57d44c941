"""mask_loss and maskrcnn_loss: parity with F.binary_cross_entropy_with_logits and
torchvision's maskrcnn_loss, in value and gradient; dtypes, layouts, extreme logits, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from conftest import tol

HALF = [torch.float16, torch.bfloat16]


def oracle_mask_loss(logits, targets, labels):
    """Loss and logits gradient by autograd through the PyTorch formula, in float32/64."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.detach().to(dtype).requires_grad_()
    n = x.shape[0]
    loss = F.binary_cross_entropy_with_logits(x[torch.arange(n), labels], targets.to(dtype))
    loss.backward()
    return loss.detach(), x.grad


def run_mask_loss(logits, targets, labels):
    x = logits.detach().clone().requires_grad_()
    loss = kernels.mask_loss(x, targets, labels)
    loss.backward()
    return loss.detach(), x.grad


def soft_targets(n, m, kind="float", device="cpu"):
    t = torch.rand(n, m, m, device=device)
    if kind == "float":
        return t
    if kind == "bool":
        return t > 0.5
    if kind == "uint8":
        return (t > 0.5).to(torch.uint8)
    return t.to(kind)


# ---------------------------------------------------------------------------------------
# mask_loss

@pytest.mark.parametrize("n, k, m", [(1, 1, 14), (1, 91, 28), (13, 2, 28), (13, 91, 14),
                                     (256, 2, 28)])
def test_mask_loss_parity(backend, poison, n, k, m):
    logits = torch.randn(n, k, m, m, device=backend.device) * 3
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    loss, grad = run_mask_loss(logits, targets, labels)
    ref, ref_grad = oracle_mask_loss(logits, targets, labels)
    assert loss.shape == () and grad.shape == logits.shape
    assert_close(loss, ref, **tol(torch.float32))
    # the gradient is (sigmoid - t) / (N M M): compare it unscaled so tolerances bite
    count = n * m * m
    assert_close(grad * count, ref_grad * count, **tol(torch.float32))


@pytest.mark.parametrize("dtype", HALF)
def test_mask_loss_half_precision(backend, poison, dtype):
    n, k, m = 13, 5, 14
    logits = (torch.randn(n, k, m, m, device=backend.device) * 4).to(dtype)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    loss, grad = run_mask_loss(logits, targets, labels)
    ref, ref_grad = oracle_mask_loss(logits, targets, labels)
    # PyTorch's dtype rule: float32 targets promote the loss, targets of the logits' dtype not
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert kernels.mask_loss(logits, targets.to(dtype), labels).dtype == dtype
    count = n * m * m
    assert_close(loss.float(), ref, **tol(dtype))
    assert_close(grad.float() * count, ref_grad * count, **tol(dtype))


@pytest.mark.parametrize("kind", ["bool", "uint8", torch.float16, torch.bfloat16,
                                  torch.float64])
def test_mask_loss_target_dtypes(backend, poison, kind):
    n, k, m = 6, 3, 14
    logits = torch.randn(n, k, m, m, device=backend.device)
    targets = soft_targets(n, m, kind, backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    loss, grad = run_mask_loss(logits, targets, labels)
    ref, ref_grad = oracle_mask_loss(logits, targets.float(), labels)
    assert loss.dtype == (torch.float64 if kind == torch.float64 else torch.float32)
    assert_close(loss.float(), ref, **tol(torch.float32))
    assert_close(grad * n * m * m, ref_grad * n * m * m, **tol(torch.float32))


def test_mask_loss_extreme_logits(backend, poison):
    n, k, m = 8, 3, 14
    logits = torch.randn(n, k, m, m, device=backend.device).sign() * 100
    logits[0] = 30 * torch.randn(k, m, m)
    logits[1, :, 0, 0] = 1e-3
    targets = soft_targets(n, m, device=backend.device)
    targets[2:5] = targets[2:5].round()           # hard 0/1 targets, right and wrong sign
    labels = torch.randint(0, k, (n,), device=backend.device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        loss, grad = run_mask_loss(logits.to(dtype), targets, labels)
        ref, ref_grad = oracle_mask_loss(logits.double(), targets.double(), labels)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(loss.double(), ref, **tol(dtype))
        assert_close(grad.double() * n * m * m, ref_grad * n * m * m, **tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_mask_loss_layouts(backend, poison, layout):
    n, k, m = 5, 4, 14
    base = torch.randn(n, 2 * k, m, m, device=backend.device)
    logits = (base.contiguous(memory_format=torch.channels_last)[:, :k]
              if layout == "channels_last" else base[:, ::2])
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    targets = soft_targets(n, m, device=backend.device).transpose(1, 2)
    labels = torch.randint(0, k, (n,), device=backend.device, dtype=torch.int32)
    loss, grad = run_mask_loss(logits, targets, labels)
    ref, ref_grad = oracle_mask_loss(logits, targets, labels.long())
    assert_close(loss, ref, **tol(torch.float32))
    assert_close(grad * n * m * m, ref_grad * n * m * m, **tol(torch.float32))
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


def test_mask_loss_scales_grad_output(backend, poison):
    n, k, m = 4, 3, 14
    logits = torch.randn(n, k, m, m, device=backend.device, requires_grad=True)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    scale = torch.randn(()).item() * 10
    (kernels.mask_loss(logits, targets, labels) * scale).backward()
    _, ref_grad = oracle_mask_loss(logits, targets, labels)
    assert_close(logits.grad, ref_grad * scale, **tol(torch.float32))


def test_mask_loss_no_grad(backend, poison):
    n, k, m = 3, 2, 14
    logits = torch.randn(n, k, m, m, device=backend.device, requires_grad=True)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    with torch.no_grad():
        loss = kernels.mask_loss(logits, targets, labels)
    assert_close(loss, oracle_mask_loss(logits, targets, labels)[0], **tol(torch.float32))


def test_mask_loss_empty(backend):
    for k in (0, 3):
        logits = torch.randn(0, k, 14, 14, device=backend.device, requires_grad=True)
        loss = kernels.mask_loss(logits, torch.zeros(0, 14, 14, device=backend.device),
                                 torch.zeros(0, dtype=torch.long, device=backend.device))
        assert loss.shape == () and loss.item() == 0 and loss.requires_grad
        loss.backward()
        assert logits.grad.shape == logits.shape


def test_mask_loss_gradcheck_float64():
    n, k, m = 3, 4, 5
    logits = torch.randn(n, k, m, m, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(n, m, m, dtype=torch.float64)
    labels = torch.randint(0, k, (n,))
    assert torch.autograd.gradcheck(lambda x: kernels.mask_loss(x, targets, labels), (logits,))


def test_mask_loss_torch_compile_fullgraph():
    n, k, m = 4, 3, 6
    logits = torch.randn(n, k, m, m, requires_grad=True)
    targets = torch.rand(n, m, m)
    labels = torch.randint(0, k, (n,))

    def f(x):
        return kernels.mask_loss(x, targets, labels) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(compiled(logits), logits)
    (g_ref,) = torch.autograd.grad(f(logits), logits)
    assert_close(compiled(logits), f(logits))
    assert_close(g, g_ref)


# ---------------------------------------------------------------------------------------
# maskrcnn_loss

def random_instances(images, n_per_image, k, m_hw, mask_kind, device):
    """Per-image proposals (inside, partly outside, tiny, zero-size), gt masks, labels, idxs."""
    proposals, masks, labels, idxs = [], [], [], []
    for i, n in enumerate(n_per_image):
        h, w = m_hw[i]
        g = max(1, (n + 1) // 2)
        x1 = torch.rand(n) * w * 1.2 - 0.2 * w
        y1 = torch.rand(n) * h * 1.2 - 0.2 * h
        bw = torch.rand(n) * w * 0.8
        bh = torch.rand(n) * h * 0.8
        bw[::5] = 0.3                       # thinner than one pixel
        bh[1::7] = 0.0                      # zero height
        proposals.append(torch.stack([x1, y1, x1 + bw, y1 + bh], 1).to(device))
        soft = torch.rand(g, h, w)
        masks.append((soft > 0.5 if mask_kind == "bool" else
                       (soft > 0.5).to(torch.uint8) if mask_kind == "uint8" else
                       soft.to(mask_kind)).to(device))
        labels.append(torch.randint(0, k, (g,), device=device))
        idxs.append(torch.randint(0, g, (n,), device=device))
    return proposals, masks, labels, idxs


def run_maskrcnn(backend, logits, *inst):
    x = logits.detach().clone().requires_grad_()
    loss = kernels.maskrcnn_loss(x, *inst)
    loss.backward()
    xt = logits.detach().float().requires_grad_()
    proposals, masks, labels, idxs = inst
    ref = tv_maskrcnn_loss(xt, [p.float() for p in proposals],
                           [mk.float() if mk.dtype in HALF else mk for mk in masks], labels, idxs)
    ref.backward()
    return loss.detach(), x.grad, ref.detach(), xt.grad


@pytest.mark.parametrize("n_per_image, k, m, mask_kind", [
    ((1,), 1, 14, "uint8"),
    ((7, 6), 91, 14, "bool"),
    ((9, 0, 4), 2, 28, torch.float32),
    ((40, 23), 2, 14, "uint8"),
])
def test_maskrcnn_loss_parity_with_torchvision(backend, poison, n_per_image, k, m, mask_kind):
    sizes = [(37, 45), (23, 61), (50, 31)][:len(n_per_image)]
    inst = random_instances(len(n_per_image), n_per_image, k, sizes, mask_kind, backend.device)
    n = sum(n_per_image)
    logits = torch.randn(n, k, m, m, device=backend.device) * 2
    loss, grad, ref, ref_grad = run_maskrcnn(backend, logits, *inst)
    assert_close(loss, ref, **tol(torch.float32))
    assert_close(grad * n * m * m, ref_grad * n * m * m, **tol(torch.float32))


@pytest.mark.parametrize("dtype", HALF)
def test_maskrcnn_loss_half_precision(backend, poison, dtype):
    inst = random_instances(2, (5, 3), 4, [(30, 20), (17, 25)], dtype, backend.device)
    logits = torch.randn(8, 4, 14, 14, device=backend.device).to(dtype)
    loss, grad, ref, ref_grad = run_maskrcnn(backend, logits, *inst)
    assert loss.dtype == tv_maskrcnn_loss(logits, *inst).dtype and grad.dtype == dtype
    assert_close(loss.float(), ref, **tol(dtype))
    assert_close(grad.float() * 8 * 196, ref_grad * 8 * 196, **tol(dtype))


def test_maskrcnn_loss_channels_last(backend, poison):
    inst = random_instances(1, (6,), 3, [(25, 30)], "uint8", backend.device)
    logits = torch.randn(6, 3, 14, 14, device=backend.device).contiguous(
        memory_format=torch.channels_last)
    loss, grad, ref, ref_grad = run_maskrcnn(backend, logits, *inst)
    assert_close(loss, ref, **tol(torch.float32))
    assert_close(grad * 6 * 196, ref_grad * 6 * 196, **tol(torch.float32))


def test_maskrcnn_loss_empty(backend):
    logits = torch.randn(0, 3, 14, 14, device=backend.device, requires_grad=True)
    inst = random_instances(2, (0, 0), 3, [(10, 12), (8, 9)], "uint8", backend.device)
    loss = kernels.maskrcnn_loss(logits, *inst)
    ref = tv_maskrcnn_loss(logits, *inst)
    assert_close(loss, ref)
    loss.backward()
    assert logits.grad.shape == logits.shape


def test_maskrcnn_loss_gradcheck_float64():
    inst = random_instances(2, (2, 1), 2, [(12, 9), (7, 11)], torch.float64, "cpu")
    logits = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kernels.maskrcnn_loss(x, *inst), (logits,))
    assert_close(kernels.maskrcnn_loss(logits, *inst),
                 tv_maskrcnn_loss(logits, [p.double() for p in inst[0]], *inst[1:]))


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything is launched.

def _logits(n=2, k=3, m=4):
    return torch.randn(n, k, m, m)


def _t(n=2, m=4):
    return torch.rand(n, m, m)


def _lab(*v):
    return torch.tensor(v or (0, 1))


_BOX = [torch.tensor([[0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0]])]
_MASK = [torch.zeros(1, 5, 5, dtype=torch.uint8)]


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.mask_loss(_logits(), _t(), _lab(0, 3)), ValueError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(), _lab(-1, 0)), ValueError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(), _lab(0, 1, 1)), ValueError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(), _lab().float()), TypeError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(), _lab().bool()), TypeError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(), _lab()[:, None]), ValueError, "gt_labels"),
    (lambda: kernels.mask_loss(_logits(), _t(3), _lab()), ValueError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), _t(2, 5), _lab()), ValueError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), _t() + 1.5, _lab()), ValueError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), _t() - 1, _lab()), ValueError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), _t() * float("nan"), _lab()), ValueError,
     "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), _t().long(), _lab()), TypeError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits(), "masks", _lab()), TypeError, "gt_masks"),
    (lambda: kernels.mask_loss(_logits().long(), _t(), _lab()), TypeError, "mask_logits"),
    (lambda: kernels.mask_loss(_logits()[:, :, :3], _t(), _lab()), ValueError, "mask_logits"),
    (lambda: kernels.mask_loss(_logits()[0], _t(), _lab()), ValueError, "mask_logits"),
    (lambda: kernels.mask_loss(_logits(), _t().to("meta"), _lab()), ValueError, "device"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, _MASK, [_lab(3)], [_lab(0, 0)]),
     ValueError, r"gt_labels\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, _MASK, [_lab(0)], [_lab(0, 1)]),
     ValueError, r"mask_matched_idxs\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, _MASK, [_lab(0)], [_lab(0, 0).float()]),
     TypeError, r"mask_matched_idxs\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(3), _BOX, _MASK, [_lab(0)], [_lab(0, 0)]),
     ValueError, "mask_logits"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, [torch.rand(1, 5, 5) * 2], [_lab(0)],
                                   [_lab(0, 0)]), ValueError, r"gt_masks\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, [torch.zeros(5, 5)], [_lab(0)],
                                   [_lab(0, 0)]), ValueError, r"gt_masks\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX, _MASK * 2, [_lab(0)], [_lab(0, 0)]),
     ValueError, "gt_masks"),
    (lambda: kernels.maskrcnn_loss(_logits(), [torch.zeros(2, 5)], _MASK, [_lab(0)],
                                   [_lab(0, 0)]), ValueError, r"proposals\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), [_BOX[0] * float("inf")], _MASK, [_lab(0)],
                                   [_lab(0, 0)]), ValueError, r"proposals\[0\]"),
    (lambda: kernels.maskrcnn_loss(_logits(), _BOX[0], _MASK, [_lab(0)], [_lab(0, 0)]),
     TypeError, "proposals"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_targets_an_ulp_past_one_are_accepted():
    """RoI Align of a 0/1 mask can round to 1 + ulp; that is a valid target, 1.5 is not."""
    t = _t()
    t[0, 0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    logits = _logits()
    loss = kernels.mask_loss(logits, t, _lab())
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[torch.arange(2), _lab()], t)
    assert_close(loss, ref)
