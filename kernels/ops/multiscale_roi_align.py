"""FPN multi-level RoI Align (torchvision.ops.MultiScaleRoIAlign) in one kernel launch.

torchvision assigns levels in Python, then runs one ``roi_align`` per level with an index
gather before and a scatter after. Here one launch of :mod:`kernels.ops.roi_align`'s kernels
with ``NUM_LEVELS`` maps (up to ``MAX_LEVELS``) does it all: each program computes its RoI's
level with torchvision's LevelMapper arithmetic, picks that level's base pointer, shape,
strides and scale, pools (aligned=False) and writes the output in the original RoI order.
The backward is the same program layout scattering (atomics) into one float32
buffer that holds every level's gradient; under ``torch.use_deterministic_algorithms`` it
is instead kernels.ops.roi_align's atomic-free backward per level (bitwise reproducible).

RoIs torchvision leaves at zero (a negative box area gives a NaN level that matches no
level) are zero here too; so are RoIs with non-finite coordinates (torchvision's result
for them is undefined).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _cpu, reference
from .._boxes import boxes_to_rois
from .._sampling import MAX_LEVELS, Pyramid
from .._utils import (check_float_dtype, check_same_device, check_tensor,
                      deterministic_algorithms, eager, needs_grad, pair, pick_path,
                      TypeAttributeError)
from .roi_align import (gradient_buffers, pool_backward, pool_forward,
                        roi_align_backward_deterministic)


# ---------------------------------------------------------------------------------------
# Host launchers: kernels.ops.roi_align's kernels over every map of the Pyramid.

def multiscale_roi_align_forward(features: list[Tensor], rois: Tensor, pyramid: Pyramid,
                                 pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """Launch the forward kernel once for all levels; inputs already validated."""
    return pool_forward(features, rois, pyramid, pooled_h, pooled_w, sampling_ratio, False)


def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, pyramid: Pyramid,
                                  pooled_h: int, pooled_w: int, sampling_ratio: int) -> Tensor:
    """Every level's input gradient in one flat buffer (``Pyramid.level_views``): one
    zero-fill, one kernel launch into float32, one cast to grad's dtype."""
    flat, views = gradient_buffers(pyramid, grad.device)
    pool_backward(grad, rois, views, pyramid, pooled_h, pooled_w, sampling_ratio, False)
    return flat.to(grad.dtype)


def multiscale_roi_align_backward_deterministic(grad: Tensor, rois: Tensor, pyramid: Pyramid,
                                                pooled_h: int, pooled_w: int,
                                                sampling_ratio: int) -> Tensor:
    """Bitwise-reproducible backward (under ``torch.use_deterministic_algorithms``): RoIs
    grouped by level on the host side, then kernels.ops.roi_align's atomic-free backward
    per level. Opt-in: it gathers RoIs per level and syncs, which the atomic kernel avoids."""
    levels = pyramid.levels(rois)
    grads = []
    for lvl, (scale, shape, cl) in enumerate(zip(pyramid.scales, pyramid.shapes,
                                                 pyramid.channels_last)):
        idx = (levels == lvl).nonzero().flatten()
        if idx.numel():
            g = roi_align_backward_deterministic(grad[idx], rois[idx], scale, pooled_h,
                                                 pooled_w, sampling_ratio, False, shape, cl)
        else:
            g = grad.new_zeros(shape)
        grads.append(g)
    return pyramid.flatten(grads)


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd. The ops take the pyramid as flat arguments
# (torch.library's schema has no records); the bodies rebuild the Pyramid. The backward
# op returns every level's gradient in one flat buffer (``Pyramid.level_views``); the
# CPU kernel's per-level gradients are flattened into one only there (in eager code they
# are returned as they are).

def _forward_kernel(features: list[Tensor]):
    return pick_path(features[0], multiscale_roi_align_forward,
                     reference.multiscale_roi_align_forward,
                     cpu=_cpu.multiscale_roi_align_forward)


def _backward_kernel(grad: Tensor):
    return pick_path(grad, multiscale_roi_align_backward,
                     reference.multiscale_roi_align_backward,
                     multiscale_roi_align_backward_deterministic,
                     _cpu.multiscale_roi_align_backward)


