"""NMS and batched NMS on the CPU: torchvision's C++ nms on chunks of its score order, each
chunk first cleared of what the boxes already kept suppress, and batched_nms's calls (the
offset boxes, or per class from the pool) made as torchvision makes them: its result."""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .._boxes import IoUWork, iou_over, iou_rows
from .._utils import compute_dtype
from .pool import in_pool

def nms_wins(boxes: Tensor, scores: Tensor) -> bool:
    """torchvision's nms computes our result for this call: IoU in float32 (float64 for
    float64 boxes), the scores held exactly in that dtype."""
    return compute_dtype(boxes.dtype) == torch.float64 or scores.dtype != torch.float64


# torchvision's CPU nms visits, for every box it keeps, every later box not yet suppressed:
# O(N x kept) scalar IoUs on one thread. Ours calls the same kernel on chunks of NMS_CHUNK
# boxes in its score order (its stable sort), each chunk first cleared of the boxes that a
# box kept from an earlier chunk overlaps by more than the threshold (one vectorized IoU
# matrix, torchvision's arithmetic: iou_over). A box is kept iff no box kept before it
# overlaps it that much, whichever call looks: torchvision's result, ties included, with
# its long scans turned into matrices (2-core x86: 1k boxes about 2x, 5k 1.5-2x, 20k 3x).
NMS_CHUNK = 256


def _chunked_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms(boxes, scores, iou_threshold)``, chunk by chunk."""
    n = boxes.shape[0]
    if n <= 2 * NMS_CHUNK:          # (a second, short chunk would not pay for its matrix)
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)
    order = torch.sort(scores, stable=True, descending=True)[1]     # torchvision's order
    rows, threshold = iou_rows(boxes, iou_threshold)     # (boxes: already that dtype)
    kept, kept_rows = [], rows[:, :0]
    work = IoUWork(rows.dtype)
    for lo in range(0, n, NMS_CHUNK):
        chunk = order[lo:lo + NMS_CHUNK]
        if kept:
            r = rows.index_select(1, chunk)
            over = iou_over(kept_rows, kept_rows[4], r, r[4], threshold, work)
            chunk = chunk[~over.amax(0)]
        if chunk.numel():           # (a subset in score order: its stable sort keeps it)
            kept.append(chunk[torch.ops.torchvision.nms(boxes[chunk], scores[chunk],
                                                        iou_threshold)])
            kept_rows = torch.cat([kept_rows, rows.index_select(1, kept[-1])], 1)
    return torch.cat(kept)


def nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    """torchvision's nms (``idxs`` None) or batched_nms result, on the compute dtype."""
    cdt = compute_dtype(boxes.dtype)
    boxes, scores = boxes.to(cdt), scores.to(cdt)
    if idxs is None:
        return _chunked_nms(boxes, scores, iou_threshold)
    return _batched_nms(boxes, scores, idxs, iou_threshold)


# torchvision's CPU batched_nms runs, up to 4,000 coordinates (1,000 boxes), one nms over
# every box with the classes offset apart ("coordinate trick"), and past that one nms per
# class, one class after another. Ours makes the same calls, each chunked as above: on the
# offset boxes, one call per run of whole classes (which cuts the O(N x kept) work by the
# run count) where `_offsets_apart` says the offset classes never overlap (else one call
# over them all); per class, from the thread pool, the classes split into up to
# NMS_GROUPS groups of about equal box counts. The parts merge in torchvision's order:
# the same result.
NMS_GROUPS = 4
_PER_CLASS_NUMEL = 4000   # torchvision's CPU switch to one nms per class (boxes.numel() >)


def _class_groups(counts: list[int], groups: int) -> list[list[int]]:
    """Whole classes per group, the largest first, each onto the group with the fewest
    boxes so far."""
    load, members = [0] * groups, [[] for _ in range(groups)]
    for c, count in sorted(enumerate(counts), key=lambda cc: -cc[1]):
        g = load.index(min(load))
        members[g].append(c)
        load[g] += count
    return members


def _offsets_apart(boxes: Tensor, idxs: Tensor, iou_threshold: float) -> bool:
    """torchvision's offset boxes (``boxes`` before the offsets) of different classes never
    suppress each other: the coordinates are at least 0, so a class's boxes lie in
    [offset, offset + top], the offsets (class times ``top + 1``, rounded) stay at least
    ``top`` apart (2 max|class| (top + 1) times the unit roundoff is at most 1), and an
    IoU of 0 is not over the threshold."""
    low, top = torch.aminmax(boxes)
    classes = float(idxs.to(boxes).abs().max())
    return (iou_threshold >= 0 and float(low) >= 0
            and 2 * classes * (float(top) + 1) * torch.finfo(boxes.dtype).eps / 2 <= 1)


