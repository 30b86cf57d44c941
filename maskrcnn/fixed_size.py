"""The model's selections written for fixed tensor sizes, so that one graph holds it.

torchvision's Mask R-CNN selects with data-dependent sizes everywhere (``torch.where``,
``boxes[keep]``, ``keep[:n]``): each is a graph break under ``torch.compile``, a guard
``torch.export`` cannot satisfy, and a host sync on CUDA. Here every selection also has a
fixed-size form: a mask of the valid rows travels beside tensors whose sizes depend on
shapes only. The model takes that form on a GPU (training and inference), in its static
mode and whenever ``torch.compile`` or ``torch.export`` traces it (:func:`fixed_sizes`);
eager CPU tensors keep torchvision's data-dependent selections, which do less work when
few rows survive (a CPU has no sync to save). Both forms select the same rows in
the same order (tests/test_compile_model.py).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils

from kernels._utils import gpu_path


def fixed_sizes(static: bool, images: Sequence[Tensor] = ()) -> bool:
    """Whether sizes stay fixed: in the static mode, while torch.compile or torch.export
    trace, and on every device but the CPU (the GPU code path: training then reads no
    value on the host, inference one per call at the end, each image's detection count).
    Eager CPU tensors take the data-dependent form: a CPU has no sync to save, and the
    fixed form's padding rows cost it time (measured: a training step 1.6x slower)."""
    return (static or torch.compiler.is_compiling()
            or (len(images) > 0 and (gpu_path(images[0]) or images[0].device.type != "cpu")))


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """torchvision's ``remove_small_boxes`` as a mask: both sides at least ``min_size``."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (widths >= min_size) & (heights >= min_size)


def select_top(nms: Callable[..., Tensor], nms_mask: Callable[..., Tensor], boxes: Tensor,
               scores: Tensor, idxs: Tensor, valid: Tensor, iou_threshold: float, k: int,
               fixed: bool) -> tuple[Tensor, Tensor]:
    """torchvision's selection: the ``valid`` boxes, batched NMS among them, the ``k`` best
    kept (decreasing score, ties by lower index). Returns ``(rows, row_valid)``, ``rows``
    indexing ``boxes``.

    Eager (``fixed`` False): only the selected rows, all valid. Fixed: ``min(k, N)`` rows, the
    selected first, then padding rows flagged invalid. The invalid boxes take part in NMS
    with score -inf, so they sort after every valid box of their class and suppress none.
    """
    if not fixed:
        candidates = torch.where(valid)[0]
        kept = nms(boxes[candidates], scores[candidates], idxs[candidates], iou_threshold)
        rows = candidates[kept[:k]]
        return rows, torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    minus_inf = float("-inf")
    kept = nms_mask(boxes, scores.masked_fill(~valid, minus_inf), idxs, iou_threshold) & valid
    rows = torch.argsort(scores.masked_fill(~kept, minus_inf), descending=True, stable=True)[:k]
    return rows, kept[rows]


class BoxCoder(det_utils.BoxCoder):
    """torchvision's box coder with its constants as Python numbers: the same arithmetic,
    but no host-to-device copy per call (``torch.tensor(0.5, device=...)`` in its decode,
    ``torch.as_tensor(weights, device=...)`` in its encode), which would sync a CUDA host."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        p_w = proposals[:, 2:3] - proposals[:, 0:1]
        p_h = proposals[:, 3:4] - proposals[:, 1:2]
        p_x = proposals[:, 0:1] + 0.5 * p_w
        p_y = proposals[:, 1:2] + 0.5 * p_h
        g_w = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
        g_h = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
        g_x = reference_boxes[:, 0:1] + 0.5 * g_w
        g_y = reference_boxes[:, 1:2] + 0.5 * g_h
        return torch.cat((wx * (g_x - p_x) / p_w, wy * (g_y - p_y) / p_h,
                          ww * torch.log(g_w / p_w), wh * torch.log(g_h / p_h)), dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        x = rel_codes[:, 0::4] / wx * widths[:, None] + ctr_x[:, None]
        y = rel_codes[:, 1::4] / wy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=2).flatten(1)


class Matcher(det_utils.Matcher):
    """torchvision's Matcher written without a boolean-mask assignment or ``torch.where``'s
    indices (each a host sync on CUDA): the same matches, no data-dependent size."""

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.numel() == 0:      # torchvision's errors
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images "
                                 "during training")
            raise ValueError("No proposal boxes available for one of the images during "
                             "training")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        matches = torch.where(matched_vals < self.low_threshold, self.BELOW_LOW_THRESHOLD,
                              torch.where(matched_vals < self.high_threshold,
                                          self.BETWEEN_THRESHOLDS, matches))
        if all_matches is not None:
            self.set_low_quality_matches_(matches, all_matches, match_quality_matrix)
        return matches

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor,
                                 match_quality_matrix: Tensor) -> None:
        # a padding gt row (quality -1 everywhere, :func:`gt_quality`) matches nothing; a
        # real row's quality is an IoU, never negative: torchvision's rule for those
        highest = match_quality_matrix.max(dim=1).values[:, None]
        update = ((match_quality_matrix == highest) & (highest >= 0)).any(dim=0)
        matches.copy_(torch.where(update, all_matches, matches))