def _pyramid(scales, k_min, k_max, canonical_scale, canonical_level, eps,
             maps=None) -> Pyramid:
    p = Pyramid(tuple(scales), k_min, k_max, canonical_scale, canonical_level, eps)
    return p if maps is None else p.of(maps)


@torch.library.custom_op("maskrcnn_triton::multiscale_roi_align", mutates_args=())
def _multiscale_roi_align_op(features: list[Tensor], rois: Tensor, scales: list[float],
                             k_min: int, k_max: int, canonical_scale: float,
                             canonical_level: float, eps: float, pooled_h: int,
                             pooled_w: int, sampling_ratio: int) -> Tensor:
    pyramid = _pyramid(scales, k_min, k_max, canonical_scale, canonical_level, eps)
    return _forward_kernel(features)(features, rois, pyramid, pooled_h, pooled_w,
                                     sampling_ratio)


@_multiscale_roi_align_op.register_fake
def _(features, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps, pooled_h,
      pooled_w, sampling_ratio):
    return features[0].new_empty(rois.shape[0], features[0].shape[1], pooled_h, pooled_w)


@torch.library.custom_op("maskrcnn_triton::multiscale_roi_align_backward", mutates_args=())
def _multiscale_roi_align_backward_op(
        grad: Tensor, rois: Tensor, scales: list[float], k_min: int, k_max: int,
        canonical_scale: float, canonical_level: float, eps: float, pooled_h: int,
        pooled_w: int, sampling_ratio: int, batch: int, channels: int, heights: list[int],
        widths: list[int], channels_last: list[bool]) -> Tensor:
    pyramid = Pyramid(tuple(scales), k_min, k_max, canonical_scale, canonical_level, eps,
                      tuple((batch, channels, h, w) for h, w in zip(heights, widths)),
                      tuple(channels_last))
    grads = _backward_kernel(grad)(grad, rois, pyramid, pooled_h, pooled_w, sampling_ratio)
    return pyramid.flatten(grads) if isinstance(grads, list) else grads


@_multiscale_roi_align_backward_op.register_fake
def _(grad, rois, scales, k_min, k_max, canonical_scale, canonical_level, eps, pooled_h,
      pooled_w, sampling_ratio, batch, channels, heights, widths, channels_last):
    return grad.new_empty(sum(batch * channels * h * w for h, w in zip(heights, widths)))


