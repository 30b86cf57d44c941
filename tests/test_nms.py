"""NMS / batched NMS: exact equality with torchvision, adversarial ties, dtypes, bad input.

torchvision's batched_nms switches between an exact per-class loop (large inputs) and a
coordinate-offset trick (small inputs) whose shifted coordinates can round an IoU across
the threshold; the oracle here is its exact per-class form, ``_batched_nms_vanilla``,
plus the public function on integer coordinates, where the offset changes nothing.

The interpreter pays per Triton op, so it runs the large sizes at one threshold and skips
batched cases whose segments are that large; the reference and CUDA backends run all.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.boxes import _batched_nms_vanilla

import kernels
from benchmarks.static import nms_work_model

from kernels._boxes import float32_threshold
from kernels.ops import nms as nms_module

# Two zero-area boxes give IoU 0 / 0 = NaN (never > threshold), as in torchvision; the
# interpreter's numpy says so in a warning.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 1.0)
SIZES = (0, 1, 63, 64, 65, 1000, 5000)


def random_boxes(n: int, device="cpu", scale=100.0, spread=0.3):
    """Boxes overlapping a lot: corners in [0, scale), sides up to spread * scale."""
    xy = torch.rand(n, 2) * scale
    wh = torch.rand(n, 2) * scale * spread
    return torch.cat([xy, xy + wh], 1).to(device), torch.rand(n).to(device)


def thresholds_for(backend, n: int, classes: int = 1):
    if backend.name == "interpreter" and n >= 1000:
        return (0.5,)
    if backend.name == "interpreter" and classes > 5:
        return (0.3, 0.7)
    return THRESHOLDS


def assert_same(ours, ref, scores):
    """Same kept set; ours by decreasing score, ties by lower index; torchvision's order
    may differ only among exactly tied scores (its final sort is not stable)."""
    assert ours.dtype == torch.int64 and ours.device == ref.device
    torch.testing.assert_close(ours.sort()[0], ref.sort()[0], rtol=0, atol=0)
    s = scores[ours].double()
    torch.testing.assert_close(s, scores[ref].double(), rtol=0, atol=0)
    if len(ours) > 1:
        assert bool(((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (ours[:-1] < ours[1:]))).all())


@pytest.mark.parametrize("n", SIZES)
def test_nms_matches_torchvision(backend, poison, n):
    boxes, scores = random_boxes(n, backend.device)
    for thr in thresholds_for(backend, n):
        assert_same(kernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr),
                    scores)


@pytest.mark.parametrize("classes", [1, 5, 80])
@pytest.mark.parametrize("n", SIZES)
def test_batched_nms_matches_torchvision(backend, poison, n, classes):
    if backend.name == "interpreter" and n * n / classes > 2_000_000:
        pytest.skip("segments this large are too slow for the interpreter")
    boxes, scores = random_boxes(n, backend.device)
    idxs = torch.randint(0, classes, (n,), device=backend.device)
    for thr in thresholds_for(backend, n, classes):
        ref = _batched_nms_vanilla(boxes, scores, idxs, thr)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr), ref, scores)
        mask = kernels.batched_nms_mask(boxes, scores, idxs, thr)
        assert mask.dtype == torch.bool and mask.shape == (n,)
        torch.testing.assert_close(mask, torch.zeros_like(mask).index_fill_(0, ref, True))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32, torch.bool])
def test_batched_nms_skewed_classes(backend, poison, dtype):
    """Long and short classes side by side (the greedy pass's wide launch takes classes of
    at least N/128 boxes, its narrow one the rest, each program those that start in its
    window), with class values of every kind batched_nms takes."""
    sizes = [300, 1, 2, 7, 3, 60, 1, 1, 4, 90, 2, 5] + [2] * 40
    if dtype == torch.bool:
        sizes = [400, 150]
    n = sum(sizes)
    boxes, scores = random_boxes(n, backend.device)
    values = torch.arange(len(sizes)) * (-7 if dtype == torch.float32 else 1)
    order = torch.randperm(n)
    idxs = torch.empty(n, dtype=torch.int64)
    idxs[order] = values.repeat_interleave(torch.tensor(sizes))   # class c: order[its run]
    idxs = idxs.to(backend.device, dtype)
    # each short class is one box repeated: exactly one of its boxes is kept
    first = 0
    for size in sizes:
        if size < 10:
            boxes[order[first:first + size]] = boxes[order[first]].clone()
        first += size
    for thr in (0.3, 0.6):
        ref = _batched_nms_vanilla(boxes, scores, idxs, thr)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr), ref, scores)
        _mask_keeps(kernels.batched_nms_mask(boxes, scores, idxs, thr), ref, scores)


def test_batched_nms_public_torchvision_integer_coordinates(backend):
    # Integer coordinates: torchvision's offset trick is exact, so its public op is the oracle.
    n = 300
    xy = torch.randint(0, 60, (n, 2))
    boxes = torch.cat([xy, xy + torch.randint(1, 25, (n, 2))], 1).float().to(backend.device)
    scores = torch.rand(n, device=backend.device)
    idxs = torch.randint(-3, 4, (n,), device=backend.device) * 1000  # any integers
    for thr in (0.3, 0.5):
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    torchvision.ops.batched_nms(boxes, scores, idxs, thr), scores)


def test_tied_scores_and_duplicates(backend, poison):
    n = 257
    boxes, _ = random_boxes(n, backend.device, spread=0.5)
    boxes[100:140] = boxes[60:100]  # exact duplicates
    boxes[140:150] = boxes[0]
    scores = torch.randint(0, 4, (n,), device=backend.device).float()  # many exact ties
    idxs = torch.randint(0, 3, (n,), device=backend.device)
    for thr in (0.0, 0.5, 1.0):
        assert_same(kernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr),
                    scores)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes, scores, idxs, thr), scores)


def test_iou_exactly_at_threshold(backend, poison):
    # Small integer boxes: many pairs have IoU exactly equal to a simple fraction; use those
    # fractions (as doubles, like Python floats) as thresholds. 1/3, 0.3 or 0.7 do not round
    # to nearest in float32 the same way the double compares.
    n = 200
    xy = torch.randint(0, 6, (n, 2))
    boxes = torch.cat([xy, xy + torch.randint(1, 4, (n, 2))], 1).float().to(backend.device)
    scores = torch.rand(n, device=backend.device)
    idxs = torch.randint(0, 2, (n,), device=backend.device)
    iou = torchvision.ops.box_iou(boxes.double(), boxes.double())
    values = torch.unique(iou[(iou > 0) & (iou < 1)])
    picks = values[torch.randperm(len(values))[:4]].tolist()
    for thr in picks + [0.5, 0.25, 1 / 3, 0.3, 0.7]:
        ref = torchvision.ops.nms(boxes, scores, thr)
        assert_same(kernels.nms(boxes, scores, thr), ref, scores)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes, scores, idxs, thr), scores)


def test_threshold_is_rounded_as_torchvisions_kernel_for_the_device():
    """torchvision's CUDA kernel takes the threshold as a float (rounded to nearest); its
    CPU kernel compares the float32 IoU with the double: the largest float32 not above it."""
    for thr in (0.3, 0.7, 1 / 3, 0.5, 0.1):
        nearest = float(np.float32(thr))
        assert float32_threshold(thr, torch.device("cuda")) == nearest
        below = np.float32(float32_threshold(thr, "cpu"))
        assert float(below) <= thr < float(np.nextafter(below, np.float32(2)))


def test_degenerate_boxes(backend, poison):
    n = 130
    boxes, scores = random_boxes(n, backend.device)
    boxes[::3, 2] = boxes[::3, 0]  # zero width
    boxes[1::5, 3] = boxes[1::5, 1] - 4  # negative height
    boxes[2::7] = boxes[2::7, :2].repeat(1, 2)  # points
    boxes[3] = boxes[6] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # identical points
    idxs = torch.randint(0, 2, (n,), device=backend.device)
    for thr in (-0.1, 0.0, 0.5):  # below 0, IoU 0 suppresses but 0/0 (two points) does not
        assert_same(kernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr),
                    scores)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes, scores, idxs, thr), scores)


def test_large_coordinates(backend, poison):
    boxes, scores = random_boxes(300, backend.device, scale=1e5)
    for thr in (0.3, 0.7):
        assert_same(kernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr),
                    scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, poison, dtype):
    # IoU in float32 for half types: equal to torchvision on the upcast boxes and scores.
    boxes, scores = random_boxes(150, backend.device)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    idxs = torch.randint(0, 3, (150,), device=backend.device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for thr in (0.3, 0.6):
        assert_same(kernels.nms(boxes, scores, thr),
                    torchvision.ops.nms(boxes.to(wide), scores.to(wide), thr), scores)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes.to(wide), scores.to(wide), idxs, thr), scores)


def _mask_keeps(mask, ref, scores):
    """A keep mask (input order) holds exactly the reference's kept set."""
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert_same(mask.nonzero().flatten()[scores[mask].argsort(descending=True, stable=True)],
                ref, scores)


