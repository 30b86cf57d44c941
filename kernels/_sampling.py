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
check, the mask targets' grouping of RoIs by image (:func:`image_rows`), and the list of
sampling entries (output bin, input pixel, weight) that the deterministic backward sorts
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
            r, spatial_scale, PH, PW, sampling_ratio, ALIGNED: tl.constexpr):
    """Decode RoI r: batch index, start (y, x), bin size (y, x), samples per bin (y, x)."""
    base = rois_ptr + r * 5
    b = tl.load(base).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(base + 1) * spatial_scale - offset
    start_h = tl.load(base + 2) * spatial_scale - offset
    roi_w = (tl.load(base + 3) * spatial_scale - offset) - start_w
    roi_h = (tl.load(base + 4) * spatial_scale - offset) - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    else:
        grid_h = tl.ceil(roi_h / PH).to(tl.int32)
        grid_w = tl.ceil(roi_w / PW).to(tl.int32)
    return b, start_h, start_w, bin_h, bin_w, grid_h, grid_w


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
def sample_rows(start, p, bin_size, i, grid, size, stride):
    """Sample i of bin p along one axis, at torchvision's position
    ``start + p * bin + (i + 0.5) * bin / grid``, as its two bilinear neighbours' offsets
    (index times ``stride``: pass an int64 stride for int64 offsets), their weights and
    whether the sample counts."""
    pos = start + p * bin_size + (i + 0.5) * bin_size / grid
    lo, hi, w_lo, w_hi, valid = bilinear_axis(pos, size)
    return lo * stride, hi * stride, w_lo, w_hi, valid


@triton.jit
def roi_level(rois_ptr,  # (K, 5) float32: batch index, x1, y1, x2, y2
              r, k_min, k_max, canonical_scale, canonical_level, eps,
              NUM_LEVELS: tl.constexpr):
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
        t = tl.floor(canonical_level + tl.log2(tl.div_rn(s, canonical_scale)) + eps)
        t = tl.minimum(tl.maximum(t, k_min), k_max)
        ok = ok & (s == s)
        lvl = (tl.where(ok, t, k_min) - k_min).to(tl.int32)
        ok = ok & (lvl >= 0) & (lvl < NUM_LEVELS)
    return lvl, ok