def _setup_context(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.args = args
    ctx.pyramid = _pyramid(*args[:6], maps=features)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    p = ctx.pyramid
    flat = _multiscale_roi_align_backward_op(
        grad, rois, *ctx.args, p.shapes[0][0], p.shapes[0][1], [s[2] for s in p.shapes],
        [s[3] for s in p.shapes], list(p.channels_last))
    return (p.level_views(flat),) + (None,) * (1 + len(ctx.args))


_multiscale_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


class _MultiScaleRoIAlign(torch.autograd.Function):
    """The op in eager code: the device kernels called directly, without the dispatcher;
    the maps are separate inputs (an autograd.Function's list argument gets no gradient)."""

    @staticmethod
    def forward(ctx, rois, pyramid, pooled_h, pooled_w, sampling_ratio, *features):
        ctx.save_for_backward(rois)
        ctx.args = (pyramid.of(features), pooled_h, pooled_w, sampling_ratio)
        return _forward_kernel(features)(list(features), rois, pyramid, pooled_h, pooled_w,
                                         sampling_ratio)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        pyramid = ctx.args[0]
        grads = _backward_kernel(grad)(grad, rois, *ctx.args)
        if not isinstance(grads, list):
            grads = pyramid.level_views(grads)
        return (None,) * 5 + tuple(grads)


# ---------------------------------------------------------------------------------------
# Scales and level range: torchvision's poolers._setup_scales, on host ints only.

def infer_scale(feature_size: tuple[int, int], image_size: tuple[int, int]) -> float:
    """torchvision's ``_infer_scale``: 2 ** round(log2(feature height / image height)).

    torchvision rounds the ratio to float32 first; that can only change the result for a
    ratio within float32 precision of sqrt(2) * 2**k, which no pair of image sizes gives.
    Plain host floats keep this traceable (torch.compile, dynamic shapes specialize here).
    """
    return 2.0 ** round(math.log2(int(feature_size[0]) / int(image_size[0])))


class LevelMapper:
    """The level range and constants of torchvision's ``poolers.LevelMapper``; calling it
    maps boxes to level indices exactly as torchvision does (-1: none pooled)."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: float = 224,
                 canonical_level: float = 4, eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        return self.pyramid((1.0,) * (self.k_max - self.k_min + 1)).levels(
            boxes_to_rois(boxlists))

    def pyramid(self, scales) -> Pyramid:
        """The Pyramid of maps at ``scales`` that this mapper assigns RoIs to."""
        return Pyramid(tuple(float(s) for s in scales), int(self.k_min), int(self.k_max),
                       float(self.s0), float(self.lvl0), float(self.eps))

    def __repr__(self) -> str:
        return (f"LevelMapper(k_min={self.k_min}, k_max={self.k_max}, "
                f"canonical_scale={self.s0}, canonical_level={self.lvl0})")


def setup_scales(features: list[Tensor], image_shapes, canonical_scale: float = 224,
                 canonical_level: float = 4) -> tuple[list[float], LevelMapper]:
    """Per-level scales and the level mapper, from feature and image sizes (torchvision's)."""
    max_h = max(int(s[0]) for s in image_shapes)
    max_w = max(int(s[1]) for s in image_shapes)
    scales = [infer_scale(tuple(f.shape[-2:]), (max_h, max_w)) for f in features]
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    return scales, LevelMapper(k_min, k_max, canonical_scale, canonical_level)


# ---------------------------------------------------------------------------------------
# Public API

def _check_features(features, name: str, names: list[str]) -> None:
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{name} must be a list of (N, C, H, W) tensors, "
                        f"got {type(features).__name__}")
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ValueError(f"{name} must hold 1 to {MAX_LEVELS} feature maps, "
                         f"got {len(features)}")
    first = features[0]
    for label, f in zip(names, features):
        check_tensor(label, f, ndim=4, what="a 4-D (N, C, H, W) tensor")
        check_float_dtype(label, f)
        if f.dtype != first.dtype:
            raise ValueError(f"{label} has dtype {f.dtype} but {names[0]} has {first.dtype}; "
                             "all feature maps must share one dtype")
        check_same_device(**{names[0]: first, label: f})
        if f.shape[:2] != first.shape[:2]:
            raise ValueError(f"{label} has (N, C) = {tuple(f.shape[:2])} but {names[0]} has "
                             f"{tuple(first.shape[:2])}; all maps need the same batch and "
                             "channels")
        if f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"{label} must have H, W >= 1, got shape {tuple(f.shape)}")


def _check_image_shapes(image_shapes, num_images: int) -> None:
    if not isinstance(image_shapes, (list, tuple)):
        raise TypeError(f"image_shapes must be a list of (height, width), "
                        f"got {type(image_shapes).__name__}")
    if len(image_shapes) != num_images:
        raise ValueError(f"image_shapes has {len(image_shapes)} entries but there are "
                         f"{num_images} images (boxes lists); pass one (height, width) each")
    for i, s in enumerate(image_shapes):
        ok = (isinstance(s, (tuple, list, torch.Size)) and len(s) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s))
        if not ok:
            raise ValueError(f"image_shapes[{i}] must be a (height, width) pair of positive "
                             f"ints, got {s!r}")


def _check_boxes(boxes, batch: int) -> Tensor:
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be list[Tensor[L, 4]] (one per image), "
                        f"got {type(boxes).__name__}")
    return boxes_to_rois(boxes, batch)


def _pool(features: list[Tensor], rois: Tensor, output_size, sampling_ratio, scales,
          mapper, *, checked: bool = False) -> Tensor:
    """Pool (K, 5) ``rois`` from ``features`` with ``scales`` and a LevelMapper-like
    ``mapper`` (k_min, k_max, s0, lvl0, eps: ours or torchvision's). ``checked``: the maps
    and the RoIs' device were validated by the caller (kernels.patch's stand-in is not)."""
    if not checked:
        _check_features(features, "x", [f"x[{i}]" for i in range(
            len(features) if isinstance(features, (list, tuple)) else 0)])
        check_same_device(**{"x[0]": features[0], "boxes": rois})
    pooled_h, pooled_w = pair("output_size", output_size)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    p = LevelMapper.pyramid(mapper, scales)     # ours or torchvision's mapper: same fields
    features = list(features)
    sampling_ratio = int(sampling_ratio)
    if not eager(*features, rois):
        return _multiscale_roi_align_op(features, rois, list(p.scales), p.k_min, p.k_max,
                                        p.canonical_scale, p.canonical_level, p.eps,
                                        pooled_h, pooled_w, sampling_ratio)
    if needs_grad(*features):
        return _MultiScaleRoIAlign.apply(rois, p, pooled_h, pooled_w, sampling_ratio,
                                         *features)
    return _forward_kernel(features)(features, rois, p, pooled_h, pooled_w, sampling_ratio)


