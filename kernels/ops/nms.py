"""Non-maximum suppression (torchvision semantics) as Triton kernels.

Both ops reduce to one problem: a greedy pass over boxes sorted so that each "segment"
(all boxes for ``nms``, one class for ``batched_nms``) is contiguous and ordered by
decreasing score (ties: lower index first). Boxes only suppress later boxes of their own
segment, so batched NMS never compares boxes of different classes.

1. ``_nms_mask_kernel`` (the parallel part) computes an IoU bitmask: word ``t`` of sorted
   row ``i`` holds, in bit ``k``, whether box ``i`` suppresses box ``64 * (i // 64 + t) + k``
   (IoU > threshold, later in the same segment). A program owns a 64-row block, whose rows
   share their columns, and computes only the words its rows' segments reach, and only the
   first ``wcap`` words per row (the "band"). ``nms`` and ``batched_nms`` size the band from
   the longest segment, read in their first host sync: every word a segment needs is
   stored (one segment: torchvision's N x N/64 mask; 100k boxes in 80 classes: 17 MB, not
   1.25 GB). ``batched_nms_mask`` never syncs: it sizes the band from N alone under a
   memory budget.
2. ``_nms_greedy_kernel`` (one program per segment, segments in parallel) walks its
   segment 64 boxes at a time: it resolves which of the 64 survive with a fixed-point
   iteration on the diagonal mask words (exact: bit ``k`` depends only on bits < k, so the
   iteration settles on the greedy answer in at most 64 steps, usually 2 or 3), then ORs
   the kept rows' band words into the segment's "removed" words, and computes the words
   beyond the band on the fly (only ``batched_nms_mask``'s segments longer than its band
   need that). With few segments each program gets wide steps (:func:`work_model` counts
   the steps at given segment sizes).
3. The host compacts the kept flags into indices sorted by score. Two host syncs: before
   any launch, the NaN/inf check of the inputs with the longest segment and the segment
   count; after the kernels, the result size.

IoU uses torchvision's arithmetic in float32 (float64 inputs: the reference in float64):
areas ``(x2 - x1) * (y2 - y1)`` (computed by torch), ``inter / (area_i + area_j - inter)``
with an IEEE division (``div_rn``), suppression when ``> iou_threshold``, the threshold
rounded as torchvision's kernel for the boxes' device rounds it (:func:`float32_threshold`:
a float on CUDA, the double itself on the CPU). No
fused multiply-add touches the IoU (checked in sm_90 SASS): one could flip a box whose IoU
equals the threshold.
"""
from __future__ import annotations

import numbers

import torch
import torchvision
import triton
import triton.language as tl
from torch import Tensor

