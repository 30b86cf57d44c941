"""Non-maximum suppression (torchvision semantics) as Triton kernels.

Both ops reduce to one problem: a greedy pass over boxes sorted so that each "segment"
(all boxes for ``nms``, one class for ``batched_nms``) is contiguous and ordered by
decreasing score (ties: lower index first). Boxes only suppress later boxes of their own
segment, so batched NMS never compares boxes of different classes.

1. ``_nms_prep_kernel`` gathers the sorted boxes into float32 coordinate rows with their
   areas, finds each position's segment end (a binary search over the sorted classes) and
   zeroes the greedy pass's words: one launch for what took about ten tensor operations.
2. ``_nms_mask_kernel`` (the parallel part) computes an IoU bitmask: word ``t`` of sorted
   row ``i`` holds, in bit ``k``, whether box ``i`` suppresses box ``64 * (i // 64 + t) + k``
   (IoU > threshold, later in the same segment). A program owns a 64-row block, whose rows
   share their columns, and computes only the words its rows' segments reach, and only the
   first ``wcap`` words per row (the "band"). ``nms`` sizes the band from N, and
   ``batched_nms`` past 25,000 boxes from the longest class, read in a host sync: every
   word a segment needs is stored (one segment: torchvision's N x N/64 mask; 100k boxes in
   80 classes: 17 MB, not 1.25 GB). ``batched_nms_mask`` never syncs: it sizes the band
   from N alone under a memory budget.
3. ``_nms_greedy_kernel`` (segments in parallel: each program takes the segments that
   start in its window of sorted positions) walks a segment 64 boxes at a time: it
   resolves which of the 64 survive with a fixed-point iteration on the diagonal mask
   words (exact: bit ``k`` depends only on bits < k, so the iteration settles on the
   greedy answer in at most 64 steps, usually 2 or 3), then ORs the kept rows' band words
   into the segment's "removed" words, and computes the words beyond the band on the fly
   (only ``batched_nms_mask``'s segments longer than its band need that). Long segments
   get wide steps in a launch of their own (``benchmarks.static.nms_work_model`` counts
   the steps at given segment sizes). The keep flags land in score order.
4. The host picks the kept ones from the score order (``masked_select``: the one sync,
   the result size).

IoU uses torchvision's arithmetic in float32 (float64 inputs: the reference in float64):
areas ``(x2 - x1) * (y2 - y1)`` (stored by the prep kernel), ``inter / (area_i + area_j -
inter)`` with an IEEE division (``div_rn``), suppression when ``> iou_threshold``, the
threshold rounded as torchvision's kernel for the boxes' device rounds it
(:func:`float32_threshold`: a float on CUDA, the double itself on the CPU). No
fused multiply-add touches the IoU (checked in sm_90 SASS): one could flip a box whose IoU
equals the threshold.
"""
from __future__ import annotations

import torch
import torchvision
import triton
import triton.language as tl
from torch import Tensor

from .. import _cpu, reference
from .._boxes import Segments, float32_threshold
from .._utils import (INTERPRET, cdiv, check_nms_args, cpu_path, eager, is_tracing, op_body,
                      record_path, use_triton, values_checked)
from .._launch import launch, pick_tuning, register_lanes, register_tuning, size_bucket

# Memory budget for batched_nms_mask's band of mask words (it never syncs, so it cannot
# size the band from the longest class): 16 MiB covers 20 words (1280 boxes) per row at
# 100k boxes, 104 words at 20k; longer segments compute the rest on the fly. nms and
# batched_nms read the longest segment in their first sync and store every word it needs.
MASK_BUDGET_BYTES = 16 * 2**20
# Up to this many boxes batched_nms reads nothing before its launches (its one sync is the
# result size): every row gets every mask word its segment could need, the N x N/64 mask
# torchvision's CUDA batched_nms itself allocates up to this size (one nms over the
# class-offset boxes). Past it torchvision loops over the classes, one sync each; ours reads
# the longest class first (a second sync) to size the band.
SINGLE_PASS_BOXES = 25_000
# The wide greedy launch's programs (about one per SM); it takes the segments of at least
# N / _WIDE_SEGMENTS boxes (at most one of which starts in each program's window).
_WIDE_SEGMENTS = 128
WIDE_SEGMENTS = tl.constexpr(_WIDE_SEGMENTS)


