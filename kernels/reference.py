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

from ._sampling import sampling_entries

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