def multiscale_roi_align(features: list[Tensor], boxes: list[Tensor], image_shapes,
                         output_size, sampling_ratio: int, canonical_scale: float = 224,
                         canonical_level: float = 4) -> Tensor:
    """FPN RoI Align over ``features`` (fine to coarse) in one kernel launch.

    features: 1..5 (N, C, H_l, W_l) maps of one dtype (float32/float16/bfloat16; float64
    runs the reference path), NCHW, channels_last or any strides. boxes: one Tensor[L, 4]
    (x1, y1, x2, y2, image coordinates) per image. image_shapes: one (height, width) per
    image. Scales and levels are torchvision's (``MultiScaleRoIAlign``, aligned=False).
    Returns (sum L, C, PH, PW) in the features' dtype, RoIs in input order.
    """
    _check_features(features, "features", [f"features[{i}]" for i in range(
        len(features) if isinstance(features, (list, tuple)) else 0)])
    rois = _check_boxes(boxes, features[0].shape[0])
    check_same_device(**{"features[0]": features[0], "boxes": rois})
    _check_image_shapes(image_shapes, len(boxes))
    scales, mapper = setup_scales(features, image_shapes, canonical_scale, canonical_level)
    return _pool(features, rois, output_size, sampling_ratio, scales, mapper, checked=True)


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``, all levels in one launch.

    As torchvision, the scales are inferred on the first call and kept (``self.scales``,
    ``self.map_levels``), and maps are taken from ``x`` in its own order. Unlike it, every
    name in ``featmap_names`` must be present in ``x`` and at most 5 maps are pooled.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.map_levels = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        if not isinstance(x, Mapping):   # torchvision reads x.items(): AttributeError
            raise TypeAttributeError(f"x must be a dict of feature maps, "
                                     f"got {type(x).__name__}")
        missing = [n for n in self.featmap_names if n not in x]
        if missing:
            raise ValueError(f"x has no feature map named {missing} (has {list(x)})")
        names = [k for k in x if k in self.featmap_names]
        features = [x[k] for k in names]
        _check_features(features, "x", [f"x[{k!r}]" for k in names])
        rois = _check_boxes(boxes, features[0].shape[0])
        check_same_device(**{f"x[{names[0]!r}]": features[0], "boxes": rois})
        _check_image_shapes(image_shapes, len(boxes))
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        if len(self.scales) != len(features):
            raise ValueError(f"x gives {len(features)} feature maps but the scales inferred "
                             f"on the first call are for {len(self.scales)}")
        return _pool(features, rois, self.output_size, self.sampling_ratio, self.scales,
                     self.map_levels, checked=True)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})")


# ---------------------------------------------------------------------------------------
# GPU compile check: launch every specialization the launchers can pick.

def _compile_examples(device: str = "cpu") -> None:
    """Run forward and backward on tiny tensors: each dtype, every level count, NCHW
    (P_MAJOR) and channels_last maps, and the deterministic backward. The compile check
    expands each launch over both tuning rows; sampling ratio and sizes are runtime. The
    GPU kit's memory check runs these on CUDA."""
    image = [(32, 48)]
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 20.0], [0.0, 0.0, 3.0, 4.0]], device=device)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for num_levels in range(1, MAX_LEVELS + 1):
            for fmt in (torch.contiguous_format, torch.channels_last):
                feats = [torch.randn(1, 3, max(16 >> lvl, 1), max(24 >> lvl, 1), dtype=dtype,
                                     device=device).to(memory_format=fmt).requires_grad_()
                         for lvl in range(num_levels)]
                out = multiscale_roi_align(feats, boxes, image, 2, 2)
                out.float().sum().backward()
                if num_levels == 2:   # the deterministic backward's roi_align kernels
                    with deterministic_algorithms():
                        multiscale_roi_align(feats, boxes, image, 2, -1).float().sum().backward()
