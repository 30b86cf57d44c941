"""mask_predictor_loss: parity with conv2d + gather + BCE (autograd, float32/float64), in
value and every gradient; dtypes, layouts, extreme logits, memory, bad input.
maskrcnn_predictor_loss: parity with torchvision's maskrcnn_loss over conv2d logits (its
own roi_align targets), gradients, memory (no float mask copy, no target tensor), bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.testing import assert_close
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from conftest import tol
from test_mask_loss import _lab, _t, random_instances, soft_targets


def oracle_predictor(features, weight, bias, targets, labels, scale=1.0):
    """conv2d + gather + BCE by autograd in float32 (float64 for float64), with the weights
    rounded to the features' dtype first, as the op does."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.detach().to(dtype).requires_grad_()
    w = weight.detach().to(features.dtype).to(dtype).requires_grad_()
    b = bias.detach().to(features.dtype).to(dtype).requires_grad_()
    n = f.shape[0]
    logits = F.conv2d(f, w, b)
    loss = F.binary_cross_entropy_with_logits(logits[torch.arange(n), labels],
                                              targets.to(dtype))
    (loss * scale).backward()
    return loss.detach(), f.grad, w.grad, b.grad


def run_predictor(features, weight, bias, targets, labels, scale=1.0):
    f, w, b = (t.detach().clone().requires_grad_() for t in (features, weight, bias))
    loss = kernels.mask_predictor_loss(f, w, b, targets, labels)
    (loss * scale).backward()
    return loss.detach(), f.grad, w.grad, b.grad


