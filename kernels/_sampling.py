"""RoI sampling shared by every kernel that samples (RoI Align at one or several levels, the
mask targets of the fused mask losses) and by the atomic-free backward's host side.

Device side (``@triton.jit``): the RoI's box decode (:func:`roi_box`), torchvision's
bilinear rule along one axis (:func:`bilinear_axis`, :func:`sample_rows`), the FPN level
of a RoI and the
per-level argument pick (:func:`roi_level`, :func:`pick_level`, both in
:func:`roi_on_level`), and the tile orientation
helpers (:func:`along_p`, :func:`along_c`). Host side: the description of the maps pooled
from (:class:`Pyramid`: scales, torchvision's level mapper, the maps' shapes and layouts),
the per-level kernel arguments, the lane orientation a layout wants, the int32 extent
check, and the list of sampling entries (output bin, input pixel, weight) that the deterministic backward sorts
and the reference path multiplies (:func:`sampling_entries`).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import is_channels_last


MAX_LEVELS = 5


# ---------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def roi_tile(C, PH, PW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, P_MAJOR: tl.constexpr):
    """This program's RoI (grid axis 2), block of output bins (axis 0) and block of
    channels (axis 1) as one vector of BLOCK_P * BLOCK_C (bin, channel) pairs — bins the
    fast index when P_MAJOR, channels otherwise — with their masks and each bin's (row,
    column). One flat vector, not a [bins, channels] tile: a warp's lanes then run along
    the fast index whatever layout heuristic the compiler applies. For a 2-D gather whose
    addresses have no provable contiguity, Triton 3.6 puts the lanes along axis 0 and 3.8
    along the last axis: on the H200's Triton 3.6 a [channels, bins] tile spread a warp
    over 32 channel planes.

    CUDA caps axes 1 and 2 at 65,535 programs: bin blocks pass that at 1024x1024 outputs,
    so they take axis 0 (2**31 - 1), and launchers split more than 65,535 RoIs into
    launches (``row_chunks``)."""
    r = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, BLOCK_P * BLOCK_C)
    if P_MAJOR:
        p_in, c_in = i % BLOCK_P, i // BLOCK_P
    else:
        p_in, c_in = i // BLOCK_C, i % BLOCK_C
    offs_p = tl.program_id(0) * BLOCK_P + p_in
    offs_c = tl.program_id(1) * BLOCK_C + c_in
    return r, offs_p, offs_c, offs_p < PH * PW, offs_c < C, offs_p // PW, offs_p % PW


@triton.jit
def bins_by_channels(C, PH, PW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The channels-fast flat tile's (bin, channel) pairs as a [BLOCK_P, BLOCK_C] tile in
    the same order (``tl.reshape`` of the flat vector lands on it): its bin offsets, channel
    offsets and mask, for the accesses of the (K, C, PH, PW) output, whose bins are
    contiguous."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_p, offs_c, (offs_p < PH * PW)[:, None] & (offs_c < C)[None, :]


@triton.jit
def roi_box(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
            r, spatial_scale, PH, PW, sampling_ratio, N, ALIGNED: tl.constexpr):
    """:func:`decode_roi` of row r of a (K, 5) RoI tensor."""
    base = rois_ptr + r * 5
    return decode_roi(tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),
                      tl.load(base + 4), spatial_scale, PH, PW, sampling_ratio, N, ALIGNED)


@triton.jit
def decode_roi(b_f, x1, y1, x2, y2, spatial_scale, PH, PW, sampling_ratio, N,
               ALIGNED: tl.constexpr):
    """Decode a RoI: batch index (0 where invalid), whether the index is in [0, N) (as
    torchvision's kernel truncates it), start (y, x), bin size (y, x) and samples per bin
    (y, x) as floats (torchvision's ceil of the bin size with adaptive sampling)."""
    b_ok = (b_f > -1.0) & (b_f < N)      # NaN fails both
    b = tl.where(b_ok, b_f, 0.0).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = x1 * spatial_scale - offset
    start_h = y1 * spatial_scale - offset
    roi_w = (x2 * spatial_scale - offset) - start_w
    roi_h = (y2 * spatial_scale - offset) - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        grid_h = sampling_ratio * 1.0
        grid_w = sampling_ratio * 1.0
    else:
        grid_h = tl.ceil(roi_h / PH)
        grid_w = tl.ceil(roi_w / PW)
    return b, b_ok, start_h, start_w, bin_h, bin_w, grid_h, grid_w


@triton.jit
def bilinear_axis(pos, size):
    """torchvision's bilinear rule along one axis for sample positions ``pos``.

    Returns (low, high, w_low, w_high, valid); a position outside [-1, size] (or NaN) is
    invalid and must contribute nothing.
    """
    valid = (pos >= -1.0) & (pos <= size)
    pos = tl.where(valid, tl.maximum(pos, 0.0), 0.0)
    low = pos.to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    pos = tl.where(at_edge, low.to(tl.float32), pos)
    frac = pos - low.to(tl.float32)
    return low, high, 1.0 - frac, frac, valid


@triton.jit
def sample_pos(start, p, bin_size, i, grid):
    """Position of sample i of bin p along one axis, torchvision's expression in its order:
    ``start + p * bin + (i + 0.5) * bin / grid``."""
    return start + p * bin_size + (i + 0.5) * bin_size / grid


@triton.jit(noinline=True)
def _bisect(start, bin_size, grid, lo, hi, p, i, BINS: tl.constexpr, bound,
            PAST: tl.constexpr):
    """The first n in [lo, hi] for which the sample position reaches ``bound`` (PAST: passes
    it): n a bin (sample ``i`` of bin n) with BINS, else a sample (sample n of bin ``p``).
    Bisection on the positions themselves, which increase with the sample within a bin and
    with the bin for a given sample (each rounding is monotone). Scalars, int32."""
    hi = hi + lo * 0     # a tensor even where a size specializes to a constant (1 bin)
    # a trip count the compiler cannot see: a constant one was unrolled, four bisections of
    # 31 steps, and tripled the compile check's time
    for _ in range(0, lo * 0 + 31):
        active = lo < hi
        mid = (lo + hi) // 2
        if BINS:
            pos = sample_pos(start, mid.to(tl.float32), bin_size, i, grid)
        else:
            pos = sample_pos(start, p, bin_size, mid, grid)
        if PAST:
            past = pos > bound
        else:
            past = pos >= bound
        hi = tl.where(active & past, mid, hi)
        lo = tl.where(active & ~past, mid + 1, lo)
    return lo


@triton.jit
def sample_plan(start, bin_size, grid, size, bins):
    """How one axis's samples are visited: (first sample, count of window a, count of
    window b), window a running from its first sample, window b from sample 0.

    torchvision visits all ``grid`` samples of every bin; a sample outside [-1, size] adds
    nothing but counts in the average. Where bins are much longer than the map and have
    far more samples than it has room for (a huge box with adaptive sampling asks
    ceil(box / bins) per bin: 1e9 for a box 2e9 wide over 2 bins; a bin longer than the map
    by 4 and more than 4 size + 16 samples) the axis is wide: at most two neighbouring bins
    reach the map, the end of one (window a) and the start of the
    next (window b), found by bisection on the same position expression, two more samples
    on each side. Every lane visits both windows' sample indices: in a lane of another bin
    the same index lands a bin's length (more than the map) away, outside [-1, size], and
    adds nothing, so there is no per-lane bookkeeping. The same sum in the same order as
    torchvision's, work bounded by the map's size, not the box's. Otherwise (up to
    4 size + 16 samples a bin) window a is the whole grid, as torchvision's loop. All
    scalars, int32 (no 64-bit division: its routine alone cost the kernel 10-20 registers)."""
    # 2**30 keeps the integers finite for any box (torchvision's int would overflow)
    grid_i = tl.maximum(
        tl.minimum(tl.where(grid == grid, grid, 0.0), 1073741824.0).to(tl.int32), 0)
    first = grid_i * 0
    count_a = grid_i
    count_b = grid_i * 0
    if (grid > 4.0 * size + 16.0) & (bin_size > size + 4.0):
        last_i = grid_i - 1
        # the first bin whose last sample reaches -1, its first sample to do so; the last
        # bin whose first sample stays within size, its last sample to do so
        p_lo = _bisect(start, bin_size, grid, first, bins - 1, 0.0, last_i, True, -1.0, False)
        i_lo = _bisect(start, bin_size, grid, first, last_i, p_lo.to(tl.float32), 0, False,
                       -1.0, False)
        p_hi = _bisect(start, bin_size, grid, first, bins, 0.0, first, True, size * 1.0,
                       True) - 1
        i_hi = _bisect(start, bin_size, grid, first, grid_i, p_hi.to(tl.float32), 0, False,
                       size * 1.0, True) - 1
        first = tl.maximum(i_lo - 2, 0)
        two = p_hi > p_lo                   # the windows reach into the next bin
        last = tl.minimum(i_hi + 2, last_i)
        empty = (p_hi < p_lo) | (p_hi < 0)
        count_a = tl.where(empty, 0, tl.where(two, grid_i - first, last - first + 1))
        # (the windows never overlap: a bin's valid samples are fewer than its grid by far;
        # the minimum keeps any index from being visited twice whatever the rounding)
        count_b = tl.where(empty | ~two, 0, tl.minimum(last + 1, first))
    return first, count_a, count_b


@triton.jit
def sample_index(t, first, count_a):
    """Sample index of iteration t of an axis's loop (:func:`sample_plan`)."""
    return tl.where(t < count_a, first + t, t - count_a)


@triton.jit
def sample_rows(start, p, bin_size, i, grid, size, stride):
    """Sample i of bin p along one axis, at torchvision's position (:func:`sample_pos`), as
    its two bilinear neighbours' offsets (index times ``stride``: pass an int64 stride for
    int64 offsets), their weights and whether the sample counts."""
    pos = sample_pos(start, p, bin_size, i, grid)
    lo, hi, w_lo, w_hi, valid = bilinear_axis(pos, size)
    return lo * stride, hi * stride, w_lo, w_hi, valid


@triton.jit
def roi_level(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
              r, K_MIN: tl.constexpr, K_MAX: tl.constexpr, CANONICAL_SCALE: tl.constexpr,
              CANONICAL_LEVEL: tl.constexpr, EPS: tl.constexpr, NUM_LEVELS: tl.constexpr):
    """torchvision's LevelMapper for RoI r: (level index in [0, NUM_LEVELS), pooled?).

    floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps) clamped to
    [k_min, k_max], minus k_min, in float32 with IEEE sqrt and division as torch computes
    it. A NaN level (negative area) or an index outside the maps pools nothing, as in
    torchvision; so does a RoI with non-finite coordinates.
    """
    base = rois_ptr + r * 5
    x1 = tl.load(base + 1)
    y1 = tl.load(base + 2)
    x2 = tl.load(base + 3)
    y2 = tl.load(base + 4)
    big = float("inf")
    ok = (tl.abs(x1) < big) & (tl.abs(y1) < big) & (tl.abs(x2) < big) & (tl.abs(y2) < big)
    if NUM_LEVELS == 1:
        lvl = 0
    else:
        s = tl.sqrt_rn((x2 - x1) * (y2 - y1))
        t = tl.floor(CANONICAL_LEVEL + tl.log2(tl.div_rn(s, CANONICAL_SCALE)) + EPS)
        t = tl.minimum(tl.maximum(t, K_MIN), K_MAX)
        ok = ok & (s == s)
        lvl = (tl.where(ok, t, K_MIN) - K_MIN).to(tl.int32)
        ok = ok & (lvl >= 0) & (lvl < NUM_LEVELS)
    return lvl, ok


@triton.jit
def pick_level(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """The per-level argument of level ``lvl`` (a select, so pointers and mixed int widths
    work; only the first NUM_LEVELS arguments are read: the others may be None)."""
    v = v0
    if NUM_LEVELS > 1:
        v = tl.where(lvl == 1, v1, v)
    if NUM_LEVELS > 2:
        v = tl.where(lvl == 2, v2, v)
    if NUM_LEVELS > 3:
        v = tl.where(lvl == 3, v3, v)
    if NUM_LEVELS > 4:
        v = tl.where(lvl == 4, v4, v)
    return v


@triton.jit
def roi_on_level(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
                 r,
                 x0_ptr, H0, W0, scale0,  # per level: map (N, C, H, W), size, spatial
                 x1_ptr, H1, W1, scale1,  # scale; levels past NUM_LEVELS are None
                 x2_ptr, H2, W2, scale2,
                 x3_ptr, H3, W3, scale3,
                 x4_ptr, H4, W4, scale4,
                 N, C, sampling_ratio, PH, PW,
                 K_MIN: tl.constexpr, K_MAX: tl.constexpr, CANONICAL_SCALE: tl.constexpr,
                 CANONICAL_LEVEL: tl.constexpr, EPS: tl.constexpr,
                 NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """RoI r's map and sampling grid: its level (torchvision's LevelMapper; level 0 when
    NUM_LEVELS is 1), that level's pointer, size and strides (every map dense, NCHW or
    CHANNELS_LAST), and the box decoded on that level's scale. A RoI no level pools (NaN
    level, non-finite box) or whose batch index is outside [0, N) gets an empty grid."""
    lvl, ok = roi_level(rois_ptr, r, K_MIN, K_MAX, CANONICAL_SCALE, CANONICAL_LEVEL, EPS,
                        NUM_LEVELS)
    x_ptr = pick_level(lvl, x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, NUM_LEVELS)
    H = pick_level(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = pick_level(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    scale = pick_level(lvl, scale0, scale1, scale2, scale3, scale4, NUM_LEVELS)
    if CHANNELS_LAST:
        stride_c = 1
        stride_w = C
        stride_h = W * C
    else:
        stride_w = 1
        stride_h = W
        stride_c = H * W
    stride_n = (H * W).to(tl.int64) * C
    b, b_ok, start_h, start_w, bin_h, bin_w, grid_h, grid_w = roi_box(
        rois_ptr, r, scale, PH, PW, sampling_ratio, N, ALIGNED)
    ok = ok & b_ok
    grid_h = tl.where(ok, grid_h, 0.0)
    grid_w = tl.where(ok, grid_w, 0.0)
    return (x_ptr, H, W, stride_n, stride_c, stride_h, stride_w, b, start_h, start_w, bin_h,
            bin_w, grid_h, grid_w)


@triton.jit
def along_p(v, P_MAJOR: tl.constexpr):
    """A vector over output bins as a tile axis: the fast (lane) axis when P_MAJOR."""
    if P_MAJOR:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def along_c(v, P_MAJOR: tl.constexpr):
    """A vector over channels as a tile axis: the fast (lane) axis unless P_MAJOR."""
    if P_MAJOR:
        return v[:, None]
    else:
        return v[None, :]


# ---------------------------------------------------------------------------------------
# Host helpers

@dataclasses.dataclass(frozen=True)
class Pyramid:
    """The maps RoI Align pools from, as its launchers and references take them: one scale
    per level and torchvision's LevelMapper constants (read only with more than one level;
    RoIAlign is ``Pyramid((spatial_scale,))``). A backward also needs the maps' shapes
    and layouts (``shapes``, ``channels_last``): :meth:`of` records them."""
    scales: tuple[float, ...]
    k_min: int = 0
    k_max: int = 0
    canonical_scale: float = 224.0
    canonical_level: float = 4.0
    eps: float = 1e-6
    shapes: tuple[tuple[int, int, int, int], ...] = ()
    channels_last: tuple[bool, ...] = ()

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    def of(self, maps: list[Tensor]) -> "Pyramid":
        """This pyramid with the shapes and layouts of ``maps``."""
        return dataclasses.replace(self, shapes=tuple(tuple(m.shape) for m in maps),
                                   channels_last=tuple(is_channels_last(m) for m in maps))

    def mapper_constexprs(self) -> dict:
        """The level mapper's constants as the kernel's constexprs (fixed per pooler)."""
        return dict(K_MIN=int(self.k_min), K_MAX=int(self.k_max),
                    CANONICAL_SCALE=float(self.canonical_scale),
                    CANONICAL_LEVEL=float(self.canonical_level), EPS=float(self.eps))

    def levels(self, rois: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(K,) int64 level index of each RoI (torchvision's LevelMapper, computed in
        ``dtype``), -1 where none is pooled: a NaN level (negative area), an index outside
        the maps, non-finite coordinates. The host twin of :func:`roi_level`."""
        r = rois.to(dtype)
        ok = torch.isfinite(r[:, 1:]).all(1)
        if self.num_levels == 1:
            lvl = torch.zeros(r.shape[0], dtype=torch.int64, device=r.device)
        else:
            s = torch.sqrt((r[:, 3] - r[:, 1]) * (r[:, 4] - r[:, 2]))
            t = torch.floor(self.canonical_level + torch.log2(s / self.canonical_scale)
                            + torch.tensor(self.eps, dtype=dtype))
            t = torch.clamp(t, min=self.k_min, max=self.k_max)
            ok = ok & ~torch.isnan(t)
            lvl = torch.where(ok, t, torch.full_like(t, self.k_min)).to(torch.int64) - self.k_min
            ok = ok & (lvl >= 0) & (lvl < self.num_levels)
        return torch.where(ok, lvl, torch.full_like(lvl, -1))

    def grad_numel(self) -> int:
        return sum(n * c * h * w for n, c, h, w in self.shapes)

    @property
    def grad_channels_last(self) -> bool:
        """The layout of every level's gradient in the flat buffer: channels_last when most
        maps are (the kernel's lanes follow one layout for all levels in one launch)."""
        return 2 * sum(self.channels_last) > len(self.channels_last)

    def level_views(self, flat: Tensor) -> list[Tensor]:
        """Per-level (N, C, H, W) views of one flat buffer of :meth:`grad_numel` elements,
        each dense in the layout :attr:`grad_channels_last` says."""
        views, offset = [], 0
        cl = self.grad_channels_last
        for n, c, h, w in self.shapes:
            chunk = flat[offset:offset + n * c * h * w]
            views.append(chunk.view(n, h, w, c).permute(0, 3, 1, 2) if cl
                         else chunk.view(n, c, h, w))
            offset += n * c * h * w
        return views

    def flatten(self, grads: list[Tensor]) -> Tensor:
        """The inverse of :meth:`level_views`: per-level gradients into one flat buffer."""
        cl = self.grad_channels_last
        return torch.cat([(g.permute(0, 2, 3, 1) if cl else g).reshape(-1) for g in grads])


def level_args(tensors: list[Tensor], scales: tuple[float, ...]) -> list:
    """Per-level kernel arguments (pointer, H, W, scale), levels past the maps None (the
    kernel never reads them, and None is a constant to Triton, not a runtime argument)."""
    args = []
    for t, scale in zip(tensors, scales):
        args += [t, t.shape[2], t.shape[3], float(scale)]
    return args + _UNUSED_LEVELS[:4 * (MAX_LEVELS - len(tensors))]


_UNUSED_LEVELS = [None] * (4 * MAX_LEVELS)


def p_major(tensors: list[Tensor]) -> bool:
    """Lanes along output bins unless channels are contiguous (channels_last) in most maps:
    in NCHW neighbouring bins sample neighbouring pixels of one plane, in channels_last a
    pixel's channels are one contiguous vector."""
    return 2 * sum(t.stride(1) == 1 for t in tensors) <= len(tensors)


def dense(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` as the kernels read a map: dense NCHW, or dense channels_last (a copy only for
    another layout or a strided view)."""
    if channels_last:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def check_image_extent(shape, strides, name: str) -> None:
    """Offsets inside one image are int32 in the kernels (fewer registers than int64);
    the image offset itself is int64. Refuse an image too large for that."""
    extent = sum((d - 1) * abs(s) for d, s in zip(shape[1:], strides[1:]))
    if extent >= 2**31:
        raise ValueError(f"{name}: one image spans {extent} elements; at most 2**31 - 1 "
                         "are supported per image")


# Sparse entries built per step; bounds the memory of the index/weight tensors.
_ENTRY_BUDGET = 1 << 22


def _positions(start: Tensor, bin_size: Tensor, grid_f: Tensor, p: Tensor, i: Tensor) -> Tensor:
    """torchvision's sample positions ``start + p * bin + (i + 0.5) * bin / grid``, in its
    order, broadcast over (k, pooled, samples)."""
    return (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
            + (i + 0.5) * bin_size[:, None, None] / grid_f[:, None, None])


def _first_sample_host(start: Tensor, bin_size: Tensor, grid: Tensor, p: Tensor, bound: float,
                  past: bool) -> Tensor:
    """(k, pooled) first sample index in [0, grid] whose position is at least ``bound``
    (``past``: above it), by bisection on the positions (they increase with the index for
    a positive bin): the host twin of the kernels' ``_first_sample``."""
    dtype = start.dtype
    grid_f = grid.to(dtype).clamp(min=1)
    lo = torch.zeros(start.shape[0], p.shape[0], dtype=torch.int64, device=start.device)
    hi = grid[:, None].expand_as(lo).clone()
    for _ in range(63):
        active = lo < hi
        if not bool(active.any()):
            break
        mid = (lo + hi) // 2
        pos = _positions(start, bin_size, grid_f, p, mid[:, :, None].to(dtype))[:, :, 0]
        over = pos > bound if past else pos >= bound
        hi = torch.where(active & over, mid, hi)
        lo = torch.where(active & ~over, mid + 1, lo)
    return lo


def axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int,
                  g_max: int, dtype: torch.dtype):
    """torchvision's per-axis bilinear rule for the samples of every bin.

    start, bin_size: (k,) float; grid: (k,) int64 samples per bin along this axis, at most
    ``g_max``. Returns (index, weight), each (k, pooled, S, 2): the low and high neighbours
    and their weights; samples past a RoI's own grid, or outside [-1, size], weigh 0. S is
    ``g_max``, except where bins have more samples than the map has room for (a huge box:
    adaptive sampling asks ceil(box / bins) per bin): then each bin's window of samples
    that can land on the map, one more on each side (as the kernels' ``sample_span``).
    """
    p = torch.arange(pooled, dtype=dtype, device=start.device)
    grid_f = grid.to(dtype).clamp(min=1)
    first = torch.zeros(start.shape[0], pooled, dtype=torch.int64, device=start.device)
    span = g_max
    if g_max > 2 * size + 4 and start.numel():
        wide = (bin_size > 0)[:, None]
        lo = _first_sample_host(start, bin_size, grid, p, -1.0, False) - 1
        hi = _first_sample_host(start, bin_size, grid, p, float(size), True)
        first = torch.where(wide, lo.clamp(min=0), first)
        last = torch.where(wide, torch.minimum(hi, grid[:, None] - 1), grid[:, None] - 1)
        span = max(1, int((last - first + 1).max()))
    i = first[:, :, None] + torch.arange(span, device=start.device)
    pos = _positions(start, bin_size, grid_f, p, i.to(dtype))
    valid = (i < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(dtype), pos)
    frac = pos - low.to(dtype)
    index = torch.stack([low, high], -1)
    weight = torch.stack([(1 - frac) * valid, frac * valid], -1)
    return index, weight


def _geometry(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
              sampling_ratio: int, aligned: bool, dtype: torch.dtype):
    """Per-RoI start, bin size and samples per bin, in torchvision's arithmetic."""
    r = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    start_w = r[:, 1] * spatial_scale - offset
    start_h = r[:, 2] * spatial_scale - offset
    roi_w = r[:, 3] * spatial_scale - offset - start_w
    roi_h = r[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full(roi_h.shape, sampling_ratio, dtype=torch.int64, device=r.device)
        grid_w = torch.full(roi_w.shape, sampling_ratio, dtype=torch.int64, device=r.device)
    else:
        grid_h = torch.ceil(roi_h / pooled_h).long()
        grid_w = torch.ceil(roi_w / pooled_w).long()
    count = (grid_h * grid_w).clamp(min=1).to(dtype)
    # a negative grid means no samples at all (torchvision's loops do not run)
    return (start_h, start_w, roi_h / pooled_h, roi_w / pooled_w,
            grid_h.clamp(min=0), grid_w.clamp(min=0), count)


def sampling_entries(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                     sampling_ratio: int, aligned: bool, shape,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Non-zero entries (row, column, weight) of the sampling matrix S, on rois' device.

    Row k*PH*PW + ph*PW + pw holds, for every sample of that bin and each of its four
    neighbours, weight_y * weight_x / count at column b*H*W + y*W + x. The grouping below
    reads a few per-group sizes on the host (one sync per group on a GPU).
    """
    n, c, h, w = shape
    rois = rois.detach()
    dev = rois.device
    if rois.shape[0] == 0 or pooled_h * pooled_w == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, torch.zeros(0, dtype=dtype, device=dev)
    start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _geometry(
        rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, dtype)
    # a batch index outside [0, N) (as torchvision truncates it) or a non-finite box pools
    # nothing: the kernels' rule for values nobody checked
    pooled = (rois[:, 0] > -1) & (rois[:, 0] < n) & torch.isfinite(rois[:, 1:]).all(1)
    batch = torch.where(pooled, rois[:, 0], 0).long()
    grid_h, grid_w = grid_h * pooled, grid_w * pooled
    bins = torch.arange(pooled_h * pooled_w, device=dev).reshape(1, pooled_h, pooled_w)
    rows, cols, vals = [], [], []
    # RoIs grouped by sample count (powers of two), each group cut into pieces that fit
    # the entry budget once padded to the group's largest grid: loops over groups of RoIs,
    # never over single RoIs.
    # (samples per bin as axis_samples visits them: at most a window of about 2 size + 5)
    entries = (pooled_h * pooled_w * 4 * grid_h.clamp(min=1, max=2 * h + 6)
               * grid_w.clamp(min=1, max=2 * w + 6))
    bucket = torch.log2(entries.double()).ceil().long()
    for key in torch.unique(bucket).tolist():
        members = (bucket == key).nonzero().flatten()
        step = max(1, _ENTRY_BUDGET >> key)
        for idx in members.split(step):
            gh_max, gw_max = (max(int(v), 1) for v in torch.stack(
                [grid_h[idx].max(), grid_w[idx].max()]).tolist())
            iy, wy = axis_samples(start_h[idx], bin_h[idx], grid_h[idx], pooled_h, h,
                                   gh_max, dtype)
            ix, wx = axis_samples(start_w[idx], bin_w[idx], grid_w[idx], pooled_w, w,
                                   gw_max, dtype)
            # broadcast to (k, PH, PW, gh, 2, gw, 2)
            iy, wy = iy[:, :, None, :, :, None, None], wy[:, :, None, :, :, None, None]
            ix, wx = ix[:, None, :, None, None, :, :], wx[:, None, :, None, None, :, :]
            weight = wy * wx / count[idx].reshape(-1, 1, 1, 1, 1, 1, 1)
            col = batch[idx].reshape(-1, 1, 1, 1, 1, 1, 1) * (h * w) + iy * w + ix
            row = idx.reshape(-1, 1, 1) * (pooled_h * pooled_w) + bins
            row = row[:, :, :, None, None, None, None].expand_as(weight)
            keep = weight != 0
            rows.append(row[keep])
            cols.append(col.expand_as(weight)[keep])
            vals.append(weight[keep])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, torch.zeros(0, dtype=dtype, device=dev)
    return torch.cat(rows), torch.cat(cols), torch.cat(vals)