from .. import _cpu, reference
from .._boxes import Segments, coordinate_rows, float32_threshold
from .._utils import (INTERPRET, NMS_ERRORS, cdiv, check_float, check_float_dtype,
                      check_same_device, check_tensor, cpu_path, eager, is_tracing, op_body,
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
# the longest class and the class count first (a second sync) to size the band.
SINGLE_PASS_BOXES = 25_000
# At most this many segments the greedy pass takes the wide tiles (about one program per
# SM); the kernel compares it with the segment count it reads when the host has not.
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


@triton.jit
def _nms_greedy_kernel(
    boxes_ptr,  # (5, N) float32: x1, y1, x2, y2, area rows of the sorted boxes
    mask_ptr,  # (N, wcap) int64: suppression words from _nms_mask_kernel
    bounds_ptr,  # (>= nseg + 1,) int32: segment g is sorted positions [bounds[g], bounds[g+1])
    nseg_ptr,  # (1,) int32: number of segments
    removed_ptr,  # (2N + 2,) int64, zeroed: segment g's removed words live at bounds[g] + g
    keep_ptr,  # (N,) int8: out, 1 where the sorted box is kept
    n, wcap, iou_threshold,
    SEGMENTED: tl.constexpr,  # else one segment, all N boxes (bounds and nseg None)
    SEGMENTS: tl.constexpr,  # 0: run; 1: only at most WIDE_SEGMENTS segments; 2: only more
    BLOCK_T: tl.constexpr,  # band words per step
    BLOCK_K: tl.constexpr,  # columns per inner step of the words computed on the fly
):
    j = tl.arange(0, 64)
    bit = tl.full([64], 1, tl.int64) << j.to(tl.int64)
    if SEGMENTED:
        nseg = tl.load(nseg_ptr)
        # the segment count unread on the host (no sync): one launch per tile width, each
        # runs only where the count is its own
        if SEGMENTS == 1:
            nseg = tl.where(nseg <= WIDE_SEGMENTS, nseg, 0)
        if SEGMENTS == 2:
            nseg = tl.where(nseg > WIDE_SEGMENTS, nseg, 0)
    else:
        nseg = 1
    for g in range(tl.program_id(0), nseg, tl.num_programs(0)):
        if SEGMENTED:
            lo = tl.load(bounds_ptr + g)
            hi = tl.load(bounds_ptr + g + 1)
        else:
            lo = 0
            hi = n
        first = lo // 64
        nb = (hi - 1) // 64 - first + 1  # 64-box blocks the segment touches
        removed_seg = removed_ptr + lo + g  # nb <= hi - lo + 1 words: regions never overlap
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
            tl.store(keep_ptr + rows, kept.to(tl.int8), mask=row_ok)
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
# Greedy pass, one program per segment. Many segments (batched NMS over many classes):
# 16 band words per step over 8 warps (59 registers, 50% occupancy: many programs per SM).
# Few segments (nms, few classes): the pass is a serial chain of band steps, so 128 words
# per step over 16 warps (118 registers, 25%: each program has an SM to itself), which cuts
# the steps of one class of 100k boxes from 77k to 11k. Words past the band (only
# batched_nms_mask has any) are computed 4 columns per inner step, as in the mask kernel.
_GREEDY_GPU = {"BLOCK_T": 16, "BLOCK_K": 4, "num_warps": 8}
_GREEDY_WIDE = {"BLOCK_T": 128, "BLOCK_K": 4, "num_warps": 16}
_GREEDY_INTERPRETER = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 8}
# The sweep's candidates: 32 words over 16 warps (64 registers, 50%) and 64 (115, 25%).
register_tuning(_nms_greedy_kernel, [_GREEDY_GPU, _GREEDY_WIDE],
                interpreter=[_GREEDY_INTERPRETER], candidates=[
                    {"BLOCK_T": 32, "BLOCK_K": 4, "num_warps": 16},
                    {"BLOCK_T": 64, "BLOCK_K": 4, "num_warps": 16}],
                key_fields=("boxes", "programs", "plan"),
                occupancy_note="the 128-word row runs only for at most 128 segments, one "
                               "program each, about one per SM: its serial steps bind, "
                               "not occupancy (the 64-word candidate too, where the sweep "
                               "measured it faster)")
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
# Greedy programs for batched_nms: each loops over segments pid, pid + G, ...
_GREEDY_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------
# Host side: the launcher, its step model, the sorting and result around both paths.

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


def _greedy_plan(n: int, segments: int | None,
                 interpreter: bool = INTERPRET) -> list[tuple[dict, int, int]]:
    """The greedy pass's launches for ``segments`` (None: not read on the host): (tuning
    row, program count, SEGMENTS constexpr) each. Unread, one launch per row, each of
    which runs only where the count it reads on the device is its own."""
    if interpreter:
        return [(_GREEDY_INTERPRETER, min(n, 4), 0)]
    if segments is None:
        return [(_GREEDY_WIDE, min(n, _WIDE_SEGMENTS), 1),
                (_GREEDY_GPU, min(n, _GREEDY_PROGRAMS), 2)]
    if segments <= _WIDE_SEGMENTS:
        return [(_GREEDY_WIDE, segments, 0)]
    return [(_GREEDY_GPU, min(n, _GREEDY_PROGRAMS), 0)]


