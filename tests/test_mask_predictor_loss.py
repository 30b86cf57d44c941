"""mask_predictor_loss: parity with conv2d + gather + BCE (autograd, float32/float64), in
value and every gradient; dtypes, layouts, extreme logits, memory, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import kernels
from conftest import tol
from test_mask_loss import _lab, _t, soft_targets


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