# ---------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _load_boxes(ptr, n, offs, mask):
    """x1, y1, x2, y2, area at ``offs`` of a (5, N) array; masked lanes get (0, 0, 1, 1, 1)."""
    p = ptr + offs
    return (tl.load(p, mask=mask, other=0.0), tl.load(p + n, mask=mask, other=0.0),
            tl.load(p + 2 * n, mask=mask, other=1.0), tl.load(p + 3 * n, mask=mask, other=1.0),
            tl.load(p + 4 * n, mask=mask, other=1.0))


@triton.jit(do_not_specialize=["n", "stride_b"])  # compiled once, whatever the sizes
def _nms_prep_kernel(
    boxes_ptr,  # (N, 4) float boxes as given (any float dtype the kernels take)
    perm_ptr,  # (N,) int64: input index of each sorted position
    cls_ptr,  # (N,) the sorted classes (SEGMENTED only)
    rows_ptr,  # (5, N) float32 out: x1, y1, x2, y2, area of the sorted boxes
    seg_hi_ptr,  # (N,) int32 out (SEGMENTED only): one past the end of each one's segment
    removed_ptr,  # (2N + 2,) int64 out: zeroed for the greedy pass
    n, stride_b, stride_c,
    SEGMENTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The greedy pass's inputs in one launch: the sorted boxes' float32 coordinate rows
    with torchvision's area ``(x2 - x1) * (y2 - y1)`` (a product stored, never fused into
    a later sum), each position's segment end by binary search over the sorted classes (a
    NaN class is a segment of its own, as ``!=`` says), and the removed words zeroed."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    src = tl.load(perm_ptr + i, mask=ok, other=0)
    p = boxes_ptr + src * stride_b
    x1 = tl.load(p, mask=ok, other=0.0).to(tl.float32)
    y1 = tl.load(p + stride_c, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p + 2 * stride_c, mask=ok, other=0.0).to(tl.float32)
    y2 = tl.load(p + 3 * stride_c, mask=ok, other=0.0).to(tl.float32)
    tl.store(rows_ptr + i, x1, mask=ok)
    tl.store(rows_ptr + n + i, y1, mask=ok)
    tl.store(rows_ptr + 2 * n + i, x2, mask=ok)
    tl.store(rows_ptr + 3 * n + i, y2, mask=ok)
    tl.store(rows_ptr + 4 * n + i, (x2 - x1) * (y2 - y1), mask=ok)
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    tl.store(removed_ptr + 2 * i, zero, mask=i <= n)
    tl.store(removed_ptr + 2 * i + 1, zero, mask=i <= n)
    if SEGMENTED:
        c = tl.load(cls_ptr + i, mask=ok, other=0)
        # cls[lo] == c and hi is n or a position past the run: halve [lo, hi) to the run's end
        lo = i
        hi = tl.where(ok & (c == c), n, i + 1)
        while tl.max(hi - lo, axis=0) > 1:
            active = hi - lo > 1
            mid = (lo + hi) // 2
            same = tl.load(cls_ptr + mid, mask=active, other=0) == c
            lo = tl.where(active & same, mid, lo)
            hi = tl.where(active & ~same, mid, hi)
        tl.store(seg_hi_ptr + i, hi, mask=ok)


