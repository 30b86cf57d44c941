"""Pure-PyTorch reference implementations: the CPU path and the test oracle.

They are written differently from the kernels on purpose, so that one checks the other.
RoI Align's bilinear sampling is separable: a sample's weight is (weight along y) x
(weight along x), and torchvision's out-of-range rule (y < -1 or y > H or x < -1 or
x > W gives 0) is per axis too. So the whole op is one sparse matrix S (rows: output
bins, columns: input pixels, values: weight_y * weight_x / count) applied to the input
viewed as (N*H*W, C): ``out = S @ X``, and its gradient is ``S^T @ dout``.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Sparse entries built per step; bounds the memory of the index/weight tensors.
_ENTRY_BUDGET = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int,
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
            iy, wy = _axis_samples(start_h[idx], bin_h[idx], grid_h[idx], pooled_h, h,
                                   gh_max, dtype)
            ix, wx = _axis_samples(start_w[idx], bin_w[idx], grid_w[idx], pooled_w, w,
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


def _sampling_matrix(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                     sampling_ratio: int, aligned: bool, shape, dtype: torch.dtype) -> Tensor:
    """Sparse (K*PH*PW, N*H*W) matrix S with out = S @ input-as-(N*H*W, C)."""
    n, c, h, w = shape
    rows, cols, vals = sampling_entries(rois.cpu(), spatial_scale, pooled_h, pooled_w,
                                        sampling_ratio, aligned, shape, dtype)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals,
                                   (rois.shape[0] * pooled_h * pooled_w, n * h * w),
                                   check_invariants=False)


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoI Align forward; input (N, C, H, W), rois (K, 5) -> (K, C, PH, PW) in input.dtype."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = _compute_dtype(input.dtype)
    mat = _sampling_matrix(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                           input.shape, dtype).to(input.device)
    flat = input.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = torch.sparse.mm(mat, flat)                     # (K*PH*PW, C)
    return out.reshape(k, pooled_h, pooled_w, c).permute(0, 3, 1, 2).contiguous().to(
        input.dtype)


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool,
                       input_shape: tuple[int, int, int, int]) -> Tensor:
    """Gradient of :func:`roi_align_forward` w.r.t. its input: (N, C, H, W) in grad.dtype."""
    n, c, h, w = input_shape
    dtype = _compute_dtype(grad.dtype)
    mat = _sampling_matrix(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                           input_shape, dtype).to(grad.device)
    flat = grad.to(dtype).permute(0, 2, 3, 1).reshape(-1, c)   # (K*PH*PW, C)
    grad_flat = torch.sparse.mm(mat.t(), flat)                  # (N*H*W, C)
    return grad_flat.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous().to(grad.dtype)
