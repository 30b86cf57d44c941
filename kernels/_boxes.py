"""Box arithmetic that a launcher and its reference both use, as torchvision does it.

NMS: boxes sorted into per-class segments (:class:`Segments`), the float32 threshold that
compares as torchvision's double does, the coordinate rows with torchvision's area. Mask
pasting: torchvision's box expansion and integer truncation, and the threshold as a
tensor of the masks' dtype compares it. Mask targets: the sampled RoIs, their labels and
their grouping by image, as the CPU and reference paths of the mask losses take them.
RoI Align: the (K, 5) RoIs from either form torchvision takes (:func:`boxes_to_rois`).
"""
from __future__ import annotations

import functools
import struct

import torch
from torch import Tensor

from ._utils import (ROI_BOXES_ERRORS, ValueIndexError, check_float, check_same_device,
                     check_tensor)

# Expanded box coordinates are clamped to this magnitude before the cast to int64 (a no-op
# for any input that passes the host check); keeps every index finite for unchecked input.
COORD_LIMIT = 2.0**31


class Segments:
    """Boxes sorted into contiguous segments by (class, score desc, index). Without classes
    (``idxs`` None) there is one segment, the whole sorted order.

    What the kernels take, from two sorts and two gathers: the ``given`` boxes,
    ``score_order`` (input indices by decreasing score, ties lower index first, as
    torchvision's stable sort), ``perm`` (input indices in sorted order), and with classes
    ``cls`` (the sorted classes) and ``rank`` (each sorted position's place in
    ``score_order``; None without classes). What the reference reads (computed on first
    use): ``boxes`` in sorted order and each position's segment ``seg_lo``/``seg_hi``
    (first and one past the last position; a NaN class is a segment of its own, as ``!=``
    says)."""

    def __init__(self, boxes: Tensor, scores: Tensor, idxs: Tensor | None):
        self.n = boxes.shape[0]
        self.segmented = idxs is not None
        self.given = boxes
        self.score_order = torch.argsort(scores, descending=True, stable=True)
        if idxs is None:
            self.perm, self.cls, self.rank = self.score_order, None, None
        else:
            self.cls, self.rank = torch.sort(idxs[self.score_order], stable=True)
            self.perm = self.score_order[self.rank]

    @functools.cached_property
    def boxes(self) -> Tensor:
        return self.given[self.perm]

    @functools.cached_property
    def _bounds(self) -> tuple[Tensor, Tensor]:
        n, dev = self.n, self.given.device
        if not self.segmented:
            return (torch.zeros(n, dtype=torch.int64, device=dev),
                    torch.full((n,), n, dtype=torch.int64, device=dev))
        start = torch.ones(n, dtype=torch.bool, device=dev)
        start[1:] = self.cls[1:] != self.cls[:-1]
        seg = torch.cumsum(start, 0) - 1
        # bounds[g] = first position of segment g; bounds[nseg] = n; slot n + 1 is a dump
        # for the non-start positions
        bounds = torch.full((n + 2,), n, dtype=torch.int64, device=dev)
        bounds.scatter_(0, torch.where(start, seg, n + 1), torch.arange(n, device=dev))
        return bounds[seg], bounds[seg + 1]

    @property
    def seg_lo(self) -> Tensor:
        return self._bounds[0]

    @property
    def seg_hi(self) -> Tensor:
        return self._bounds[1]


@functools.lru_cache(maxsize=1024)
def _float32_threshold(iou_threshold: float, cuda: bool) -> float:
    t = torch.tensor(iou_threshold, dtype=torch.float32)
    if not cuda and float(t) > iou_threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf")))
    return float(t)


def float32_threshold(iou_threshold: float, device: torch.device | str) -> float:
    """The float32 threshold torchvision's kernel for ``device`` compares its float32 IoU with.

    CUDA: torchvision's kernel takes the threshold as a float, rounded to nearest. CPU: it
    compares with the double itself, so the float32 t with ``f > t  <=>  f > iou_threshold``
    for every float32 f (rounding to nearest could move it above the double and flip a box
    whose IoU sits right there). Measured on an H200: the two differ at thresholds such as
    0.3 for boxes whose IoU is exactly float32(0.3).
    """
    cuda = (torch.device(device) if isinstance(device, str) else device).type == "cuda"
    return _float32_threshold(float(iou_threshold), cuda)