@triton.jit
def _suppression_words(boxes_ptr, n, iou_threshold, ax1, ay1, ax2, ay2, area_a, rows, hi,
                       col_block, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_T, 64] int64: bit k of word (t, r) is set when row box ``rows[r]`` suppresses
    box ``64 * (col_block + t) + k``: IoU > threshold, later in the same segment (< hi[r]).

    Row boxes are [64] vectors. Tiles are [columns, rows]; each step ORs BLOCK_K columns of
    every word into the rows' words, so a thread keeps few columns live (registers bound
    how many programs an SM holds). IoU is torchvision's float32 arithmetic, with no fused
    multiply-add: the areas come from memory (computed by torch), the select keeps
    ``w * h`` out of reach of the subtraction, and the division is IEEE (``div_rn``).
    """
    kk = tl.arange(0, BLOCK_T * BLOCK_K)
    bit = (tl.full([BLOCK_T * BLOCK_K], 1, tl.int64) << (kk % BLOCK_K).to(tl.int64))[:, None]
    col0 = (col_block + kk // BLOCK_K) * 64 + kk % BLOCK_K
    words = tl.zeros([BLOCK_T, 64], dtype=tl.int64)
    for k0 in range(0, 64, BLOCK_K):
        cols = col0 + k0
        col_ok = cols < n
        bx1 = tl.load(boxes_ptr + cols, mask=col_ok, other=0.0)[:, None]
        by1 = tl.load(boxes_ptr + n + cols, mask=col_ok, other=0.0)[:, None]
        bx2 = tl.load(boxes_ptr + 2 * n + cols, mask=col_ok, other=1.0)[:, None]
        by2 = tl.load(boxes_ptr + 3 * n + cols, mask=col_ok, other=1.0)[:, None]
        area_b = tl.load(boxes_ptr + 4 * n + cols, mask=col_ok, other=1.0)[:, None]
        w = tl.maximum(tl.minimum(ax2[None, :], bx2) - tl.maximum(ax1[None, :], bx1), 0.0)
        h = tl.maximum(tl.minimum(ay2[None, :], by2) - tl.maximum(ay1[None, :], by1), 0.0)
        inter = tl.where(w > 0.0, w * h, 0.0)
        iou = tl.math.div_rn(inter, (area_a[None, :] + area_b) - inter)
        later = (cols[:, None] > rows[None, :]) & (cols[:, None] < hi[None, :])
        over = (iou > iou_threshold) & later
        # distinct bits: the sum over a word's columns is their OR
        part = tl.sum(tl.reshape(tl.where(over, bit, 0), [BLOCK_T, BLOCK_K, 64]), axis=1)
        words = words | (part << k0)
    return words


@triton.jit
def _nms_mask_kernel(
    boxes_ptr,  # (5, N) float32: x1, y1, x2, y2, area rows of the sorted boxes
    seg_hi_ptr,  # (N,) int32: one past the last sorted position of each box's segment
    mask_ptr,  # (N, wcap) int64: out, word t of row i covers boxes 64 * (i // 64 + t) + k
    n, wcap, iou_threshold,
    SEGMENTED: tl.constexpr,  # else one segment, all N boxes (seg_hi_ptr is None)
    BLOCK_T: tl.constexpr,  # words per step
    BLOCK_K: tl.constexpr,  # columns of each word per inner step (divides 64)
):
    # One 64-row block; its rows share their columns, so column boxes load once as vectors.
    block = tl.program_id(0)
    rows = block * 64 + tl.arange(0, 64)
    row_ok = rows < n
    if SEGMENTED:
        hi = tl.load(seg_hi_ptr + rows, mask=row_ok, other=0)
    else:
        hi = tl.where(row_ok, n, 0)
    row_words = tl.minimum(tl.where(row_ok, (hi - 1) // 64 - block + 1, 0), wcap)
    t_end = tl.max(row_words, axis=0)
    ax1, ay1, ax2, ay2, area_a = _load_boxes(boxes_ptr, n, rows, row_ok)
    row_off = rows.to(tl.int64) * wcap
    for t0 in range(tl.program_id(1) * BLOCK_T, t_end, tl.num_programs(1) * BLOCK_T):
        words = _suppression_words(boxes_ptr, n, iou_threshold, ax1, ay1, ax2, ay2, area_a,
                                   rows, hi, block + t0, BLOCK_T, BLOCK_K)
        t = t0 + tl.arange(0, BLOCK_T)
        tl.store(mask_ptr + row_off[None, :] + t[:, None], words,
                 mask=t[:, None] < row_words[None, :])


@triton.jit(do_not_specialize=["n"])  # a serial pass: n's alignment buys it nothing
def _nms_greedy_kernel(
    boxes_ptr,  # (5, N) float32: x1, y1, x2, y2, area rows of the sorted boxes
    mask_ptr,  # (N, wcap) int64: suppression words from _nms_mask_kernel
    seg_hi_ptr,  # (N,) int32: one past the end of each sorted position's segment
    rank_ptr,  # (N,) int64: each sorted position's place in the score order
    removed_ptr,  # (2N + 2,) int64, zeroed: the segment at [lo, hi) keeps its words at 2 lo
    keep_ptr,  # (N,) bool: out, whether the box of that score rank is kept
    n, wcap, iou_threshold,
    SEGMENTED: tl.constexpr,  # else one segment, all N boxes (seg_hi, rank None)
    SEGMENTS: tl.constexpr,  # 0: all; 1: only segments of >= N / WIDE_SEGMENTS; 2: shorter
    BLOCK_T: tl.constexpr,  # band words per step
    BLOCK_K: tl.constexpr,  # columns per inner step of the words computed on the fly
):
    j = tl.arange(0, 64)
    bit = tl.full([64], 1, tl.int64) << j.to(tl.int64)
    if SEGMENTED:
        # Program p takes the segments that start in its window of sorted positions (each
        # segment once), walking from segment end to segment end. The wide tiles take the
        # long segments (at most one of them starts in a window of WIDE_SEGMENTS programs),
        # the narrow ones the rest.
        width = tl.cdiv(n, tl.num_programs(0))
        s = tl.program_id(0) * width
        stop = tl.minimum(s + width, n)
        if (s > 0) & (s < n):
            if tl.load(seg_hi_ptr + s - 1) != s:   # s is inside a segment begun before
                s = tl.load(seg_hi_ptr + s)
        long_min = tl.cdiv(n, WIDE_SEGMENTS)
        while s < stop:
            lo = s
            s = tl.load(seg_hi_ptr + lo)
            run = True
            if SEGMENTS == 1:
                run = s - lo >= long_min
            if SEGMENTS == 2:
                run = s - lo < long_min
            if run:
                _greedy_segment(boxes_ptr, mask_ptr, rank_ptr, removed_ptr + 2 * lo, keep_ptr,
                                n, wcap, iou_threshold, lo, s, j, bit, True, BLOCK_T, BLOCK_K)
    else:
        _greedy_segment(boxes_ptr, mask_ptr, rank_ptr, removed_ptr, keep_ptr, n, wcap,
                        iou_threshold, 0, n, j, bit, False, BLOCK_T, BLOCK_K)


@triton.jit
def _greedy_segment(boxes_ptr, mask_ptr, rank_ptr, removed_seg, keep_ptr, n, wcap,
                    iou_threshold, lo, hi, j, bit, SEGMENTED: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """The greedy pass over the segment [lo, hi), 64 sorted boxes at a time; its removed
    words at ``removed_seg`` (at most hi - lo + 1 of them)."""
    first = lo // 64
    nb = (hi - 1) // 64 - first + 1  # 64-box blocks the segment touches
    for bb in range(0, nb):
        rows = (first + bb) * 64 + j
        row_ok = (rows >= lo) & (rows < hi)
        row_off = rows.to(tl.int64) * wcap
        # .cg: removed words change through atomics in L2; never read a stale L1 line.
        removed = tl.load(removed_seg + bb, cache_modifier=".cg")
        cand = tl.sum(tl.where(row_ok, bit, 0), axis=0) & ~removed
        diag = tl.load(mask_ptr + row_off, mask=((cand >> j) & 1) != 0, other=0)
        # Fixed point of keep = cand & ~OR{diag[r] : r kept}: bit k depends on bits < k
        # only, so it settles on the greedy answer in at most 64 rounds (usually 2 or 3).
        keep = cand
        prev = ~cand
        while keep != prev:
            prev = keep
            kept = ((keep >> j) & 1) != 0
            keep = cand & ~tl.reduce(tl.where(kept, diag, 0), 0, _or)
        kept = ((keep >> j) & 1) != 0
        if SEGMENTED:
            dst = tl.load(rank_ptr + rows, mask=row_ok, other=0)
        else:
            dst = rows
        tl.store(keep_ptr + dst, kept, mask=row_ok)
        if keep != 0:
            band_end = tl.minimum(nb - bb, wcap)
            for t0 in range(1, band_end, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                m = kept[:, None] & (t < band_end)[None, :]
                words = tl.load(mask_ptr + row_off[:, None] + t[None, :], mask=m, other=0)
                tl.atomic_or(removed_seg + bb + t[None, :] + 0 * j[:, None], words,
                             mask=m & (words != 0), sem="relaxed")
            # Blocks past the band (segments longer than the band): IoU on the fly.
            ax1, ay1, ax2, ay2, area_a = _load_boxes(boxes_ptr, n, rows, row_ok)
            hi_rows = tl.where(row_ok, hi, 0)
            for t in range(band_end, nb - bb):
                old = tl.load(removed_seg + bb + t, cache_modifier=".cg")
                if ~old != 0:
                    words = _suppression_words(boxes_ptr, n, iou_threshold, ax1, ay1, ax2,
                                               ay2, area_a, rows, hi_rows, first + bb + t,
                                               1, BLOCK_K)
                    hit = tl.reduce(tl.where(kept, tl.sum(words, axis=0), 0), 0, _or)
                    tl.atomic_or(removed_seg + bb + t, hit & ~old, sem="relaxed")
        # The next block reads removed words other threads just updated.
        tl.debug_barrier()


# Mask tiles: on the GPU one word per step, 4 columns per inner step: each thread owns a
# row and ORs its 4 columns in registers (56 registers on sm_90, 56% occupancy; a whole
# [64, 64] word tile took 168). The interpreter, which pays per op, does 4 whole words per
# step instead.
_MASK_GPU = {"BLOCK_T": 1, "BLOCK_K": 4, "num_warps": 2}
_MASK_INTERPRETER = {"BLOCK_T": 4, "BLOCK_K": 64, "num_warps": 8}
register_tuning(_nms_mask_kernel, [_MASK_GPU], interpreter=[_MASK_INTERPRETER])
# Greedy pass. Short segments (batched NMS over many classes): 16 band words per step
# over 8 warps (62 registers, 50% occupancy: many programs per SM). Long segments (nms,
# few classes): the pass is a serial chain of band steps, so 128 words per step over 16
# warps (128 registers, 25%: each program has an SM to itself), which cuts the steps of
# one class of 100k boxes from 77k to 11k. Words past the band (only
# batched_nms_mask has any) are computed 4 columns per inner step, as in the mask kernel.
_GREEDY_GPU = {"BLOCK_T": 16, "BLOCK_K": 4, "num_warps": 8}
_GREEDY_WIDE = {"BLOCK_T": 128, "BLOCK_K": 4, "num_warps": 16}
_GREEDY_INTERPRETER = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 8}
# The sweep's candidates: 32 words over 16 warps (93 registers, 25%) and 64 (110, 25%).
register_tuning(_nms_greedy_kernel, [_GREEDY_GPU, _GREEDY_WIDE],
                interpreter=[_GREEDY_INTERPRETER], candidates=[
                    {"BLOCK_T": 32, "BLOCK_K": 4, "num_warps": 16},
                    {"BLOCK_T": 64, "BLOCK_K": 4, "num_warps": 16}],
                key_fields=("boxes", "programs", "plan"),
                occupancy_note="the 128-word row runs only over segments of at least N/128 "
                               "boxes, one program each, about one per SM: its serial steps "
                               "bind, not occupancy (the 32- and 64-word candidates too, "
                               "where the sweep measured them faster)")
# Mask words are (N, wcap) row-major: the greedy pass's [rows, words] tiles want lanes
# along words (axis 1), the mask kernel's [words, rows] store along words (axis 0). With
# one word per row (wcap == 1, which the JIT compiles as a constant: at most 64 boxes)
# the rows are the stride-1 dimension instead; the greedy tiles then hold one valid word
# column and the compiler picks the lanes.
_ONE_WORD = "boxes, one word a row"


def _lanes_greedy(constexprs: dict) -> dict:
    if constexprs.get("wcap") == 1:
        return {_ONE_WORD: {"load": 0, "atomic_rmw": 1}}
    return {"boxes": {"load": 1, "atomic_rmw": 1}}


def _lanes_mask(constexprs: dict) -> dict:
    return {"boxes": {"store": 1 if constexprs.get("wcap") == 1 else 0}}


register_lanes(_nms_greedy_kernel, _lanes_greedy,
               {_ONE_WORD: "at most 64 boxes: one valid word column per tile, a launch of "
                           "microseconds whichever way the lanes run"})
register_lanes(_nms_mask_kernel, _lanes_mask)
# Greedy programs for batched_nms's short segments (each takes those starting in its window
# of N / 1024 sorted positions); the prep kernel's sorted positions per program.
_GREEDY_PROGRAMS, _PREP_BLOCK = 1024, 256
_PREP = {"num_warps": 4}
register_tuning(_nms_prep_kernel, [_PREP])


# ---------------------------------------------------------------------------------------
# Host side: the launcher, the sorting and result around both paths.

def _band_words(n: int, longest: int | None) -> int:
    """Mask words per row. ``longest`` (the longest segment, where the host read it):
    enough words for every segment, so no word is computed on the fly; one segment is then
    torchvision's own N x N/64 mask, 80 classes of 100k boxes 17 MB. None (not read): the
    whole N x N/64 mask up to SINGLE_PASS_BOXES boxes (what torchvision's batched_nms
    allocates there), past that MASK_BUDGET_BYTES (longer segments compute the rest on the
    fly)."""
    words = cdiv(n, 64)
    if longest is not None:
        return min(words, cdiv(longest, 64) + 1)
    if n <= SINGLE_PASS_BOXES:
        return words
    return max(1, min(words, MASK_BUDGET_BYTES // (8 * n)))


def _greedy_plan(n: int, segmented: bool,
                 interpreter: bool = INTERPRET) -> list[tuple[dict, int, int]]:
    """The greedy pass's launches: (tuning row, program count, SEGMENTS constexpr) each.
    One segment: one program. Classes: the wide tiles over the long segments, then the
    narrow ones over the rest, each launch's programs taking the segments that start in
    their windows (the interpreter, which pays per program, gets 4 and its own row)."""
    if not segmented:
        return [(_GREEDY_INTERPRETER if interpreter else _GREEDY_WIDE, 1, 0)]
    if interpreter:
        return [(_GREEDY_INTERPRETER, min(n, 4), 1), (_GREEDY_INTERPRETER, min(n, 4), 2)]
    return [(_GREEDY_WIDE, min(n, _WIDE_SEGMENTS), 1),
            (_GREEDY_GPU, min(n, _GREEDY_PROGRAMS), 2)]


def nms_forward(p: Segments, iou_threshold: float, longest: int | None = None) -> Tensor:
    """Triton path: keep flags by score rank. ``longest``, where the caller read it,
    sizes the band."""
    n, boxes, dev = p.n, p.given, p.given.device
    wcap = _band_words(n, longest if p.segmented else n)
    rows = torch.empty(5, n, dtype=torch.float32, device=dev)
    seg_hi = torch.empty(n, dtype=torch.int32, device=dev) if p.segmented else None
    removed = torch.empty(2 * n + 2, dtype=torch.int64, device=dev)
    cls = p.cls.view(torch.uint8) if p.segmented and p.cls.dtype == torch.bool else p.cls
    launch(_nms_prep_kernel, (cdiv(n + 1, _PREP_BLOCK),), boxes, p.perm, cls, rows, seg_hi,
           removed, n, *boxes.stride(), tuning=_PREP, SEGMENTED=p.segmented, BLOCK=_PREP_BLOCK)
    mask = torch.empty(n, wcap, dtype=torch.int64, device=dev)
    keep = torch.empty(n, dtype=torch.bool, device=dev)
    tm = pick_tuning(_nms_mask_kernel, _MASK_INTERPRETER if INTERPRET else _MASK_GPU)
    # Programs per row block stride over its words: enough to fill the GPU without
    # launching the empty lower triangle (a row block needs fewer words the later it is).
    # Grid sizes are not specializations: the interpreter, which pays per program, gets 1.
    t_programs = 1 if INTERPRET else min(cdiv(wcap, tm["BLOCK_T"]), 32)
    threshold = float32_threshold(iou_threshold, dev)
    launch(_nms_mask_kernel, (cdiv(n, 64), t_programs), rows, seg_hi, mask, n, wcap,
           threshold, tuning=tm, SEGMENTED=p.segmented)
    for row, programs, which in _greedy_plan(n, p.segmented):
        launch(_nms_greedy_kernel, (programs,), rows, mask, seg_hi, p.rank, removed, keep,
               n, wcap, threshold, tuning=pick_tuning(
                   _nms_greedy_kernel, row, key=(size_bucket(n), size_bucket(programs), which)),
               SEGMENTED=p.segmented, SEGMENTS=which)
    return keep


_NOT_FINITE = "boxes must have finite coordinates and scores must not be NaN"


def _check_finite(boxes: Tensor, scores: Tensor) -> None:
    """The value check of :func:`nms` and :func:`batched_nms` (one read of the data), where
    :func:`values_checked` says so. Unchecked, a NaN coordinate suppresses nothing and is
    suppressed by nothing (its IoU compares false), as in torchvision's CUDA kernel."""
    if boxes.numel() and not bool(torch.isfinite(boxes).all() & ~torch.isnan(scores).any()):
        raise ValueError(_NOT_FINITE)


