"""MultiScaleRoIAlign: parity with torchvision.ops.MultiScaleRoIAlign (forward, gradients,
levels, scales), one launch per pass, layouts, dtypes, empty inputs, bad input."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch.testing import assert_close

import kernels
from conftest import tol

from kernels._utils import deterministic_algorithms
from kernels.ops import multiscale_roi_align as msra
from kernels.ops import roi_align as roi_align_ops

NAMES = ["0", "1", "2", "3"]
# sqrt(area) ranges that torchvision's LevelMapper (224, 4) sends to P2, P3, P4, P5
LEVEL_SIDES = [(8, 100), (120, 215), (235, 430), (460, 700)]


def random_boxes(k: int, img_h: int, img_w: int, device="cpu") -> torch.Tensor:
    """(k, 4) boxes cycling through the four levels' sizes, with random aspect ratios,
    anywhere in (and partly outside) the image."""
    lo, hi = torch.tensor(LEVEL_SIDES, dtype=torch.float32)[torch.arange(k) % 4].unbind(1)
    side = lo + torch.rand(k) * (hi - lo)
    aspect = torch.exp((torch.rand(k) - 0.5) * 1.5)
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    x1 = torch.rand(k) * img_w * 1.2 - 0.1 * img_w - w / 2
    y1 = torch.rand(k) * img_h * 1.2 - 0.1 * img_h - h / 2
    return torch.stack([x1, y1, x1 + w, y1 + h], 1).to(device)


def pyramid(n: int, c: int, img_h: int, img_w: int, device="cpu", dtype=torch.float32,
            levels: int = 4, names=NAMES) -> OrderedDict:
    """FPN maps of a batch padded to (img_h, img_w): strides 4, 8, 16, 32 (ceil sizes)."""
    return OrderedDict(
        (names[i], torch.randn(n, c, -(-img_h // 4 >> i) or 1, -(-img_w // 4 >> i) or 1,
                               device=device).to(dtype))
        for i in range(levels))


def run_both(x: dict, boxes, image_shapes, output_size, sampling, names=NAMES, grad=None,
             **kw):
    """(ours, torchvision) outputs and per-map input gradients; torchvision in float32."""
    ours = kernels.MultiScaleRoIAlign(names, output_size, sampling, **kw)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling, **kw)
    xo = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    xt = {k: v.detach().float().contiguous().requires_grad_() for k, v in x.items()}
    out = ours(xo, boxes, image_shapes)
    ref = theirs(xt, [b.float() for b in boxes], image_shapes)
    if grad is None:
        grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    return out, ref, {k: xo[k].grad for k in x}, {k: xt[k].grad for k in x}, ours, theirs


def tv_levels(boxes, image_shapes, x) -> torch.Tensor:
    _, mapper = torchvision.ops.poolers._setup_scales(list(x.values()), image_shapes, 224, 4)
    return mapper([b.float() for b in boxes])


# adaptive sampling with coarser bins: the interpreter pays per sample
@pytest.mark.parametrize("sampling, output_sizes", [(2, [(3, 3), (2, 5)]), (-1, [(7, 6)])])
def test_parity_with_torchvision(backend, poison, sampling, output_sizes):
    image_shapes = [(61, 90), (64, 77), (40, 96)]   # different sizes, padded to 64 x 96
    n, c = len(image_shapes), 3
    x = pyramid(n, c, 64, 96, backend.device)
    boxes = [random_boxes(k, h, w, backend.device) for k, (h, w) in zip((7, 5, 6), image_shapes)]
    assert set(tv_levels(boxes, image_shapes, x).tolist()) == {0, 1, 2, 3}
    for output_size in output_sizes:
        out, ref, g, gref, ours, theirs = run_both(x, boxes, image_shapes, output_size, sampling)
        assert out.shape == (18, c, *output_size)
        assert_close(out, ref, **tol(torch.float32))
        for k in x:
            assert_close(g[k], gref[k], **tol(torch.float32))
        assert ours.scales == theirs.scales
        assert (ours.map_levels.k_min, ours.map_levels.k_max) == (
            theirs.map_levels.k_min, theirs.map_levels.k_max)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, poison, dtype):
    image_shapes = [(64, 96), (50, 70)]
    x = pyramid(2, 5, 64, 96, backend.device, dtype)
    boxes = [random_boxes(6, h, w, backend.device) for h, w in image_shapes]
    out, ref, g, gref, *_ = run_both(x, boxes, image_shapes, 4, 2)
    assert out.dtype == dtype
    assert_close(out.float(), ref, **tol(dtype))
    for k in x:
        assert g[k].dtype == dtype
        assert_close(g[k].float(), gref[k], **tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_layouts(backend, poison, layout):
    image_shapes = [(64, 96), (64, 96)]
    base = pyramid(2, 8, 64, 96, backend.device)
    x = OrderedDict()
    for i, (k, v) in enumerate(base.items()):
        if layout == "channels_last" or (layout == "mixed" and i % 2):
            x[k] = v.contiguous(memory_format=torch.channels_last)[:, :4]
        else:
            x[k] = v[:, ::2]
        assert not x[k].is_contiguous()
    boxes = [random_boxes(5, 64, 96, backend.device) for _ in range(2)]
    out, ref, g, gref, *_ = run_both(x, boxes, image_shapes, (2, 3), 2)
    assert_close(out, ref, **tol(torch.float32))
    for k in x:
        assert_close(g[k], gref[k], **tol(torch.float32))


def test_channels_last_gradient_keeps_layout(backend):
    x = {k: v.contiguous(memory_format=torch.channels_last).requires_grad_()
         for k, v in pyramid(1, 4, 32, 32, backend.device).items()}
    x["0"] = x["0"].detach().contiguous().requires_grad_()     # one NCHW map among them
    m = kernels.MultiScaleRoIAlign(NAMES, 2, 2)
    m(x, [random_boxes(8, 32, 32, backend.device)], [(32, 32)]).sum().backward()
    assert x["0"].grad.is_contiguous()
    for k in NAMES[1:]:
        assert x[k].grad.is_contiguous(memory_format=torch.channels_last)


def test_level_boundaries_and_degenerate_boxes(backend, poison):
    """Integer boxes whose sqrt(area) sits exactly on a level boundary (112, 224, 448),
    zero-size boxes, and inverted ones (a negative area: torchvision's NaN level pools
    nothing and leaves zeros)."""
    sides = [(112, 112), (224, 224), (448, 448), (56, 224), (111, 113), (0, 50), (50, 0),
             (0, 0), (-30, 40), (40, -30), (-30, -40), (896, 224)]
    boxes = torch.tensor([[10.0, 6.0, 10.0 + w, 6.0 + h] for w, h in sides])
    boxes = [boxes.to(backend.device)]
    x = pyramid(1, 3, 128, 96, backend.device)
    out, ref, g, gref, *_ = run_both(x, boxes, [(128, 96)], 3, 2)
    levels = tv_levels(boxes, [(128, 96)], x)
    assert levels[:3].tolist() == [2 - 1, 3 - 1, 4 - 1]    # exact powers: the higher level
    assert_close(out, ref, **tol(torch.float32))
    assert out[8:10].abs().sum() == 0 and out[10].abs().sum() > 0
    for k in x:
        assert_close(g[k], gref[k], **tol(torch.float32))


def test_non_finite_boxes_pool_nothing(backend, poison):
    x = pyramid(1, 3, 64, 64, backend.device)
    inf, nan = float("inf"), float("nan")
    boxes = torch.tensor([[0.0, 0, inf, 10], [nan, 0, 10, 10], [-inf, 0, 5, 5],
                          [4.0, 4, 40, 50]], device=backend.device)
    for sampling in (2, -1):
        out = kernels.MultiScaleRoIAlign(NAMES, 2, sampling)(x, [boxes], [(64, 64)])
        assert_close(out[:3], torch.zeros_like(out[:3]))
        ref = torchvision.ops.MultiScaleRoIAlign(NAMES, 2, sampling)(x, [boxes[3:]],
                                                                       [(64, 64)])
        assert_close(out[3:], ref, **tol(torch.float32))


def test_single_level_and_unused_maps(backend, poison):
    """One map (torchvision skips level mapping), and maps in x that are not pooled."""
    x = pyramid(2, 3, 48, 64, backend.device, names=["p2", "p3", "p4", "p5"])
    boxes = [random_boxes(4, 48, 64, backend.device) for _ in range(2)]
    shapes = [(48, 64), (40, 60)]
    for names in (["p3"], ["p2", "p4"], ["p5", "p3"]):
        out, ref, g, gref, *_ = run_both(x, boxes, shapes, (3, 2), 2, names=names)
        assert_close(out, ref, **tol(torch.float32))
        for k in x:
            if gref[k] is None:
                assert g[k] is None
            else:
                assert_close(g[k], gref[k], **tol(torch.float32))


def test_canonical_scale_and_level(backend, poison):
    x = pyramid(1, 3, 64, 96, backend.device)
    boxes = [random_boxes(8, 64, 96, backend.device)]
    out, ref, g, gref, *_ = run_both(x, boxes, [(64, 96)], 2, 2, canonical_scale=100,
                                     canonical_level=3)
    assert_close(out, ref, **tol(torch.float32))
    for k in x:
        assert_close(g[k], gref[k], **tol(torch.float32))


def test_one_launch_per_pass(backend, monkeypatch):
    if not backend.triton:
        pytest.skip("the reference path launches no kernel")
    launched = []
    real = roi_align_ops.launch
    monkeypatch.setattr(roi_align_ops, "launch",
                        lambda k, *a, **kw: (launched.append((k, kw["BACKWARD"])),
                                             real(k, *a, **kw)))
    x = {k: v.requires_grad_() for k, v in pyramid(2, 3, 64, 64, backend.device).items()}
    boxes = [random_boxes(8, 64, 64, backend.device) for _ in range(2)]
    out = kernels.MultiScaleRoIAlign(NAMES, 2, 2)(x, boxes, [(64, 64)] * 2)
    assert launched == [(roi_align_ops._roi_align_kernel, False)]
    out.sum().backward()
    assert launched[1:] == [(roi_align_ops._roi_align_kernel, True)]


def test_deterministic_backward(backend, poison):
    """Under use_deterministic_algorithms the backward is atomic-free (roi_align's per
    level): same gradients as torchvision, bitwise equal run to run."""
    image_shapes = [(32, 48), (30, 40)]
    x = pyramid(2, 3, 32, 48, backend.device)
    boxes = [random_boxes(6, h, w, backend.device) for h, w in image_shapes]
    x["2"] = x["2"].contiguous(memory_format=torch.channels_last)
    grad = torch.randn(12, 3, 2, 2, device=backend.device)
    runs = []
    for _ in range(2):
        with deterministic_algorithms():
            runs.append(run_both(x, boxes, image_shapes, 2, 2, grad=grad))
    (out, _, g, *_), (_, _, g2, *_) = runs
    # torchvision's kernel as the oracle: under deterministic algorithms it runs CUDA
    # tensors through a Python fallback that differs from its kernel for boxes reaching
    # past the map (measured on an H200)
    _, ref, _, gref, *_ = run_both(x, boxes, image_shapes, 2, 2, grad=grad)
    assert_close(out, ref, **tol(torch.float32))
    for k in x:
        assert_close(g[k], gref[k], **tol(torch.float32))
        assert torch.equal(g[k], g2[k])
    assert g["2"].is_contiguous(memory_format=torch.channels_last)


def test_empty_boxes(backend):
    x = {k: v.requires_grad_() for k, v in pyramid(2, 3, 32, 32, backend.device).items()}
    m = kernels.MultiScaleRoIAlign(NAMES, (4, 2), 2)
    empty = torch.zeros(0, 4, device=backend.device)
    out = m(x, [empty, empty], [(32, 32)] * 2)
    assert out.shape == (0, 3, 4, 2)
    out.sum().backward()
    for k in x:
        assert_close(x[k].grad, torch.zeros_like(x[k]))
    # one image without boxes among others
    boxes = [random_boxes(3, 32, 32, backend.device), empty]
    out = m(x, boxes, [(32, 32)] * 2)
    ref = torchvision.ops.MultiScaleRoIAlign(NAMES, (4, 2), 2)(x, boxes, [(32, 32)] * 2)
    assert_close(out, ref, **tol(torch.float32))


def test_functional_matches_module(backend):
    x = pyramid(2, 3, 48, 48, backend.device)
    boxes = [random_boxes(4, 48, 48, backend.device) for _ in range(2)]
    m = kernels.MultiScaleRoIAlign(NAMES, 3, 2)
    assert repr(m) == repr(torchvision.ops.MultiScaleRoIAlign(NAMES, 3, 2)).replace(
        "torchvision", "")
    f = kernels.multiscale_roi_align(list(x.values()), boxes, [(48, 48)] * 2, 3, 2)
    assert_close(m(x, boxes, [(48, 48)] * 2), f)


def test_scales_are_kept_after_first_call(backend):
    """As torchvision: scales come from the first call's image sizes."""
    x = pyramid(1, 2, 64, 64, backend.device)
    boxes = [random_boxes(4, 64, 64, backend.device)]
    ours = kernels.MultiScaleRoIAlign(NAMES, 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 2, 2)
    for shapes in ([(64, 64)], [(128, 128)]):
        assert_close(ours(x, boxes, shapes), theirs(x, boxes, shapes), **tol(torch.float32))
    assert ours.scales == theirs.scales == [0.25, 0.125, 0.0625, 0.03125]