def nms_forward(p: Segments, iou_threshold: float, longest: int | None = None,
                segments: int | None = None) -> Tensor:
    """Triton path: int8 keep flags of the sorted boxes (1 = kept). ``longest`` and
    ``segments``, when the caller read them, size the band and pick the greedy row."""
    n = p.n
    boxes = coordinate_rows(p.boxes.to(torch.float32))
    wcap = _band_words(n, longest if p.segmented else n)
    mask = torch.empty(n, wcap, dtype=torch.int64, device=boxes.device)
    removed = torch.zeros(2 * n + 2, dtype=torch.int64, device=boxes.device)
    keep = torch.empty(n, dtype=torch.int8, device=boxes.device)
    tm = pick_tuning(_nms_mask_kernel, _MASK_INTERPRETER if INTERPRET else _MASK_GPU)
    # Programs per row block stride over its words: enough to fill the GPU without
    # launching the empty lower triangle (a row block needs fewer words the later it is).
    # Grid sizes are not specializations: the interpreter, which pays per program, gets 1.
    t_programs = 1 if INTERPRET else min(cdiv(wcap, tm["BLOCK_T"]), 32)
    threshold = float32_threshold(iou_threshold, boxes.device)
    launch(_nms_mask_kernel, (cdiv(n, 64), t_programs), boxes, p.seg_hi, mask, n, wcap,
           threshold, tuning=tm, SEGMENTED=p.segmented)
    for row, programs, which in _greedy_plan(n, segments if p.segmented else 1):
        launch(_nms_greedy_kernel, (programs,), boxes, mask, p.bounds, p.nseg, removed, keep,
               n, wcap, threshold, tuning=pick_tuning(
                   _nms_greedy_kernel, row, key=(size_bucket(n), size_bucket(programs), which)),
               SEGMENTED=p.segmented, SEGMENTS=which)
    return keep


def work_model(segment_sizes: list[int], segmented: bool = True,
               longest_known: bool = True) -> dict:
    """Step counts of the Triton path for segments of these sizes (in sorted order), from
    the same band and tuning rules the launcher uses: ``band_words`` the mask kernel
    computes (one per row), ``fly_words`` the greedy pass computes on the fly (64 rows x 64
    columns of IoU each; an upper bound: every 64-box block assumed to keep a box),
    ``serial_steps`` of the longest-running greedy
    program (per 64-box block: the fixed point, its band steps and its on-the-fly words)."""
    n = sum(segment_sizes)
    longest = max(segment_sizes) if longest_known else None
    wcap = _band_words(n, longest if segmented else n)
    # unread on the host, the segment count is read by the greedy launches on the device:
    # the one that runs is the one the count picks
    segments = len(segment_sizes) if segmented else 1
    (row, programs, _), = _greedy_plan(n, segments, interpreter=False)   # the GPU launch
    band = fly = 0
    per_program = [0] * programs
    lo = 0
    for g, size in enumerate(segment_sizes):
        hi = lo + size
        first, nb = lo // 64, (hi - 1) // 64 - lo // 64 + 1
        steps = 0
        for bb in range(nb):
            band_end = min(nb - bb, wcap)
            past = nb - bb - band_end
            rows = min(hi, (first + bb + 1) * 64) - max(lo, (first + bb) * 64)
            band += band_end * rows
            fly += past
            steps += 1 + cdiv(band_end - 1, row["BLOCK_T"]) + past
        per_program[g % programs] += steps
        lo = hi
    return {"boxes": n, "segments": len(segment_sizes), "band_words": band,
            "fly_words": fly, "serial_steps": max(per_program), "mask_MB": n * wcap * 8 / 1e6,
            "greedy_row": f"BLOCK_T={row['BLOCK_T']}"}


_NOT_FINITE = "boxes must have finite coordinates and scores must not be NaN"


def _check_finite(boxes: Tensor, scores: Tensor) -> None:
    """The value check of :func:`nms` and :func:`batched_nms` (one read of the data), where
    :func:`values_checked` says so. Unchecked, a NaN coordinate suppresses nothing and is
    suppressed by nothing (its IoU compares false), as in torchvision's CUDA kernel."""
    if boxes.numel() and not bool(torch.isfinite(boxes).all() & ~torch.isnan(scores).any()):
        raise ValueError(_NOT_FINITE)


