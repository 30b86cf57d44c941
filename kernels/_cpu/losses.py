"""The mask losses on the CPU: PyTorch's operations (its BCE with logits, :func:`_loss_sum`),
torchvision's targets from its roi_align by chunks of masks from the pool, and the fused predictor losses' products on chunks of instances in one
reused buffer (no map-sized float32 copy of the features, no map-sized float32
gradient)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import reference
from .._boxes import image_rows, sampled_labels, sampled_rois
from .._utils import compute_dtype, is_channels_last, memory_format
from .pool import in_pool
from .roi_align import _safe_rois, _wide


def _loss_sum(x: Tensor, t: Tensor) -> Tensor:
    """The mask loss terms' sum: PyTorch's own binary cross-entropy with logits, one fused
    pass (a formula of five vectorized passes measured slower here once the selected planes
    outgrow the cache: 1.6 ms against 0.4 at 512 x 28 x 28)."""
    return F.binary_cross_entropy_with_logits(x, t, reduction="sum")


def _planes(logits: Tensor, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Each row's class plane in ``dtype``, and which rows' labels are in [0, K) (None: all
    of them, the checked case, one read of the labels): a row whose label is not is
    ignored, the kernels' rule for values nobody checked."""
    lo, hi = torch.stack(torch.aminmax(labels)).tolist() if labels.numel() else (0, 0)
    if 0 <= lo and hi < logits.shape[1]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, labels].to(dtype), None
    return reference._selected_planes(logits, labels, dtype)


def _loss(x: Tensor, t: Tensor, ok: Tensor | None) -> Tensor:
    """The mean loss over every row's pixels, rows ``ok`` only (None: all)."""
    return (_loss_sum(x, t) if ok is None else _loss_sum(x[ok], t[ok])) / x.numel()


def _gradient(x: Tensor, t: Tensor, ok: Tensor | None) -> Tensor:
    """d loss / d selected logit: ``(sigmoid(x) - t) / count``, zero for ignored rows."""
    grad = torch.sigmoid(x).sub_(t).div_(x.numel())
    return grad if ok is None else grad.mul_(ok[:, None, None])