# Past 1,000 boxes, many small classes cost the per-class calls Python and dispatch per
# class (80 classes: about 70 us each). Ours then takes every class at once while the
# largest class has at most PADDED_NMS_LARGEST boxes and the classes padded to it,
# (C, P, P), stay within PADDED_NMS_ELEMENTS (measured here, against the per-class calls:
# P=26-121 1.5-4.4x faster, P=147-152 1.4x slower): each class's boxes in its nms order,
# one IoU tensor (torchvision's arithmetic), and the greedy rule — a box is kept iff no box
# kept before it in its class overlaps it over the threshold — solved for all classes
# together: "kept" recomputed from the kept set until it no longer changes (the first k
# boxes of a class are settled after k rounds; a set that reproduces itself is the greedy
# one, the rule's only solution). torchvision's result.
PADDED_NMS_ELEMENTS = 1 << 22
PADDED_NMS_LARGEST = 128


def _padded_nms(boxes: Tensor, scores: Tensor, box_class: Tensor, counts: list[int],
                iou_threshold: float) -> Tensor:
    """The indices every class's ``torchvision.ops.nms`` keeps (``box_class``: each box's
    class in 0..C-1, ``counts`` the classes' sizes), in class order."""
    n, c, p = boxes.shape[0], len(counts), max(counts)
    by_score = torch.sort(scores, stable=True, descending=True)[1]
    order = by_score[torch.sort(box_class[by_score], stable=True)[1]]   # class, then nms order
    klass = box_class[order]
    starts = torch.tensor(list(itertools.accumulate(counts[:-1], initial=0)))
    slot = klass * p + torch.arange(n) - starts[klass]
    rows, threshold = iou_rows(boxes, iou_threshold)
    padded = rows.new_zeros(5, c * p)
    padded[:, slot] = rows[:, order]
    padded = padded.view(5, c, p)
    later = torch.ones(p, p, dtype=torch.bool).triu_(1)                  # i before j
    over = (iou_over(padded, padded[4], padded, padded[4], threshold) & later).float()
    valid = torch.zeros(c * p, dtype=torch.bool)
    valid[slot] = True
    kept = valid = valid.view(c, p)
    while True:                     # (0/1 sums: exact in float32)
        again = valid & (torch.bmm(kept.float()[:, None, :], over)[:, 0] == 0)
        if torch.equal(again, kept):
            return order[kept.view(-1)[slot]]
        kept = again


def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    _, box_class, counts = torch.unique(idxs, return_inverse=True, return_counts=True)
    counts = counts.tolist()
    # (a NaN coordinate would make every offset box NaN, and keep every box: per class, a
    # NaN box suppresses nothing and nothing suppresses it, as in the Triton kernels)
    offset = boxes.numel() <= _PER_CLASS_NUMEL and bool(torch.isfinite(boxes).all())
    if offset:                      # torchvision's coordinate trick, operation for operation
        apart = len(counts) > 1 and _offsets_apart(boxes, idxs, iou_threshold)
        boxes = boxes + (idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes)))[:, None]
        if not apart:
            return _chunked_nms(boxes, scores, iou_threshold)
    if (not offset and len(counts) > 1 and max(counts) <= PADDED_NMS_LARGEST
            and len(counts) * max(counts) ** 2 <= PADDED_NMS_ELEMENTS):
        parts = [_padded_nms(boxes, scores, box_class, counts, iou_threshold)]
    elif offset:
        # one call per run of whole classes (in the order of their values) from about
        # NMS_CHUNK boxes on, on one thread: each at most about a tenth of a millisecond,
        # less than the pool's hand-over; members in increasing index
        starts = itertools.accumulate(counts[:-1], initial=0)
        run = torch.tensor([start // NMS_CHUNK for start in starts])[box_class]
        members = torch.sort(run, stable=True)[1].split(torch.bincount(run).tolist())
        parts = [m[_chunked_nms(boxes[m], scores[m], iou_threshold)] for m in members if m.numel()]
    else:
        # each class's boxes in increasing index, as torchvision's where(idxs == class)
        # gives; gathered once, each class a view
        order = torch.sort(box_class, stable=True)[1]
        by_class, class_boxes, class_scores = (
            t.split(counts) for t in (order, boxes[order], scores[order]))

        def kept(classes: list[int]) -> Tensor:
            return torch.cat([by_class[c][_chunked_nms(class_boxes[c], class_scores[c],
                                                       iou_threshold)] for c in classes])
        parts = in_pool(kept, _class_groups(counts, min(len(counts), NMS_GROUPS)))
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for part in parts:
        keep[part] = True
    keep_indices = torch.where(keep)[0]
    if offset:                      # nms's order: score, then index (its stable sort)
        return keep_indices[torch.sort(scores[keep_indices], stable=True, descending=True)[1]]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]   # torchvision's