def test_band_overflow_computes_on_the_fly(backend, poison, monkeypatch):
    # batched_nms_mask never syncs, so a memory budget caps its band; a tiny one sends
    # segments longer than the band down the on-the-fly path.
    monkeypatch.setattr(nms_module, "MASK_BUDGET_BYTES", 8 * 400)
    boxes, scores = random_boxes(400, backend.device)
    idxs = torch.randint(0, 2, (400,), device=backend.device)
    for thr in (0.2, 0.6):
        _mask_keeps(kernels.batched_nms_mask(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes, scores, idxs, thr), scores)


def test_band_covers_the_longest_segment():
    """nms and batched_nms size the band from the longest segment: no word on the fly."""
    for sizes in ([100_000], [1250] * 80, [7, 64, 65, 130]):
        assert nms_work_model(sizes)["fly_words"] == 0
    # without the sync (batched_nms_mask), one class of 100k boxes passes the budget
    assert nms_work_model([100_000], longest_known=False)["fly_words"] > 0


@pytest.mark.parametrize("greedy", ["_GREEDY_GPU", "_GREEDY_WIDE"])
@pytest.mark.parametrize("budget_words", [None, 2])
def test_gpu_tiles(backend, poison, monkeypatch, budget_words, greedy):
    # The interpreter launches whole-word tiles; run the GPU rows (inner loops over column
    # chunks, narrower or wider band steps) here too, so their code is checked without a
    # GPU. A two-word band sends batched_nms_mask's long segments down the on-the-fly path.
    monkeypatch.setattr(nms_module, "_MASK_INTERPRETER", nms_module._MASK_GPU)
    monkeypatch.setattr(nms_module, "_GREEDY_INTERPRETER", getattr(nms_module, greedy))
    n = 400
    if budget_words:
        monkeypatch.setattr(nms_module, "MASK_BUDGET_BYTES", 8 * n * budget_words)
    boxes, scores = random_boxes(n, backend.device)
    idxs = torch.randint(0, 2, (n,), device=backend.device)
    for thr in (0.3, 0.6):
        if budget_words:
            _mask_keeps(kernels.batched_nms_mask(boxes, scores, idxs, thr),
                        _batched_nms_vanilla(boxes, scores, idxs, thr), scores)
            continue
        assert_same(kernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr),
                    scores)
        assert_same(kernels.batched_nms(boxes, scores, idxs, thr),
                    _batched_nms_vanilla(boxes, scores, idxs, thr), scores)