def gt_valid(target: dict[str, Tensor]) -> Tensor:
    """Which gt rows of a target are real: its ``"valid"`` (bool, one per box), which
    :func:`pad_targets` writes, or all of them."""
    valid = target.get("valid")
    if valid is None:
        return torch.ones(target["boxes"].shape[:1], dtype=torch.bool,
                          device=target["boxes"].device)
    return valid


def gt_quality(quality: Tensor, target: dict[str, Tensor]) -> Tensor:
    """A (gt, candidates) match-quality matrix with the target's padding rows at -1: below
    every IoU, so no candidate matches them (and :class:`Matcher` gives them no low-quality
    match)."""
    valid = target.get("valid")
    return quality if valid is None else quality.masked_fill(~valid[:, None], -1.0)


def pad_targets(targets: list[dict[str, Tensor]], rows: int) -> list[dict[str, Tensor]]:
    """Each image's boxes, labels and masks padded to ``rows`` gt rows, with ``"valid"``
    flagging the real ones: the padding rows (box (0, 0, 1, 1), label 0, an empty mask)
    are matched by no anchor or proposal and never join the proposals, so a padded batch
    trains as the unpadded one does, with tensor sizes that no longer depend on the
    instance counts (what a CUDA graph needs). Other keys are kept as they are."""
    out = []
    for i, t in enumerate(targets):
        boxes, labels = t["boxes"], t["labels"]
        n = boxes.shape[0]
        if n > rows:
            raise ValueError(f"targets[{i}] has {n} boxes, more than the {rows} padded rows")
        extra = rows - n
        padded = dict(t)
        # fills, not a host tensor copied over (a host-to-device copy syncs a CUDA stream)
        padded["boxes"] = torch.cat([boxes, torch.cat([boxes.new_zeros(extra, 2),
                                                       boxes.new_ones(extra, 2)], dim=1)])
        padded["labels"] = torch.cat([labels, labels.new_zeros(extra)])
        if "masks" in t:
            masks = t["masks"]
            padded["masks"] = torch.cat([masks, masks.new_zeros(extra, *masks.shape[1:])])
        padded["valid"] = torch.cat([gt_valid(t), torch.zeros(extra, dtype=torch.bool,
                                                              device=boxes.device)])
        out.append(padded)
    return out


class BalancedSampler:
    """torchvision's BalancedPositiveNegativeSampler without data-dependent sizes.

    Per image, ``min(#positives, int(batch_size_per_image * positive_fraction))`` positives
    (label >= 1) and ``min(#negatives, batch_size_per_image - that)`` negatives (label 0),
    each drawn uniformly without replacement, counted in tensors. Returns bool masks.
    When the budget covers every candidate the picks are torchvision's (all of them);
    otherwise the draw differs from its ``randperm`` (another use of the generator).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = [], []
        for lab in labels:
            positive, negative = lab >= 1, lab == 0
            num_pos = positive.sum().clamp(
                max=int(self.batch_size_per_image * self.positive_fraction))
            num_neg = torch.minimum(negative.sum(), self.batch_size_per_image - num_pos)
            pos_masks.append(_draw(positive, num_pos))
            neg_masks.append(_draw(negative, num_neg))
        return pos_masks, neg_masks


def _draw(candidates: Tensor, count: Tensor) -> Tensor:
    """A uniformly random ``count`` of the ``candidates`` (a bool mask), as a mask: each
    candidate gets a random key, non-candidates a key above every draw; the ``count``
    smallest keys win."""
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
    order = torch.argsort(keys)
    rank = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.shape[0], device=order.device))
    return candidates & (rank < count)


def leading(mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The rows of ``mask`` first, in index order, then the others: ``min(k, N)`` row
    indices and whether each is a ``mask`` row (torchvision's ``torch.where(mask)[0]``
    when ``mask`` has at most ``k`` rows, padded)."""
    rows = torch.argsort((~mask).to(torch.uint8), stable=True)[:k]
    return rows, mask[rows]


@torch.library.custom_op("maskrcnn::leading_rows", mutates_args=())
def leading_rows(fields: list[Tensor], counts: Tensor) -> list[Tensor]:
    """``fields[i][:counts[i // F]]`` for F = len(fields) // len(counts): each image's fields
    cut to its valid rows (which lead). The default mode's one data-dependent step: one
    host sync on CUDA, one graph break under the default torch.compile config, none with
    ``capture_dynamic_output_shape_ops``; torch.export records the sizes as unbacked."""
    per_image = len(fields) // max(counts.numel(), 1)
    sizes = counts.tolist()
    return [f[:sizes[i // per_image]].clone() for i, f in enumerate(fields)]


@leading_rows.register_fake
def _(fields, counts):
    per_image = len(fields) // max(counts.shape[0], 1)
    ctx = torch.library.get_ctx()
    out = []
    for i, f in enumerate(fields):
        if i % per_image == 0:
            size = ctx.new_dynamic_size(max=f.shape[0])
        out.append(f.new_empty((size, *f.shape[1:])))
    return out


__all__ = ["fixed_sizes", "large_enough", "select_top", "BoxCoder", "Matcher", "BalancedSampler",
           "gt_valid", "gt_quality", "pad_targets", "leading", "leading_rows"]