def _plan(boxes: Tensor, idxs: Tensor | None) -> tuple[int, int]:
    """(longest segment, segment count) the launches are sized by, -1 where not read: nms
    has one segment of N; batched_nms on the CUDA path reads nothing up to
    SINGLE_PASS_BOXES boxes (the kernels read the count on the device) and past that the
    longest class and the class count, in one sync, to size the mask band (torchvision's
    batched_nms loops over the classes there, a sync each). The CPU path needs neither."""
    n = boxes.shape[0]
    if idxs is None:
        return n, 1
    if cpu_path(boxes) or n <= SINGLE_PASS_BOXES or is_tracing():
        return -1, -1
    counts = torch.unique(idxs, return_counts=True)[1]
    longest, segments = torch.stack([counts.max(), counts.new_tensor(counts.numel())]).tolist()
    return longest, segments


def _kept_indices(p: Segments, keep_sorted: Tensor, boxes: Tensor) -> Tensor:
    """Kept input indices by decreasing score (ties: lower index): the op's one host sync
    reads the result size (``nonzero``)."""
    if not p.segmented:           # the sorted order is the score order
        return p.perm[keep_sorted.nonzero().view(-1)]
    keep_in = torch.empty(p.n, dtype=torch.int8, device=boxes.device)
    keep_in[p.perm] = keep_sorted
    return p.score_order[keep_in[p.score_order].nonzero().view(-1)]