def test_non_contiguous_inputs(backend):
    boxes, scores = random_boxes(90, backend.device)
    wide = torch.cat([boxes, boxes], 1)[:, :4]  # row stride 8
    assert not wide.is_contiguous()
    s = torch.stack([scores, scores], 1)[:, 0]
    assert_same(kernels.nms(wide, s, 0.5), torchvision.ops.nms(boxes, scores, 0.5), scores)


def test_empty(backend):
    boxes = torch.zeros(0, 4, device=backend.device)
    scores = torch.zeros(0, device=backend.device)
    idxs = torch.zeros(0, dtype=torch.int64, device=backend.device)
    for out in (kernels.nms(boxes, scores, 0.5), kernels.batched_nms(boxes, scores, idxs, 0.5)):
        assert out.shape == (0,) and out.dtype == torch.int64
        assert out.device == boxes.device
    mask = kernels.batched_nms_mask(boxes, scores, idxs, 0.5)
    assert mask.shape == (0,) and mask.dtype == torch.bool


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sync and memory checks")
def test_cuda_mask_without_sync_and_batched_memory():
    boxes, scores = random_boxes(100_000, "cuda", scale=1000.0, spread=0.1)
    idxs = torch.randint(0, 80, (100_000,), device="cuda")
    kernels.batched_nms_mask(boxes, scores, idxs, 0.5)  # warm up (compiles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = kernels.batched_nms_mask(boxes, scores, idxs, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    keep = kernels.batched_nms(boxes, scores, idxs, 0.5)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 64 * 2**20, f"peak {peak} bytes; an N x N / 8 mask would be 1.25 GB"
    ref = _batched_nms_vanilla(boxes, scores, idxs, 0.5)
    assert_same(keep, ref, scores)
    torch.testing.assert_close(mask, torch.zeros_like(mask).index_fill_(0, ref, True))