def test_gradcheck_float64():
    x = [t.double().requires_grad_() for t in pyramid(1, 2, 24, 32).values()]
    boxes = [random_boxes(6, 24, 32).double()]
    assert torch.autograd.gradcheck(
        lambda *f: kernels.multiscale_roi_align(list(f), boxes, [(24, 32)], (2, 3), -1), x)


def test_torch_compile_fullgraph():
    x = {k: v.requires_grad_() for k, v in pyramid(2, 3, 32, 32).items()}
    boxes = [random_boxes(5, 32, 32) for _ in range(2)]
    m = kernels.MultiScaleRoIAlign(NAMES, 2, 2)

    def f(feats, b):
        return m(feats, b, [(32, 32)] * 2).square().sum()

    loss_ref = f(x, boxes)
    grads_ref = torch.autograd.grad(loss_ref, list(x.values()))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, boxes)
    grads = torch.autograd.grad(loss, list(x.values()))
    assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b)
    # the functional form infers scales while tracing, with dynamic shapes too
    g = torch.compile(lambda feats, b: kernels.multiscale_roi_align(
        list(feats.values()), b, [(32, 32)] * 2, 2, 2), fullgraph=True, dynamic=True,
        backend="aot_eager")
    assert_close(g(x, boxes), m(x, boxes, [(32, 32)] * 2))


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything is launched.