def coordinate_rows(boxes: Tensor) -> Tensor:
    """(5, N): x1, y1, x2, y2 and torchvision's area ``(x2 - x1) * (y2 - y1)``."""
    rows = torch.empty(5, boxes.shape[0], dtype=boxes.dtype, device=boxes.device)
    rows[:4] = boxes.t()
    torch.mul(rows[2] - rows[0], rows[3] - rows[1], out=rows[4])
    return rows


def iou_rows(boxes: Tensor, iou_threshold: float) -> tuple[Tensor, float]:
    """The rows :func:`iou_over` takes for ``boxes`` in torchvision's IoU dtype (float64
    stays float64, every other dtype float32) and the threshold they compare with there."""
    if boxes.dtype == torch.float64:
        return coordinate_rows(boxes), iou_threshold
    return (coordinate_rows(boxes.to(torch.float32)),
            float32_threshold(iou_threshold, boxes.device))


class IoUWork:
    """Buffers for :func:`iou_over`'s (A, B) temporaries, reused by a loop of calls (grown,
    doubling, when a call needs more pairs): a few allocations instead of about eight
    pair-sized tensors per call. While glibc's mmap threshold is at its initial 128 KB (a
    process that has not yet freed a larger buffer) each of those was a fresh mapping and
    its page faults: the CPU nms at 5,000 boxes took 30-45 ms in a fresh process, 12 ms in
    one that had freed an 8 MB tensor. The result of a call is a view into the buffers,
    valid until the next call."""

    def __init__(self, dtype: torch.dtype, capacity: int = 1 << 18):
        self.dtype, self.capacity = dtype, 0
        self._grow(capacity)

    def _grow(self, pairs: int) -> None:
        self.capacity = max(pairs, 2 * self.capacity)
        self.floats = torch.empty(3, self.capacity, dtype=self.dtype)
        self.flags = torch.empty(self.capacity, dtype=torch.bool)

    def take(self, a: int, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if a * b > self.capacity:
            self._grow(a * b)
        f = self.floats[:, :a * b].view(3, a, b)
        return f[0], f[1], f[2], self.flags[:a * b].view(a, b)


def iou_over(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor,
             iou_threshold: float, work: IoUWork | None = None) -> Tensor:
    """(A, B) bool: IoU > threshold, with torchvision's CPU arithmetic, operation for
    operation (the same bits for every pair, whichever call computes it).

    ``a``, ``b``: (4+, A) and (4+, B) coordinate rows x1, y1, x2, y2 (as
    :func:`coordinate_rows`); areas ``(x2 - x1) * (y2 - y1)``; float32 rows take
    :func:`float32_threshold`'s threshold. Batched: (4+, ..., A) and (4+, ..., B) rows give
    (..., A, B). ``work`` (2-D rows only): its buffers hold the temporaries, the same
    operations written into them (the same bits).
    """
    if work is not None:
        w, t, u, over = work.take(a.shape[1], b.shape[1])
        torch.minimum(a[2, :, None], b[2, None, :], out=w)
        w.sub_(torch.maximum(a[0, :, None], b[0, None, :], out=t)).clamp_(min=0)
        torch.minimum(a[3, :, None], b[3, None, :], out=t)
        t.sub_(torch.maximum(a[1, :, None], b[1, None, :], out=u)).clamp_(min=0)
        inter = w.mul_(t)
        union = torch.add(area_a[:, None], area_b[None, :], out=u).sub_(inter)
        return torch.gt(inter.div_(union), iou_threshold, out=over)
    w = (torch.minimum(a[2, ..., :, None], b[2, ..., None, :])
         - torch.maximum(a[0, ..., :, None], b[0, ..., None, :])).clamp_(min=0)
    h = (torch.minimum(a[3, ..., :, None], b[3, ..., None, :])
         - torch.maximum(a[1, ..., :, None], b[1, ..., None, :])).clamp_(min=0)
    inter = w.mul_(h)  # w = 0 gives 0 where torchvision could give NaN (0 * inf): both keep
    union = (area_a[..., :, None] + area_b[..., None, :]).sub_(inter)
    return inter.div_(union) > iou_threshold


def expand_scale(mask_width: int, padding: int) -> float:
    """torchvision's ``expand_masks`` factor (from the mask width, for both axes)."""
    return float(mask_width + 2 * padding) / mask_width


def expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """torchvision's ``expand_boxes(boxes, scale).to(torch.int64)``: the same elementwise
    operations in the boxes' dtype, so the same rounding, batched over both axes."""
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5
    center = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    half = half * scale
    out = torch.cat([center - half, center + half], 1)
    out = out.to(torch.float64).nan_to_num(0.0)  # exact; float16 cannot hold the limit
    return out.clamp(-COORD_LIMIT, COORD_LIMIT).to(torch.int64)


@functools.lru_cache(maxsize=1024)
def threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """The threshold as ``tensor_of_dtype > threshold`` compares: rounded to ``dtype``
    (the comparison happens in the tensor's dtype), then held exactly in float32. Cached:
    a call's host path makes no tensor of its own."""
    if dtype == torch.float64:
        return float(threshold)
    return float(torch.tensor(threshold, dtype=dtype).float())


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float (no tensor)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def sampled_rois(proposals: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """(N, 5) float32 RoIs over the gt masks: matched gt index, then the proposal box (the
    CPU and reference paths' form of the mask targets; the kernels read the lists)."""
    return torch.cat([torch.cat([i.long() for i in mask_matched_idxs]).to(torch.float32)[:, None],
                      torch.cat([p.to(torch.float32) for p in proposals])], 1)


def sampled_labels(proposals: list[Tensor], gt_labels: list[Tensor],
                   mask_matched_idxs: list[Tensor]) -> Tensor:
    """(N,) int64 label of each row, ``gt_labels[i][matched]`` per image, and -1 (an
    ignored row: no loss, no gradient) where the matched index is outside the image's gt
    masks or the proposal is not finite: the kernels' rule for unchecked values."""
    out = []
    for boxes, labels, idxs in zip(proposals, gt_labels, mask_matched_idxs):
        idxs = idxs.long()
        ok = (idxs >= 0) & (idxs < labels.shape[0]) & torch.isfinite(boxes).all(1)
        picked = (labels.long()[idxs.clamp(0, labels.shape[0] - 1)] if labels.shape[0]
                  else torch.zeros_like(idxs))
        out.append(torch.where(ok, picked, torch.full_like(picked, -1)))
    return torch.cat(out)


def image_rows(gt_masks: list[Tensor], rows: list[int]):
    """(slice of the image's rows, its gt masks) for each image with rows: the mask
    targets' RoIs are grouped by image, each image with its own masks and size."""
    start = 0
    for masks, r in zip(gt_masks, rows):
        if r:
            yield slice(start, start + r), masks
        start += r


def boxes_to_rois(boxes, batch_size: int | None = None, name: str = "boxes") -> Tensor:
    """Validate ``Tensor[K, 5]`` or ``list[Tensor[L, 4]]`` and return the (K, 5) form.
    Errors are also torchvision's classes (its ``check_roi_boxes_shape`` asserts)."""
    e = ROI_BOXES_ERRORS
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            # torchvision reads boxes.size(1) first: an IndexError for a 1-D tensor
            error = ValueIndexError if boxes.dim() < 2 else e.value
            raise error(f"{name} must be Tensor[K, 5] or list[Tensor[L, 4]], "
                        f"got shape {tuple(boxes.shape)}")
        check_float(name, boxes, e)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise e.missing(f"{name} must be Tensor[K, 5] or list[Tensor[L, 4]], "
                        f"got {type(boxes).__name__}")
    if batch_size is not None and len(boxes) != batch_size:
        raise ValueError(f"{name} has {len(boxes)} entries but input has batch size "
                         f"{batch_size}; pass one Tensor[L, 4] per image")
    if not boxes:
        raise ValueError(f"{name} must not be an empty list")
    first = boxes[0]
    for i, b in enumerate(boxes):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            check_tensor(f"{name}[{i}]", b, errors=e)
            raise e.value(f"{name}[{i}] must be Tensor[L, 4], got shape {tuple(b.shape)}")
        if not b.is_floating_point():
            check_float(f"{name}[{i}]", b, e)
        if b.device != first.device:
            check_same_device(**{f"{name}[0]": first, f"{name}[{i}]": b})
    dtype = first.dtype
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i, dtype=dtype),
                                 b if b.dtype == dtype else b.to(dtype)], 1)
                      for i, b in enumerate(boxes)], 0)