def _longest(boxes: Tensor, idxs: Tensor | None) -> int:
    """The longest segment the mask band is sized by, -1 where not read: nms has one
    segment of N; batched_nms on the CUDA path reads nothing up to SINGLE_PASS_BOXES boxes
    and past that the longest class, in one sync (torchvision's batched_nms loops over the
    classes there, a sync each). The CPU path needs nothing."""
    n = boxes.shape[0]
    if idxs is None:
        return n
    if cpu_path(boxes) or n <= SINGLE_PASS_BOXES or is_tracing():
        return -1
    return int(torch.unique(idxs, return_counts=True)[1].max())


def _kept(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float,
          longest: int) -> Tensor:
    """The nms/batched_nms device kernel: kept input indices by decreasing score (ties:
    lower index; ``idxs`` None: one class). ``longest``: what the host read (-1: nothing).
    The op's one host sync reads the result size (``masked_select``)."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if cpu_path(boxes) and _cpu.nms_wins(boxes, scores):
        record_path("nms_forward", "torchvision")
        return _cpu.nms(boxes, scores, idxs, iou_threshold)
    p = Segments(boxes, scores, idxs)
    return torch.masked_select(p.score_order, _keep_ranked(p, iou_threshold, longest))


def _keep_ranked(p: Segments, iou_threshold: float, longest: int = -1) -> Tensor:
    """Keep flags (bool) by score rank."""
    if use_triton(p.given):
        record_path("nms_forward", "triton")
        return nms_forward(p, iou_threshold, None if longest < 0 else longest)
    record_path("nms_forward", "reference")
    keep = reference.nms_forward(p, iou_threshold).bool()
    if not p.segmented:
        return keep
    ranked = torch.empty_like(keep)
    ranked[p.rank] = keep
    return ranked


def _nms_call(op, boxes: Tensor, scores: Tensor, idxs: Tensor | None,
              threshold: float) -> Tensor:
    """The value check where it applies, then the op: in eager code its device kernel
    directly (no dispatcher), while tracing the custom op."""
    if values_checked(boxes):
        _check_finite(boxes, scores)
    longest = _longest(boxes, idxs)
    args = (boxes, scores) if idxs is None else (boxes, scores, idxs)
    if not eager(*args):
        return op(*args, threshold, longest)
    return op_body(_kept)(boxes, scores, idxs, threshold, longest)


# ---------------------------------------------------------------------------------------
# torch.library registration. longest: what the wrapper's sync read (-1: unknown). The op
# syncs once itself, for the size of its result.

@torch.library.custom_op("maskrcnn_triton::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, longest: int) -> Tensor:
    return _kept(boxes, scores, None, iou_threshold, longest)


@_nms_op.register_fake
def _(boxes, scores, iou_threshold, longest):
    return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


@torch.library.custom_op("maskrcnn_triton::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                    longest: int) -> Tensor:
    return _kept(boxes, scores, idxs, iou_threshold, longest)


@_batched_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold, longest):
    return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def _keep_mask(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """The batched_nms_mask device kernel: the keep mask in input order."""
    keep_in = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] and cpu_path(boxes):
        # batched_nms's body (the box count bounds the longest class)
        keep_in[_kept(boxes, scores, idxs, iou_threshold, boxes.shape[0])] = True
    elif boxes.shape[0]:
        p = Segments(boxes, scores, idxs)
        keep_in[p.score_order] = _keep_ranked(p, iou_threshold)
    return keep_in


@torch.library.custom_op("maskrcnn_triton::batched_nms_mask", mutates_args=())
def _batched_nms_mask_op(boxes: Tensor, scores: Tensor, idxs: Tensor,
                         iou_threshold: float) -> Tensor:
    return _keep_mask(boxes, scores, idxs, iou_threshold)


@_batched_nms_mask_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty(boxes.shape[0], dtype=torch.bool)


# ---------------------------------------------------------------------------------------
# Public API

# torchvision's own nms and batched_nms, as imported (patch_torchvision replaces the
# attributes, not these functions): quantized tensors go to them, never back through an
# attribute that may be ours (patch_torchvision, or a user's own assignment). nms calls
# torchvision's C++ operators; batched_nms offsets the classes and calls the
# torchvision.ops.boxes.nms attribute, ours or its, which ends in that nms.
_TORCHVISION_NMS = torchvision.ops.boxes.nms
_TORCHVISION_BATCHED_NMS = torchvision.ops.boxes.batched_nms


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for ``torchvision.ops.nms``.

    boxes: Tensor[N, 4] (x1, y1, x2, y2), float32/float16/bfloat16 (IoU in float32) or
    float64; scores: Tensor[N] float; quantized tensors go to torchvision's quantized
    kernel. Returns the kept indices (int64) by decreasing score, equal scores by lower
    index. One host sync, as torchvision's: the size of the result. The NaN/inf check of
    boxes and scores runs for CPU tensors, and for CUDA tensors inside
    ``kernels.check_values()`` (a second sync).
    """
    if isinstance(boxes, Tensor) and boxes.is_quantized:
        return _TORCHVISION_NMS(boxes, scores, iou_threshold)
    threshold = check_nms_args(boxes, scores, None, iou_threshold, False)
    return _nms_call(_nms_op, boxes, scores, None, threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for ``torchvision.ops.batched_nms``: NMS inside each value of ``idxs``.

    Work and memory follow the per-class counts (no N x N mask, no loop over classes).
    Empty boxes (any shape) return an empty int64 tensor before anything else is looked
    at, as torchvision's. One host sync up to 25,000 boxes: the size of the result; past
    that a second one first reads the longest class (torchvision loops over the classes
    there, a sync each). The NaN/inf check as :func:`nms`'s.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if isinstance(boxes, Tensor) and boxes.is_quantized:
        return _TORCHVISION_BATCHED_NMS(boxes, scores, idxs, iou_threshold)
    threshold = check_nms_args(boxes, scores, idxs, iou_threshold, True)
    return _nms_call(_batched_nms_op, boxes, scores, idxs, threshold)


def batched_nms_mask(boxes: Tensor, scores: Tensor, idxs: Tensor,
                     iou_threshold: float) -> Tensor:
    """``batched_nms`` as a keep mask: BoolTensor[N] in input order, no host sync at all.

    ``torch.nonzero(mask)`` ordered by score equals :func:`batched_nms`. Never a sync, so
    the inputs are checked for NaN or infinite values only on the CPU; a NaN box keeps no
    other from being kept. Fits CUDA graphs and ``torch.compile`` without a graph break.
    """
    threshold = check_nms_args(boxes, scores, idxs, iou_threshold, True)
    if boxes.is_cpu and values_checked(boxes):
        _check_finite(boxes, scores)
    if not eager(boxes, scores, idxs):
        return _batched_nms_mask_op(boxes, scores, idxs, threshold)
    return op_body(_keep_mask)(boxes, scores, idxs, threshold)


def _compile_examples(device: str = "cpu") -> None:
    """Launch every specialization the launchers can pick (for the GPU compile check and
    the GPU kit's memory check, which runs these on CUDA)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xy = torch.rand(70, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + torch.rand(70, 2, generator=g) * 30], 1).to(device, dtype)
        scores = torch.rand(70, generator=g).to(device, dtype)
        idxs = torch.randint(0, 3, (70,), generator=g).to(device)
        nms(boxes, scores, 0.5)
        batched_nms(boxes, scores, idxs, 0.5)
        batched_nms_mask(boxes, scores, idxs, 0.5)