@pytest.mark.parametrize("n, c, k, m", [(1, 8, 1, 14), (13, 37, 91, 14), (4, 40, 2, 28)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_predictor_parity(backend, poison, n, c, k, m, dtype):
    features = torch.randn(n, c, m, m, device=backend.device).to(dtype)
    weight = torch.randn(k, c, 1, 1, device=backend.device) / c ** 0.5
    bias = torch.randn(k, device=backend.device)
    targets = soft_targets(n, m, "uint8" if n == 4 else "float", backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    loss, gf, gw, gb = run_predictor(features, weight, bias, targets, labels)
    ref, rf, rw, rb = oracle_predictor(features, weight, bias, targets, labels)
    assert loss.dtype == torch.promote_types(dtype, targets.dtype) if targets.is_floating_point() \
        else loss.dtype == dtype
    assert gf.dtype == dtype and gw.dtype == torch.float32
    count = n * m * m
    # fp16/bf16: the reductions over C and over the pixels are long
    t = tol(dtype, 1.0 if dtype == torch.float32 else 2.0)
    assert_close(loss.float(), ref, **t)
    assert_close(gf.float() * count, rf * count, **t)
    assert_close(gw, rw, **t)
    assert_close(gb, rb, **t)


def test_predictor_strided_features(backend, poison):
    """A crop of larger maps (planes that are not one run of pixels) reads each pixel at
    its (h, w) offsets; the gradient lands in the crop only."""
    n, c, k, m = 3, 6, 4, 7
    big = torch.randn(n, c, m + 3, m + 2, device=backend.device, requires_grad=True)
    features = big[:, :, 2:2 + m, 1:1 + m]
    assert features.stride(2) != m * features.stride(3)
    weight = torch.randn(k, c, 1, 1, device=backend.device) / c ** 0.5
    bias = torch.randn(k, device=backend.device)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = kernels.mask_predictor_loss(features, w, b, targets, labels)
    loss.backward()
    ref, rf, rw, rb = oracle_predictor(features, weight, bias, targets, labels)
    assert_close(loss.detach(), ref, **tol(torch.float32))
    count = n * m * m
    assert_close(big.grad[:, :, 2:2 + m, 1:1 + m] * count, rf * count, **tol(torch.float32))
    outside = big.grad.clone()
    outside[:, :, 2:2 + m, 1:1 + m] = 0
    assert not outside.any()
    assert_close(w.grad, rw, **tol(torch.float32))
    assert_close(b.grad, rb, **tol(torch.float32))


def test_predictor_channels_last(backend, poison):
    n, c, k, m = 5, 40, 3, 14
    features = torch.randn(n, c, m, m, device=backend.device).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(k, c, 1, 1, device=backend.device) / c ** 0.5
    bias = torch.randn(k, device=backend.device)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.tensor([0, 2, 2, 1, 2], device=backend.device)
    scale = 3.0 + torch.rand(()).item()   # gradient of the loss != 1
    loss, gf, gw, gb = run_predictor(features, weight, bias, targets, labels, scale)
    ref, rf, rw, rb = oracle_predictor(features, weight, bias, targets, labels, scale)
    assert gf.is_contiguous(memory_format=torch.channels_last)
    assert_close(loss, ref, **tol(torch.float32))
    assert_close(gf * n * m * m, rf * n * m * m, **tol(torch.float32))
    assert_close(gw, rw, **tol(torch.float32))
    assert_close(gb, rb, **tol(torch.float32))


def test_predictor_extreme_logits(backend, poison):
    n, c, k, m = 4, 8, 2, 14
    features = torch.randn(n, c, m, m, device=backend.device).sign() * 25
    weight = torch.ones(k, c, 1, 1, device=backend.device) * 0.5   # logits up to +-100
    bias = torch.zeros(k, device=backend.device)
    targets = soft_targets(n, m, device=backend.device).round()
    labels = torch.randint(0, k, (n,), device=backend.device)
    loss, gf, gw, gb = run_predictor(features, weight, bias, targets, labels)
    ref, rf, rw, rb = oracle_predictor(features.double(), weight.double(), bias.double(),
                                       targets, labels)
    assert all(torch.isfinite(t).all() for t in (loss, gf, gw, gb))
    assert_close(loss.double(), ref, **tol(torch.float32))
    assert_close(gw.double(), rw, **tol(torch.float32))


def test_predictor_never_allocates_logits(backend, monkeypatch):
    """With K > C, nothing the op allocates may reach the (N, K, M, M) logits' size."""
    if backend.reference:
        pytest.skip("the reference path is an oracle, not memory-bound")
    n, c, k, m = 6, 8, 91, 14
    logits_numel = n * k * m * m
    features = torch.randn(n, c, m, m, device=backend.device, requires_grad=True)
    weight = torch.randn(k, c, 1, 1, device=backend.device, requires_grad=True)
    bias = torch.randn(k, device=backend.device, requires_grad=True)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    largest = []
    for name in ("empty", "zeros", "empty_like", "zeros_like", "empty_strided"):
        real = getattr(torch, name)

        def tracked(*a, real=real, **kw):
            t = real(*a, **kw)
            largest.append(t.numel())
            return t
        monkeypatch.setattr(torch, name, tracked)
    if backend.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    kernels.mask_predictor_loss(features, weight, bias, targets, labels).backward()
    if backend.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
        assert peak < logits_numel * 4, f"peak {peak} bytes, logits would be {logits_numel * 4}"
    assert largest and max(largest) < logits_numel
    assert features.grad is not None and weight.grad is not None and bias.grad is not None


def test_predictor_empty(backend):
    features = torch.randn(0, 6, 14, 14, device=backend.device, requires_grad=True)
    weight = torch.randn(3, 6, 1, 1, device=backend.device, requires_grad=True)
    bias = torch.randn(3, device=backend.device, requires_grad=True)
    loss = kernels.mask_predictor_loss(
        features, weight, bias, torch.zeros(0, 14, 14, device=backend.device),
        torch.zeros(0, dtype=torch.long, device=backend.device))
    assert loss.shape == () and loss.item() == 0
    loss.backward()
    for t in (features, weight, bias):
        assert_close(t.grad, torch.zeros_like(t))


def test_predictor_no_grad(backend, poison):
    n, c, k, m = 3, 5, 2, 14
    features = torch.randn(n, c, m, m, device=backend.device, requires_grad=True)
    weight = torch.randn(k, c, 1, 1, device=backend.device, requires_grad=True)
    bias = torch.randn(k, device=backend.device, requires_grad=True)
    targets = soft_targets(n, m, device=backend.device)
    labels = torch.randint(0, k, (n,), device=backend.device)
    with torch.no_grad():
        loss = kernels.mask_predictor_loss(features, weight, bias, targets, labels)
    ref = oracle_predictor(features, weight, bias, targets, labels)[0]
    assert_close(loss, ref, **tol(torch.float32))


def test_predictor_gradcheck_float64():
    n, c, k, m = 4, 3, 3, 4
    features = torch.randn(n, c, m, m, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, c, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(n, m, m, dtype=torch.float64)
    labels = torch.tensor([0, 2, 0, 1])
    assert torch.autograd.gradcheck(
        lambda f, w, b: kernels.mask_predictor_loss(f, w, b, targets, labels),
        (features, weight, bias))


def test_predictor_torch_compile_fullgraph():
    n, c, k, m = 3, 4, 2, 6
    features = torch.randn(n, c, m, m, requires_grad=True)
    weight = torch.randn(k, c, 1, 1, requires_grad=True)
    bias = torch.randn(k, requires_grad=True)
    targets = torch.rand(n, m, m)
    labels = torch.randint(0, k, (n,))

    def f(x, w, b):
        return kernels.mask_predictor_loss(x, w, b, targets, labels)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(features, weight, bias), (features, weight, bias))
    grads_ref = torch.autograd.grad(f(features, weight, bias), (features, weight, bias))
    for g, r in zip(grads, grads_ref):
        assert_close(g, r)


# ---------------------------------------------------------------------------------------
# maskrcnn_predictor_loss: the targets sampled from the gt masks inside the kernel

def _predictor_params(n, c, k, m, dtype, device):
    return (torch.randn(n, c, m, m, device=device).to(dtype),
            torch.randn(k, c, 1, 1, device=device) / c ** 0.5, torch.randn(k, device=device))


def run_sampled(features, weight, bias, inst, scale=1.0):
    """Ours, then torchvision's maskrcnn_loss on conv2d logits by autograd in float32
    (float64 for float64; weights rounded to the features' dtype first, as the op does)."""
    f, w, b = (t.detach().clone().requires_grad_() for t in (features, weight, bias))
    loss = kernels.maskrcnn_predictor_loss(f, w, b, *inst)
    (loss * scale).backward()
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    rf = features.detach().to(dtype).requires_grad_()
    rw = weight.detach().to(features.dtype).to(dtype).requires_grad_()
    rb = bias.detach().to(features.dtype).to(dtype).requires_grad_()
    proposals, masks, labels, idxs = inst
    ref = tv_maskrcnn_loss(F.conv2d(rf, rw, rb), [p.to(dtype) for p in proposals],
                           [mk.float() if mk.dtype in (torch.float16, torch.bfloat16) else mk
                            for mk in masks], labels, idxs)
    (ref * scale).backward()
    return (loss.detach(), f.grad, w.grad, b.grad), (ref.detach(), rf.grad, rw.grad, rb.grad)


@pytest.mark.parametrize("n_per_image, c, k, m, mask_kind", [
    ((1,), 8, 1, 14, "uint8"),
    ((7, 6), 37, 91, 14, "bool"),
    ((9, 0, 4), 16, 2, 28, torch.float32),
])
def test_sampled_parity_with_torchvision(backend, poison, n_per_image, c, k, m, mask_kind):
    sizes = [(37, 45), (23, 61), (50, 31)][:len(n_per_image)]
    inst = random_instances(len(n_per_image), n_per_image, k, sizes, mask_kind, backend.device)
    n = sum(n_per_image)
    params = _predictor_params(n, c, k, m, torch.float32, backend.device)
    (loss, gf, gw, gb), (ref, rf, rw, rb) = run_sampled(*params, inst, scale=2.5)
    assert loss.dtype == torch.float32 and gf.dtype == torch.float32
    t = tol(torch.float32)
    assert_close(loss, ref, **t)
    assert_close(gf * n * m * m, rf * n * m * m, **t)
    assert_close(gw, rw, **t)
    assert_close(gb, rb, **t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampled_half_precision_channels_last(backend, poison, dtype):
    inst = random_instances(2, (5, 3), 4, [(30, 20), (17, 25)], "uint8", backend.device)
    features, weight, bias = _predictor_params(8, 24, 4, 14, dtype, backend.device)
    features = features.contiguous(memory_format=torch.channels_last)
    (loss, gf, gw, gb), (ref, rf, rw, rb) = run_sampled(features, weight, bias, inst)
    # torchvision's targets take the proposals' dtype (float32), and so does the loss
    assert loss.dtype == torch.float32 and gf.dtype == dtype
    assert gf.is_contiguous(memory_format=torch.channels_last)
    t = tol(dtype, 2.0)
    assert_close(loss, ref, **t)
    assert_close(gf.float() * 8 * 196, rf * 8 * 196, **t)
    assert_close(gw, rw, **t)
    assert_close(gb, rb, **t)


def test_sampled_equals_predictor_on_torchvision_targets(backend, poison):
    """The sampled target is torchvision's roi_align target exactly: the same loss as
    mask_predictor_loss fed torchvision's projected targets."""
    inst = random_instances(2, (6, 5), 3, [(29, 41), (33, 18)], "uint8", backend.device)
    features, weight, bias = _predictor_params(11, 12, 3, 14, torch.float32, backend.device)
    proposals, masks, labels, idxs = inst
    targets = torch.cat([torchvision.ops.roi_align(
        mk[:, None].float(), torch.cat([i.float()[:, None], p], 1), (14, 14), 1.0)[:, 0]
        for p, mk, i in zip(proposals, masks, idxs)])
    loss = kernels.maskrcnn_predictor_loss(features, weight, bias, *inst)
    ref = kernels.mask_predictor_loss(features, weight, bias, targets.clamp(0, 1),
                                      torch.cat([lab[i] for lab, i in zip(labels, idxs)]))
    assert_close(loss, ref, rtol=1e-6, atol=1e-7)


def test_sampled_never_copies_masks(backend, monkeypatch):
    """Nothing the op allocates reaches the gt masks' size (a float copy of them) or the
    (N, M, M) targets: the targets are sampled from the uint8 masks in the kernel."""
    if backend.reference:
        pytest.skip("the reference path is an oracle, not memory-bound")
    inst = random_instances(2, (12, 9), 5, [(160, 200), (150, 120)], "uint8", backend.device)
    features, weight, bias = (t.requires_grad_() for t in _predictor_params(
        21, 8, 5, 28, torch.float32, backend.device))
    masks_numel = min(mk.numel() for mk in inst[1])
    largest = []
    for name in ("empty", "zeros", "empty_like", "zeros_like", "empty_strided"):
        real = getattr(torch, name)

        def tracked(*a, real=real, **kw):
            t = real(*a, **kw)
            largest.append((t.numel(), tuple(t.shape)))
            return t
        monkeypatch.setattr(torch, name, tracked)
    copies = []
    real_to = torch.Tensor.to

    def to(self, *a, **kw):
        out = real_to(self, *a, **kw)
        if out is not self:
            copies.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch.Tensor, "to", to)
    kernels.maskrcnn_predictor_loss(features, weight, bias, *inst).backward()
    # the features' gradient aside, nothing as large as one image's masks, no targets
    others = [x for x in largest if x[1] != tuple(features.shape)]
    assert others and max(others)[0] < masks_numel, max(others)
    assert not [shape for _, shape in others if shape in ((21, 28, 28), (21, 1, 28, 28))]
    assert not [s for s in copies if len(s) == 3 and s[1:] in ((160, 200), (150, 120))]
    assert all(t.grad is not None for t in (features, weight, bias))


def test_sampled_empty(backend):
    features = torch.randn(0, 6, 14, 14, device=backend.device, requires_grad=True)
    weight = torch.randn(3, 6, 1, 1, device=backend.device, requires_grad=True)
    bias = torch.randn(3, device=backend.device, requires_grad=True)
    inst = random_instances(2, (0, 0), 3, [(10, 12), (8, 9)], "uint8", backend.device)
    loss = kernels.maskrcnn_predictor_loss(features, weight, bias, *inst)
    assert loss.shape == () and loss.item() == 0
    loss.backward()
    for t in (features, weight, bias):
        assert_close(t.grad, torch.zeros_like(t))


def test_sampled_gradcheck_float64():
    inst = random_instances(2, (2, 1), 2, [(12, 9), (7, 11)], torch.float64, "cpu")
    features = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, w, b: kernels.maskrcnn_predictor_loss(f, w, b, *inst),
        (features, weight, bias))


def test_sampled_torch_compile_no_recompile_per_count():
    """Compiled, new row counts per image reuse the graph after the one recompile that
    makes them dynamic: the counts are symbolic sizes, never specialized ints."""
    torch._dynamo.reset()
    f = torch.compile(kernels.maskrcnn_predictor_loss, backend="aot_eager")
    k, c, m = 9, 8, 6
    weight = torch.randn(k, c, 1, 1, requires_grad=True)
    bias = torch.randn(k, requires_grad=True)
    _, masks, labels, _ = random_instances(2, (5, 3), k, [(20, 15), (18, 22)], "uint8", "cpu")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for counts in [(3, 5), (6, 4), (4, 7), (2, 3)]:  # every size changes at once
        proposals, _, _, idxs = random_instances(2, counts, k, [(20, 15), (18, 22)], "uint8",
                                                 "cpu")
        idxs = [i % mk.shape[0] for i, mk in zip(idxs, masks)]
        features = torch.randn(sum(counts), c, m, m, requires_grad=True)
        inst = (proposals, masks, labels, idxs)
        loss = f(features, weight, bias, *inst)
        ref = kernels.maskrcnn_predictor_loss(features, weight, bias, *inst)
        assert_close(loss, ref)
        assert_close(torch.autograd.grad(loss, features)[0],
                     torch.autograd.grad(ref, features)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything is launched.

def _pred(features=None, weight=None, bias=None, targets=None, labels=None):
    return kernels.mask_predictor_loss(
        torch.randn(2, 3, 4, 4) if features is None else features,
        torch.randn(2, 3, 1, 1) if weight is None else weight,
        torch.randn(2) if bias is None else bias,
        _t() if targets is None else targets, _lab() if labels is None else labels)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _pred(labels=_lab(0, 2)), ValueError, "gt_labels"),
    (lambda: _pred(labels=_lab(0)), ValueError, "gt_labels"),
    (lambda: _pred(labels=_lab().double()), TypeError, "gt_labels"),
    (lambda: _pred(targets=_t() * 3), ValueError, "gt_masks"),
    (lambda: _pred(targets=_t(2, 5)), ValueError, "gt_masks"),
    (lambda: _pred(weight=torch.randn(2, 4, 1, 1)), ValueError, "weight"),
    (lambda: _pred(weight=torch.randn(2, 3, 3, 3)), ValueError, "weight"),
    (lambda: _pred(bias=torch.randn(3)), ValueError, "bias"),
    (lambda: _pred(features=torch.randn(2, 3, 4, 5)), ValueError, "features"),
    (lambda: _pred(features=torch.randn(2, 3, 4, 4).long()), TypeError, "features"),
    (lambda: _pred(features=torch.randn(3, 3, 4, 4)), ValueError, "gt_masks"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _sampled(features=None, proposals=None, masks=None, labels=None, idxs=None):
    return kernels.maskrcnn_predictor_loss(
        torch.randn(2, 3, 4, 4) if features is None else features,
        torch.randn(2, 3, 1, 1), torch.randn(2),
        [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 3.0, 4.0]])]
        if proposals is None else proposals,
        [torch.zeros(2, 8, 8, dtype=torch.uint8)] if masks is None else masks,
        [_lab(0, 1)] if labels is None else labels,
        [_lab(1, 0)] if idxs is None else idxs)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _sampled(features=torch.randn(3, 3, 4, 4)), ValueError, "features"),
    (lambda: _sampled(features=torch.randn(2, 4, 4, 4)), ValueError, "weight"),
    (lambda: _sampled(proposals=torch.zeros(2, 4)), TypeError, "proposals"),
    (lambda: _sampled(proposals=[torch.zeros(2, 5)]), ValueError, r"proposals\[0\]"),
    (lambda: _sampled(masks=[torch.zeros(2, 8, 8, dtype=torch.uint8)] * 2), ValueError,
     "gt_masks"),
    (lambda: _sampled(masks=[torch.full((2, 8, 8), 1.5)]), ValueError,
     r"gt_masks\[0\]"),
    (lambda: _sampled(labels=[_lab(0, 2)]), ValueError, r"gt_labels\[0\]"),
    (lambda: _sampled(idxs=[_lab(0, 2)]), ValueError, r"mask_matched_idxs\[0\]"),
    (lambda: _sampled(idxs=[_lab(0)]), ValueError, r"mask_matched_idxs\[0\]"),
])
def test_sampled_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