def _feats(**kw):
    return list(pyramid(2, 3, 32, 32, **kw).values())


def _boxes():
    return [torch.rand(2, 4) * 16, torch.rand(1, 4) * 16]


def _call(features=None, boxes=None, shapes=None, size=2, sampling=2):
    return kernels.multiscale_roi_align(
        _feats() if features is None else features, _boxes() if boxes is None else boxes,
        [(32, 32)] * 2 if shapes is None else shapes, size, sampling)


def _mixed(i, **change):
    f = _feats()
    f[i] = f[i].to(**change)
    return f


@pytest.mark.parametrize("call, error, match", [
    (lambda: _call(features=_mixed(2, dtype=torch.float16)), ValueError, r"features\[2\]"),
    (lambda: _call(features=_mixed(1, device="meta")), ValueError, r"features\[1\]"),
    (lambda: _call(features=_feats()[:1] + [torch.randn(2, 4, 4, 4)]), ValueError,
     r"features\[1\]"),
    (lambda: _call(features=_feats()[:1] + [torch.randn(3, 3, 4, 4)]), ValueError,
     r"features\[1\]"),
    (lambda: _call(features=[]), ValueError, "features"),
    (lambda: _call(features=_feats() * 2), ValueError, "features"),
    (lambda: _call(features=[torch.randn(2, 3, 8)]), ValueError, r"features\[0\]"),
    (lambda: _call(features=[f.long() for f in _feats()]), TypeError, r"features\[0\]"),
    (lambda: _call(features=_feats()[0]), TypeError, "features"),
    (lambda: _call(boxes=_boxes()[:1]), ValueError, "boxes"),
    (lambda: _call(boxes=[torch.rand(2, 5), torch.rand(1, 4)]), ValueError, r"boxes\[0\]"),
    (lambda: _call(boxes=[torch.rand(2, 4), torch.rand(1, 4, device="meta")]), ValueError,
     r"boxes\[1\]"),
    (lambda: _call(boxes=[torch.rand(2, 4, device="meta")] * 2), ValueError, "boxes"),
    (lambda: _call(boxes=[torch.rand(2, 4), torch.zeros(1, 4, dtype=torch.long)]), TypeError,
     r"boxes\[1\]"),
    (lambda: _call(boxes=torch.rand(3, 5)), TypeError, "boxes"),
    (lambda: _call(shapes=[(32, 32)]), ValueError, "image_shapes"),
    (lambda: _call(shapes=[(32, 32), (32, 0)]), ValueError, r"image_shapes\[1\]"),
    (lambda: _call(shapes=[(32, 32), (32,)]), ValueError, r"image_shapes\[1\]"),
    (lambda: _call(shapes="32x32"), TypeError, "image_shapes"),
    (lambda: _call(size=0), ValueError, "output_size"),
    (lambda: _call(size="7"), TypeError, "output_size"),
    (lambda: _call(sampling=2.0), TypeError, "sampling_ratio"),
    (lambda: kernels.MultiScaleRoIAlign(["0", "9"], 2, 2)(
        dict(zip(NAMES, _feats())), _boxes(), [(32, 32)] * 2), ValueError, "x"),
    (lambda: kernels.MultiScaleRoIAlign(NAMES, 2, 2)(
        dict(zip(NAMES, _mixed(3, dtype=torch.float64))), _boxes(), [(32, 32)] * 2),
     ValueError, r"x\['3'\]"),
    (lambda: kernels.MultiScaleRoIAlign(NAMES, 2, 2)(_feats(), _boxes(), [(32, 32)] * 2),
     TypeError, "x"),
    # the unvalidated entry kernels.patch uses for torchvision's _multiscale_roi_align
    (lambda: msra._pool(_mixed(1, dtype=torch.float16), torch.zeros(1, 5), 2, 2,
                        [1 / 4, 1 / 8, 1 / 16, 1 / 32], msra.LevelMapper(2, 5)), ValueError,
     r"x\[1\]"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