@triton.jit
def pick_level(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """The per-level argument of level ``lvl`` (a select, so pointers and mixed int widths
    work; only the first NUM_LEVELS arguments are read)."""
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
                 x0_ptr, H0, W0, sn0, sc0, sh0, sw0, scale0,  # per level: map, size,
                 x1_ptr, H1, W1, sn1, sc1, sh1, sw1, scale1,  # strides, spatial scale
                 x2_ptr, H2, W2, sn2, sc2, sh2, sw2, scale2,
                 x3_ptr, H3, W3, sn3, sc3, sh3, sw3, scale3,
                 x4_ptr, H4, W4, sn4, sc4, sh4, sw4, scale4,
                 k_min, k_max, canonical_scale, canonical_level, eps, sampling_ratio, PH, PW,
                 NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr):
    """RoI r's map and sampling grid: its level (torchvision's LevelMapper; level 0 when
    NUM_LEVELS is 1), that level's pointer, size and strides, and the box decoded on that
    level's scale. A RoI no level pools (NaN level, non-finite box) gets an empty grid."""
    lvl, ok = roi_level(rois_ptr, r, k_min, k_max, canonical_scale, canonical_level, eps,
                        NUM_LEVELS)
    x_ptr = pick_level(lvl, x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, NUM_LEVELS)
    H = pick_level(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = pick_level(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    stride_n = pick_level(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    stride_c = pick_level(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    stride_h = pick_level(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    stride_w = pick_level(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)
    scale = pick_level(lvl, scale0, scale1, scale2, scale3, scale4, NUM_LEVELS)
    b, start_h, start_w, bin_h, bin_w, grid_h, grid_w = roi_box(
        rois_ptr, r, scale, PH, PW, sampling_ratio, ALIGNED)
    grid_h = tl.where(ok, grid_h, 0)
    grid_w = tl.where(ok, grid_w, 0)
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

    def mapper_args(self) -> list[float]:
        """The level-mapper kernel arguments."""
        return [float(self.k_min), float(self.k_max), float(self.canonical_scale),
                float(self.canonical_level), float(self.eps)]

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

    def level_views(self, flat: Tensor) -> list[Tensor]:
        """Per-level (N, C, H, W) views of one flat buffer of :meth:`grad_numel` elements,
        each in its map's layout."""
        views, offset = [], 0
        for (n, c, h, w), cl in zip(self.shapes, self.channels_last):
            chunk = flat[offset:offset + n * c * h * w]
            views.append(chunk.view(n, h, w, c).permute(0, 3, 1, 2) if cl
                         else chunk.view(n, c, h, w))
            offset += n * c * h * w
        return views

    def flatten(self, grads: list[Tensor]) -> Tensor:
        """The inverse of :meth:`level_views`: per-level gradients into one flat buffer."""
        return torch.cat([(g.permute(0, 2, 3, 1) if cl else g).reshape(-1)
                          for g, cl in zip(grads, self.channels_last)])



def level_args(tensors: list[Tensor], scales: tuple[float, ...]) -> list:
    """Per-level kernel arguments (pointer, H, W, 4 strides, scale), padded to MAX_LEVELS
    with copies of level 0 that the kernel never reads."""
    args = []
    for i in range(MAX_LEVELS):
        j = i if i < len(tensors) else 0
        t = tensors[j]
        args += [t, t.shape[2], t.shape[3], *t.stride(), float(scales[j])]
    return args


def p_major(tensors: list[Tensor]) -> bool:
    """Lanes along output bins unless channels are contiguous (channels_last) in most maps:
    in NCHW neighbouring bins sample neighbouring pixels of one plane, in channels_last a
    pixel's channels are one contiguous vector."""
    return 2 * sum(t.stride(1) == 1 for t in tensors) <= len(tensors)


def check_image_extent(shape, strides, name: str) -> None:
    """Offsets inside one image are int32 in the kernels (fewer registers than int64);
    the image offset itself is int64. Refuse an image too large for that."""
    extent = sum((d - 1) * abs(s) for d, s in zip(shape[1:], strides[1:]))
    if extent >= 2**31:
        raise ValueError(f"{name}: one image spans {extent} elements; at most 2**31 - 1 "
                         "are supported per image")


def image_rows(gt_masks: list[Tensor], rows: list[int]):
    """(slice of the image's rows, its gt masks) for each image with rows: the mask
    targets' RoIs are grouped by image, each image with its own masks and size."""
    start = 0
    for masks, r in zip(gt_masks, rows):
        if r:
            yield slice(start, start + r), masks
        start += r


# Sparse entries built per step; bounds the memory of the index/weight tensors.
_ENTRY_BUDGET = 1 << 22


def axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int,
                  g_max: int, dtype: torch.dtype):
    """torchvision's per-axis bilinear rule for every sample of every bin.

    start, bin_size: (k,) float; grid: (k,) int64 samples per bin along this axis.
    Returns (index, weight), each (k, pooled, g_max, 2): the low and high neighbours and
    their weights; samples past a RoI's own grid, or outside [-1, size], weigh 0.
    """
    i = torch.arange(g_max, dtype=dtype, device=start.device)
    p = torch.arange(pooled, dtype=dtype, device=start.device)
    grid_f = grid.to(dtype).clamp(min=1)
    # coordinate of sample i of bin p: start + p*bin + (i + .5)*bin/grid (torchvision's order)
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
           + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid_f[:, None, None])
    valid = (i[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
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
    batch = rois[:, 0].long()
    bins = torch.arange(pooled_h * pooled_w, device=dev).reshape(1, pooled_h, pooled_w)
    rows, cols, vals = [], [], []
    # RoIs grouped by sample count (powers of two), each group cut into pieces that fit
    # the entry budget once padded to the group's largest grid: loops over groups of RoIs,
    # never over single RoIs.
    entries = pooled_h * pooled_w * 4 * grid_h.clamp(min=1) * grid_w.clamp(min=1)
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