def _selected_loss(logits: Tensor, targets: Tensor, labels: Tensor,
                   compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(mean BCE of each row's class plane against ``targets``, d loss / d selected logit)
    in the compute dtype."""
    x, ok = _planes(logits, labels, compute_dtype(logits.dtype))
    t = targets.to(x.dtype)
    return _loss(x, t, ok), _gradient(x, t, ok) if compute_grad else x[:0]


def mask_loss_forward(logits: Tensor, targets: Tensor, labels: Tensor,
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    """The mask loss (:func:`_loss_sum`'s formula) and, for the backward, its gradient to
    the selected logits (``reference.mask_loss_backward`` scatters it)."""
    return _selected_loss(logits, targets, labels, compute_grad)


class EagerMaskLoss(torch.autograd.Function):
    """A mask loss in eager CPU code, the gradient computed by the backward: the custom
    op's gradient-in-forward saves the GPU a pass over the selected logits but costs the
    CPU one when only the forward runs (``targets``: the targets, or a function of no
    argument that samples them)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets, labels: Tensor) -> Tensor:
        x, ok = _planes(logits, labels, compute_dtype(logits.dtype))
        t = (targets() if callable(targets) else targets).to(x.dtype)
        ctx.save_for_backward(x, t, labels, ok)
        ctx.logits = (logits.shape[1], is_channels_last(logits), logits.dtype)
        return _loss(x, t, ok)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, t, labels, ok = ctx.saved_tensors
        grad_logits = reference.mask_loss_backward(grad, _gradient(x, t, ok), labels,
                                                   *ctx.logits)
        return grad_logits, None, None


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """``mask_loss`` in eager CPU code, with a gradient (:class:`EagerMaskLoss`)."""
    return EagerMaskLoss.apply(logits, targets, labels)


class EagerMaskRCNNLoss(EagerMaskLoss):
    """``maskrcnn_loss`` in eager CPU code: torchvision's targets of each chunk of masks and
    their loss terms computed in the pool thread that sampled them (while in cache), the
    gradient by the backward (:class:`EagerMaskLoss`'s)."""

    @staticmethod
    def forward(ctx, logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                gt_labels: list[Tensor], matched: list[Tensor]) -> Tensor:
        n, k, m, _ = logits.shape
        cdt = compute_dtype(logits.dtype)
        rois, labels = _sampled(proposals, gt_labels, matched)
        rows = [p.shape[0] for p in proposals]
        if _any_wide(rois, gt_masks, rows, m):          # the reference's targets
            return EagerMaskLoss.forward(ctx, logits, lambda: mask_targets(
                rois, gt_masks, rows, m, cdt), labels)
        ok = (labels >= 0) & (labels < k)
        ok = None if bool(ok.all()) else ok
        picked = labels if ok is None else labels.clamp(0, k - 1)
        x, t = logits.new_empty(n, m, m, dtype=cdt), logits.new_empty(n, m, m, dtype=cdt)

        def loss_terms(rows_c: Tensor, t_c: Tensor) -> Tensor:
            x_c = logits[rows_c, picked[rows_c]].to(cdt)
            x[rows_c], t[rows_c] = x_c, t_c
            if ok is None:
                return _loss_sum(x_c, t_c)
            keep = ok[rows_c]
            return _loss_sum(x_c[keep], t_c[keep])
        sums = _target_chunks(rois, gt_masks, rows, m, cdt, loss_terms)
        ctx.save_for_backward(x, t, picked, ok)
        ctx.logits = (k, is_channels_last(logits), logits.dtype)
        return torch.stack(sums).sum() / x.numel()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return EagerMaskLoss.backward.__wrapped__(ctx, grad)[:1] + (None,) * 4


def maskrcnn_loss(logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                  gt_labels: list[Tensor], matched: list[Tensor]) -> Tensor:
    """``maskrcnn_loss`` in eager CPU code, with a gradient (:class:`EagerMaskRCNNLoss`)."""
    return EagerMaskRCNNLoss.apply(logits, proposals, gt_masks, gt_labels, matched)


# Mask targets sample each RoI's own gt mask. torchvision converts an image's masks whole to
# float (16 masks of 800x1216: 62 MB of fresh pages) and roi_align reads them back from
# memory, on one thread. Ours converts them TARGET_CHUNK_PIXELS at a time, only the masks
# some RoI samples, and runs torchvision's roi_align on each chunk's RoIs while the chunk is
# in cache, chunks spread over the pool: its computation per RoI, so its bits.
TARGET_CHUNK_PIXELS = 1 << 20


def _target_chunks(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int,
                   dtype: torch.dtype, then: Callable[[Tensor, Tensor], object]) -> list:
    """``then(rows, targets)`` for torchvision's targets of each chunk of rows (its roi_align
    of the image's gt masks in ``dtype``, (R, size, size)), run in the pool thread that
    sampled them; the results. Rows whose mask index is out of range, which only skipped
    data checks let through, get zero targets (they sample nothing, as on the Triton path).

    Nothing parallel runs on the main thread around the pool's work: a parallel op there
    (a new_zeros, an index_put of the results) leaves the main thread's OpenMP workers
    spinning on the cores the pool needs (libgomp's default wait), 2-3 ms lost at 128 RoIs."""
    chunks, results = [], []
    for i, masks in image_rows(gt_masks, rows):
        r, bad = _safe_rois(rois[i].to(dtype), masks.shape[0])
        rows_i = torch.arange(i.start, i.stop, device=rois.device)
        if bad is not None:
            results.append(then(rows_i[bad], r.new_zeros(int(bad.sum()), size, size)))
            r, rows_i = r[~bad], rows_i[~bad]
        per = max(1, TARGET_CHUNK_PIXELS // max(1, masks.shape[1] * masks.shape[2]))
        chunk = r[:, 0].long() // per
        for c in torch.unique(chunk).tolist():
            sel = chunk == c
            r_c = r[sel]                    # a copy: the shift onto the chunk is its own
            r_c[:, 0] -= c * per
            chunks.append((masks[c * per:(c + 1) * per], r_c, rows_i[sel]))

    def targets(item):
        masks, r_c, rows_c = item
        return then(rows_c, torch.ops.torchvision.roi_align(
            masks[:, None].to(dtype), r_c, 1.0, size, size, -1, False)[:, 0])
    return results + in_pool(targets, chunks)


def _sampled(proposals: list[Tensor], gt_labels: list[Tensor],
             matched: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The (N, 5) RoIs over the gt masks and each row's label (-1: ignored, its RoI an empty
    box on mask 0, which samples nothing)."""
    labels = sampled_labels(proposals, gt_labels, matched)
    rois = sampled_rois(proposals, matched)
    return torch.where((labels >= 0)[:, None], rois, torch.zeros_like(rois)), labels


def _any_wide(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int) -> bool:
    """Whether a proposal is too large for torchvision's kernel on its image's masks
    (:func:`_wide`): the targets then come from the reference."""
    return any(_wide(_safe_rois(rois[i], masks.shape[0])[0], (1.0,), size, size, -1,
                     [masks.shape[1:]]) for i, masks in image_rows(gt_masks, rows))


def mask_targets(rois: Tensor, gt_masks: list[Tensor], rows: list[int], size: int,
                 dtype: torch.dtype) -> Tensor:
    """torchvision's targets, its roi_align of each image's gt masks in ``dtype``
    (N, size, size), by :func:`_target_chunks` (huge proposals: see :func:`_wide`)."""
    if _any_wide(rois, gt_masks, rows, size):
        return reference._image_targets(rois, gt_masks, rows, size, dtype)
    out = rois.new_empty(rois.shape[0], size, size, dtype=dtype)

    def write(rows_c: Tensor, t: Tensor) -> None:       # each thread its rows
        out[rows_c] = t
    _target_chunks(rois, gt_masks, rows, size, dtype, write)
    return out


def maskrcnn_loss_forward(logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                          gt_labels: list[Tensor], matched: list[Tensor],
                          compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The mask loss on torchvision's targets (:func:`mask_targets`), and each row's label
    (empty unless ``compute_grad``)."""
    cdt = compute_dtype(logits.dtype)
    rois, labels = _sampled(proposals, gt_labels, matched)
    targets = mask_targets(rois, gt_masks, [p.shape[0] for p in proposals], logits.shape[-1],
                           cdt)
    loss, grad = _selected_loss(logits, targets, labels, compute_grad)
    return loss, grad, labels if compute_grad else labels[:0]


# The fused predictor loss reads the (N, C, M, M) features once forward and once backward.
# The reference converts them whole to float32 (a fresh map-sized buffer: 100 MB at N=128,
# C=256, M=28, and as long again in page faults as in copying) and writes the feature
# gradient whole in float32 before rounding it. Ours runs the same products on chunks of
# instances in a buffer of about PREDICTOR_CHUNK_BYTES, reused (cache-sized work, no
# map-sized temporary): bfloat16 forward about 15x faster here, float32 about 3x.
PREDICTOR_CHUNK_BYTES = 8 << 20


def _flat(t: Tensor) -> Tensor:
    """(N, C, M, M) as (N, C, M*M): a view of the storage for contiguous and channels_last
    tensors (for channels_last, the transpose of its contiguous (N, M*M, C))."""
    n, c, m, _ = t.shape
    if is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(n, m * m, c).transpose(1, 2)
    return t.reshape(n, c, m * m)


def _chunk_buffer(flat: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """An empty (rows, C, P) tensor in ``dtype`` laid out as ``flat``'s storage."""
    _, c, p = flat.shape
    if flat.stride(1) == 1 and c > 1:     # channels_last: (P, C) per instance
        return flat.new_empty(rows, p, c, dtype=dtype).transpose(1, 2)
    return flat.new_empty(rows, c, p, dtype=dtype)


def _instance_chunks(features: Tensor, dtype: torch.dtype):
    """(lo, hi, the features [lo, hi) as (k, C, M*M) in ``dtype``), chunk by chunk: the
    features themselves where they already are in ``dtype``, else a copy in one reused
    buffer laid out as the features (valid until the next chunk)."""
    n, c, m, _ = features.shape
    k = max(1, PREDICTOR_CHUNK_BYTES // (c * m * m * dtype.itemsize))
    flat = _flat(features)
    buffer = None if features.dtype == dtype else _chunk_buffer(flat, min(k, n), dtype)
    for lo in range(0, n, k):
        hi = min(n, lo + k)
        yield lo, hi, flat[lo:hi] if buffer is None else buffer[:hi - lo].copy_(flat[lo:hi])


def mask_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                targets: Tensor, labels: Tensor, compute_grad: bool):
    """The reference's forward, its logits computed chunk by chunk."""
    n, _, m, _ = features.shape
    cdt = compute_dtype(features.dtype)
    labels, ok = reference._class_rows(labels, weight.shape[0])
    w = weight.reshape(weight.shape[0], -1)[labels].to(cdt)
    x = features.new_empty(n, m * m, dtype=cdt)
    for lo, hi, f in _instance_chunks(features, cdt):
        torch.bmm(w[lo:hi, None, :], f, out=x[lo:hi, None, :])
    x += bias[labels].to(cdt)[:, None]
    loss, grad = reference._selected_logits_loss(x, targets.to(cdt).reshape(n, m * m),
                                                 compute_grad, ok)
    return loss, grad, labels if compute_grad else labels[:0]


def maskrcnn_predictor_loss_forward(features: Tensor, weight: Tensor, bias: Tensor,
                                    proposals: list[Tensor], gt_masks: list[Tensor],
                                    gt_labels: list[Tensor], matched: list[Tensor],
                                    compute_grad: bool):
    """:func:`mask_predictor_loss_forward` on :func:`mask_targets`."""
    rois, labels = _sampled(proposals, gt_labels, matched)
    targets = mask_targets(rois, gt_masks, [p.shape[0] for p in proposals], features.shape[-1],
                           compute_dtype(features.dtype))
    return mask_predictor_loss_forward(features, weight, bias, targets, labels, compute_grad)


def mask_predictor_loss_backward(grad, features, weight, labels, grad_sel):
    """The reference's backward, chunk by chunk: the feature gradient's products in the
    compute dtype, rounded once into the features' dtype and layout; the weight rows as
    (1, P) x (P, C) products (BLAS's fast orientation; the reference's einsum sums in
    another order)."""
    n, c, m, _ = features.shape
    cdt = grad_sel.dtype
    g = grad.to(cdt)
    labels = reference._class_rows(labels, weight.shape[0])[0]   # ignored rows: zero grad
    w = weight.reshape(weight.shape[0], -1)[labels].to(cdt) * g        # (N, C)
    grad_features = torch.empty(features.shape, dtype=features.dtype, device=features.device,
                                memory_format=memory_format(features))
    out = _flat(grad_features)
    rows = features.new_empty(n, c, dtype=cdt)
    products = None
    for lo, hi, f in _instance_chunks(features, cdt):
        torch.bmm(grad_sel[lo:hi, None, :], f.transpose(1, 2), out=rows[lo:hi, None, :])
        if out.dtype == cdt:
            torch.mul(w[lo:hi, :, None], grad_sel[lo:hi, None, :], out=out[lo:hi])
            continue
        if products is None:
            products = _chunk_buffer(out, hi - lo, cdt)
        out[lo:hi].copy_(torch.mul(w[lo:hi, :, None], grad_sel[lo:hi, None, :],
                                   out=products[:hi - lo]))
    rows *= g
    return (grad_features, *reference._predictor_param_grads(weight, labels, rows,
                                                             grad_sel.sum(1) * g))