def test_torch_compile_fullgraph():
    boxes, scores = random_boxes(80)
    idxs = torch.randint(0, 3, (80,))

    def f(b, s, i):
        keep = kernels.batched_nms(b, s, i, 0.5)
        return keep, b[keep].sum(), (kernels.batched_nms_mask(b, s, i, 0.5).float() * s).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(boxes, scores, idxs), f(boxes, scores, idxs)
    assert_same(got[0], _batched_nms_vanilla(boxes, scores, idxs, 0.5), scores)
    torch.testing.assert_close(got[1:], want[1:])


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def _b(n=3):
    return torch.rand(n, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.nms(torch.rand(3, 5), torch.rand(3), 0.5), ValueError, "boxes"),
    (lambda: kernels.nms(torch.rand(4), torch.rand(4), 0.5), ValueError, "boxes"),
    (lambda: kernels.nms(_b().long(), torch.rand(3), 0.5), TypeError, "boxes"),
    (lambda: kernels.nms([[0, 0, 1, 1]], torch.rand(1), 0.5), TypeError, "boxes"),
    (lambda: kernels.nms(_b(), torch.rand(4), 0.5), ValueError, "scores"),
    (lambda: kernels.nms(_b(), torch.rand(3, 1), 0.5), ValueError, "scores"),
    (lambda: kernels.nms(_b(), torch.arange(3), 0.5), TypeError, "scores"),
    (lambda: kernels.nms(_b(), torch.rand(3, device="meta"), 0.5), ValueError, "device"),
    (lambda: kernels.nms(_b(), torch.rand(3), "0.5"), TypeError, "iou_threshold"),
    (lambda: kernels.nms(torch.tensor([[0., 0, float("nan"), 1]]), torch.rand(1), 0.5),
     ValueError, "boxes"),
    (lambda: kernels.nms(torch.tensor([[0., 0, float("inf"), 1]]), torch.rand(1), 0.5),
     ValueError, "boxes"),
    (lambda: kernels.nms(_b(), torch.tensor([0.1, float("nan"), 0.3]), 0.5), ValueError,
     "scores"),
    (lambda: kernels.batched_nms(_b(), torch.rand(3), torch.zeros(2, dtype=torch.long), 0.5),
     ValueError, "idxs"),
    (lambda: kernels.batched_nms(_b(), torch.rand(3), torch.zeros(3, 1, dtype=torch.long),
                                 0.5), ValueError, "idxs"),
    (lambda: kernels.batched_nms_mask(_b(), torch.rand(2), torch.zeros(3, dtype=torch.long),
                                      0.5), ValueError, "scores"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_nan_raises_on_every_backend(backend):
    boxes, scores = random_boxes(70, backend.device)
    boxes[13, 1] = float("nan")
    with pytest.raises(ValueError, match="boxes"):
        kernels.batched_nms(boxes, scores, torch.zeros(70, dtype=torch.long,
                                                        device=backend.device), 0.5)


def test_nms_work_at_the_benchmark_shapes():
    """The static NMS check: at every benchmarked shape (1k-100k boxes; 1, 5 and 80
    classes, the benchmark's own boxes) batched_nms computes no word on the fly and one
    class stays under the serial-step ceiling; the check flags either regression."""
    from benchmarks import static
    rows = static.nms_work()
    assert {(r["boxes"], r["classes"]) for r in rows} == {
        (n, c) for n in (1000, 5000, 20000, 100_000) for c in (1, 5, 80)}
    assert static.nms_problems(rows) == []
    one = next(r for r in rows if r["op"] == "batched_nms" and r["boxes"] == 100_000
               and r["classes"] == 1)
    assert static.nms_problems([dict(one, fly_words=5)])
    assert static.nms_problems([dict(one, serial_steps=76_800)])