def _kept(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float,
          longest: int, segments: int) -> Tensor:
    """The nms/batched_nms device kernel: kept input indices (``idxs`` None: one class).
    ``longest``, ``segments``: what the host read (-1: nothing)."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if cpu_path(boxes) and _cpu.nms_wins(boxes, scores):
        record_path("nms_forward", "torchvision")
        return _cpu.nms(boxes, scores, idxs, iou_threshold)
    p = Segments(boxes, scores, idxs)
    return _kept_indices(p, _keep_sorted(p, boxes, iou_threshold, longest, segments), boxes)


def _keep_sorted(p: Segments, boxes: Tensor, iou_threshold: float, longest: int = -1,
                 segments: int = -1) -> Tensor:
    if use_triton(boxes):
        record_path("nms_forward", "triton")
        return nms_forward(p, iou_threshold, None if longest < 0 else longest,
                           None if segments < 0 else segments)
    record_path("nms_forward", "reference")
    return reference.nms_forward(p, iou_threshold)


def _nms_call(op, boxes: Tensor, scores: Tensor, idxs: Tensor | None,
              threshold: float) -> Tensor:
    """The value check where it applies, then the op: in eager code its device kernel
    directly (no dispatcher), while tracing the custom op."""
    if values_checked(boxes):
        _check_finite(boxes, scores)
    longest, segments = _plan(boxes, idxs)
    args = (boxes, scores) if idxs is None else (boxes, scores, idxs)
    if not eager(*args):
        return op(*args, threshold, longest, segments)
    return op_body(_kept)(boxes, scores, idxs, threshold, longest, segments)


# ---------------------------------------------------------------------------------------
# torch.library registration. longest/segments: what the wrapper's sync read (-1: unknown).
# The op syncs once itself, for the size of its result.

@torch.library.custom_op("maskrcnn_triton::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, longest: int,
            segments: int) -> Tensor:
    return _kept(boxes, scores, None, iou_threshold, longest, segments)


@_nms_op.register_fake
def _(boxes, scores, iou_threshold, longest, segments):
    return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


@torch.library.custom_op("maskrcnn_triton::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                    longest: int, segments: int) -> Tensor:
    return _kept(boxes, scores, idxs, iou_threshold, longest, segments)


@_batched_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold, longest, segments):
    return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def _keep_mask(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """The batched_nms_mask device kernel: the keep mask in input order."""
    keep_in = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] and cpu_path(boxes):
        # batched_nms's body (the box count bounds the longest class)
        keep_in[_kept(boxes, scores, idxs, iou_threshold, boxes.shape[0], -1)] = True
        return keep_in
    if boxes.shape[0]:
        p = Segments(boxes, scores, idxs)
        keep_in[p.perm] = _keep_sorted(p, boxes, iou_threshold).bool()
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

def _check(boxes, scores, idxs, iou_threshold, batched: bool) -> float:
    """Shapes, dtypes and devices (``idxs`` when ``batched``); errors are also torchvision's
    classes (NMS_ERRORS)."""
    e = NMS_ERRORS
    check_tensor("boxes", boxes, ndim=2, what="Tensor[N, 4]", errors=e)
    if boxes.shape[1] != 4:
        raise e.value(f"boxes must be Tensor[N, 4], got shape {tuple(boxes.shape)}")
    check_float_dtype("boxes", boxes, e)
    check_tensor("scores", scores, ndim=1, what="Tensor[N]", errors=e)
    check_float("scores", scores, e)
    if scores.shape[0] != boxes.shape[0]:
        raise e.value(f"scores must have one entry per box: got {scores.shape[0]} scores "
                      f"for {boxes.shape[0]} boxes")
    check_same_device(boxes=boxes, scores=scores)
    if batched:
        check_tensor("idxs", idxs, ndim=1, what="Tensor[N]", errors=e)
        if idxs.is_complex():      # torchvision takes any real dtype (idxs.to(boxes))
            raise e.dtype(f"idxs must be a real tensor, got {idxs.dtype}")
        if idxs.shape[0] != boxes.shape[0]:
            raise e.value(f"idxs must have one entry per box: got {idxs.shape[0]} idxs "
                          f"for {boxes.shape[0]} boxes")
        check_same_device(boxes=boxes, idxs=idxs)
    if isinstance(iou_threshold, torch.Tensor) and iou_threshold.numel() == 1:
        iou_threshold = iou_threshold.item()
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise e.dtype(f"iou_threshold must be a float, got {iou_threshold!r}")
    return float(iou_threshold)   # NaN, as in torchvision, suppresses nothing


def _quantized(*tensors) -> bool:
    return any(isinstance(t, Tensor) and t.is_quantized for t in tensors)


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
    if _quantized(boxes, scores):
        return _TORCHVISION_NMS(boxes, scores, iou_threshold)
    threshold = _check(boxes, scores, None, iou_threshold, batched=False)
    return _nms_call(_nms_op, boxes, scores, None, threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for ``torchvision.ops.batched_nms``: NMS inside each value of ``idxs``.

    Work and memory follow the per-class counts (no N x N mask, no loop over classes).
    Empty boxes (any shape) return an empty int64 tensor before anything else is looked
    at, as torchvision's. One host sync up to 25,000 boxes: the size of the result; past
    that a second one first reads the longest class and the class count (torchvision loops
    over the classes there, a sync each). The NaN/inf check as :func:`nms`'s.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if _quantized(boxes, scores):
        return _TORCHVISION_BATCHED_NMS(boxes, scores, idxs, iou_threshold)
    threshold = _check(boxes, scores, idxs, iou_threshold, batched=True)
    return _nms_call(_batched_nms_op, boxes, scores, idxs, threshold)


def batched_nms_mask(boxes: Tensor, scores: Tensor, idxs: Tensor,
                     iou_threshold: float) -> Tensor:
    """``batched_nms`` as a keep mask: BoolTensor[N] in input order, no host sync at all.

    ``torch.nonzero(mask)`` ordered by score equals :func:`batched_nms`. Never a sync, so
    the inputs are checked for NaN or infinite values only on the CPU; a NaN box keeps no
    other from being kept. Fits CUDA graphs and ``torch.compile`` without a graph break.
    """
    threshold = _check(boxes, scores, idxs, iou_threshold, batched=True)
    if boxes.device.type == "cpu" and values_checked(boxes):
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
