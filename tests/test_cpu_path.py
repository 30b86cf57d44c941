"""The CPU path outside the interpreter: each op runs torchvision's C++ kernel where it gives
the same result faster (RoI Align at one level or per level, NMS on chunks of its score
order), ours elsewhere; both checked against our references (the independent oracle),
and ``reference_path()`` still forces the references."""
from __future__ import annotations

import threading

import pytest
import torch
import torchvision
from torch.testing import assert_close

import kernels
from kernels import _cpu, _utils
from kernels._utils import last_path, reference_path
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss
from conftest import tol


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    """CPU tensors take the CPU path even when the suite runs the interpreter."""
    monkeypatch.setattr(_utils, "INTERPRET", False)
    last_path.clear()


def _roi_case(dtype, channels_last=False):
    x = torch.randn(2, 5, 19, 23, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.cat([torch.randint(0, 2, (7, 1)).to(dtype),
                      torch.rand(7, 2, dtype=dtype) * 10,
                      10 + torch.rand(7, 2, dtype=dtype) * 12], 1)
    return x, rois


def _run_roi_align(x, rois):
    x = x.detach().clone().requires_grad_()
    out = kernels.roi_align(x, rois, (3, 4), 0.8, -1, True)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(grad)
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_runs_torchvision_with_the_references_result(dtype, channels_last):
    x, rois = _roi_case(dtype, channels_last)
    out, grad = _run_roi_align(x, rois)
    assert last_path == {"roi_align_forward": "torchvision",
                         "roi_align_backward": "torchvision"}
    assert grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    with reference_path():
        ref_out, ref_grad = _run_roi_align(x, rois)
    assert last_path["roi_align_forward"] == "reference"
    assert_close(out, ref_out, **tol(dtype))
    assert_close(grad, ref_grad, **tol(dtype))


@pytest.fixture
def two_threads():
    """torch may use two threads (the suite's processes run with one), as the CPU paths'
    thread pool then does."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def spy_pool(monkeypatch, spy) -> None:
    """``spy(real in_pool)`` in place of the pool in every CPU-path module that uses it."""
    real = _cpu.pool.in_pool
    for module in (_cpu.roi_align, _cpu.suppression, _cpu.losses):
        monkeypatch.setattr(module, "in_pool", spy(real))


@pytest.fixture
def pool_calls(monkeypatch):
    """The item count of each call to the CPU path's thread pool, in order (it still runs
    them)."""
    calls = []

    def counting(real):
        def spy(fn, items):
            items = list(items)
            calls.append(len(items))
            return real(fn, items)
        return spy
    spy_pool(monkeypatch, counting)
    return calls


def test_pool_threads_run_torch_on_one_thread(two_threads, monkeypatch):
    """Each pool thread's torch operations run on one intra-op thread (no OpenMP team of its
    own that would slow the main thread's parallel regions); the main thread keeps its
    count, and a thread started later gets torch's default, not the pool's."""
    monkeypatch.setattr(_cpu.pool, "_pool", None)       # new threads: their set-up runs
    counts = _cpu.pool.in_pool(
        lambda _: (torch.ones(1 << 20).sum(), torch.get_num_threads())[1], range(4))
    _cpu.pool._pool.shutdown()
    assert counts == [1, 1, 1, 1]
    assert torch.get_num_threads() == 2
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [2]


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_on_roi_slices_in_threads(channels_last, monkeypatch, two_threads):
    """Many RoIs: the forward runs as ROI_CHUNKS slices of the RoIs, the backward per
    group of images (here 3 groups of one), from the thread pool: torchvision's result bit
    for bit, with any thread count."""
    x = torch.randn(3, 6, 21, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # 8 RoIs of these a part
    monkeypatch.setattr(_cpu.roi_align, "PART_SAMPLES",
                        8 * (6 + _cpu.roi_align.SAMPLE_WEIGHTS) * 3 * 4 * 4)
    k = _cpu.roi_align.ROI_CHUNKS * 8 + 3
    xy = torch.rand(k, 2) * 12
    rois = torch.cat([torch.randint(0, 3, (k, 1)).float(), xy, xy + 2 + torch.rand(k, 2) * 9],
                     1)
    slices, grad_modes = [], []

    def probing(real):
        def spy(fn, items):
            def probe(item):            # runs in a pool thread
                grad_modes.append(torch.is_grad_enabled())
                return fn(item)
            out = real(probe, items)
            slices.append(len(out))
            return out
        return spy
    spy_pool(monkeypatch, probing)
    runs = []
    for threads in (4, 2, 1):
        torch.set_num_threads(threads)
        xg = x.clone().requires_grad_()
        out = kernels.roi_align(xg, rois, (3, 4), 0.8, 2, True)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        runs.append((out, xg.grad))
    # no more parts than threads: forward slices, then backward groups of images (one
    # group, serially, at one thread); a channels_last map first copied to NCHW once, by
    # a channel range a thread (torchvision's kernel would copy it in every slice's call)
    if channels_last:
        assert slices == [_cpu.roi_align.ROI_CHUNKS, _cpu.roi_align.ROI_CHUNKS, 3, 2, 2, 2, 1, 1]
    else:
        assert slices == [_cpu.roi_align.ROI_CHUNKS, 3, 2, 2, 1]
    assert not any(grad_modes)      # no graph recorded in the pool's threads
    xg = x.clone().requires_grad_()
    expected = torchvision.ops.roi_align(xg, rois, (3, 4), 0.8, 2, True)
    expected.backward(torch.linspace(-1, 1, expected.numel()).reshape(expected.shape))
    for out, grad in runs:
        assert torch.equal(out, expected) and torch.equal(grad, xg.grad)


@pytest.mark.parametrize("dtype, channels_last", [
    (torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_roi_align_backward_of_one_image_in_channel_parts(dtype, channels_last, monkeypatch,
                                                          two_threads, pool_calls):
    """One image, more work than one part: the backward splits the channels (a RoI's sums
    into a channel are that channel's alone), each part torchvision's kernel, copied into
    the map's gradient from the pool: torchvision's gradient bit for bit (bfloat16: its
    float32 gradient rounded once), in the map's dtype and layout."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 21, 17, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(_cpu.roi_align, "PART_SAMPLES",
                        8 * (6 + _cpu.roi_align.SAMPLE_WEIGHTS) * 3 * 4 * 4)
    xy = torch.rand(20, 2, generator=g) * 12
    rois = torch.cat([torch.zeros(20, 1), xy, xy + 2 + torch.rand(20, 2, generator=g) * 9], 1)
    grad = torch.randn(20, 6, 3, 4, generator=g).to(dtype)
    xg = x.clone().requires_grad_()
    kernels.roi_align(xg, rois, (3, 4), 0.8, 2, True).backward(grad)
    assert pool_calls[-1] == 2                  # two channel parts of the one image
    assert xg.grad.dtype == dtype
    assert xg.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    xt = x.float().requires_grad_()
    torchvision.ops.roi_align(xt, rois, (3, 4), 0.8, 2, True).backward(grad.float())
    assert torch.equal(xg.grad, xt.grad.to(dtype))
    assert xt.grad.abs().sum() > 0


def test_a_forked_child_gets_a_pool_of_its_own(monkeypatch, two_threads):
    """The pool's threads do not survive a fork: a process whose pid differs from the
    pool's creator's makes a new one instead of queueing work no thread will run."""
    assert _cpu.pool.in_pool(lambda i: i * 2, range(3)) == [0, 2, 4]
    parent = _cpu.pool._pool
    monkeypatch.setattr(_cpu.pool, "_pool", parent)          # both restored after the test
    monkeypatch.setattr(_cpu.pool, "_pool_pid", _cpu.pool._pool_pid)
    monkeypatch.setattr(_cpu.pool.os, "getpid", lambda: -1)
    assert _cpu.pool.in_pool(lambda i: i + 1, range(3)) == [1, 2, 3]
    assert _cpu.pool._pool is not parent and _cpu.pool._pool_pid == -1
    _cpu.pool._pool.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_align_half_types_run_torchvision_on_float32(dtype):
    """Upcast, torchvision's float32 kernel, one rounding: what the references compute."""
    x, rois = _roi_case(torch.float32)
    out, grad = _run_roi_align(x.to(dtype), rois)
    assert last_path["roi_align_forward"] == last_path["roi_align_backward"] == "torchvision"
    assert out.dtype == grad.dtype == dtype
    with reference_path():
        ref_out, ref_grad = _run_roi_align(x.to(dtype), rois)
    assert_close(out, ref_out, **tol(dtype))
    assert_close(grad, ref_grad, **tol(dtype))


@pytest.mark.parametrize("boxes_dtype, scores_dtype, path", [
    (torch.bfloat16, torch.bfloat16, "torchvision"), (torch.float16, torch.float32, "torchvision"),
    (torch.float32, torch.float64, "reference")])   # float64 scores do not fit in float32
def test_nms_half_types_run_torchvision_on_float32(boxes_dtype, scores_dtype, path):
    boxes, scores, _ = _boxes(500, 1)
    boxes, scores = boxes.to(boxes_dtype), scores.to(scores_dtype)
    kept = kernels.nms(boxes, scores, 0.4)
    assert last_path["nms_forward"] == path
    with reference_path():
        assert torch.equal(kept, kernels.nms(boxes, scores, 0.4))


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_unchecked_invalid_rois_never_reach_torchvisions_kernel(sampling_ratio, two_threads):
    """With the data checks skipped (skip_data_checks, a direct custom-op call), RoIs with a
    NaN or a batch index out of range would crash torchvision's kernel (NaN sizes its
    sampling grid: a segfault at sampling ratio 2) or read out of bounds: the CPU path pools
    nothing for them, as the Triton path, forward and backward, and torchvision's result
    for the others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 12, generator=g)
    xy = torch.rand(80, 2, generator=g) * 5
    rois = torch.cat([torch.randint(0, 2, (80, 1), generator=g).float(), xy,
                      xy + 1 + torch.rand(80, 2, generator=g) * 5], 1)
    bad = torch.zeros(80, dtype=torch.bool)
    bad[[3, 40]], bad[7], bad[50] = True, True, True
    rois[3, 1], rois[40, 4], rois[7, 0], rois[50, 0] = float("nan"), float("inf"), 2, -1
    xg = x.clone().requires_grad_()
    with _utils.skip_data_checks():
        out = kernels.roi_align(xg, rois, 7, 1.0, sampling_ratio)
    out.sum().backward()
    assert last_path["roi_align_forward"] == last_path["roi_align_backward"] == "torchvision"
    assert not out[bad].any()
    y = x.clone().requires_grad_()
    expected = torchvision.ops.roi_align(y, rois[~bad], 7, 1.0, sampling_ratio)
    expected.sum().backward()
    assert torch.equal(out[~bad], expected)
    assert torch.equal(xg.grad, y.grad)
    with torch.no_grad(), _utils.skip_data_checks():
        pooled = kernels.MultiScaleRoIAlign(["0"], 7, sampling_ratio)(
            {"0": x}, [rois[rois[:, 0] == i, 1:] for i in range(2)], [(12, 12)] * 2)
    assert torch.isfinite(pooled).all()


def test_multiscale_roi_align_runs_torchvision_per_level():
    x = {"0": torch.randn(2, 4, 32, 32, requires_grad=True),
         "1": torch.randn(2, 4, 16, 16, requires_grad=True)}
    boxes = [torch.tensor([[1.0, 2.0, 60.0, 50.0], [3.0, 3.0, 9.0, 12.0]]),
             torch.tensor([[0.0, 0.0, 120.0, 100.0]])]
    pooler = kernels.MultiScaleRoIAlign(["0", "1"], 3, 2)
    out = pooler(x, boxes, [(128, 128)] * 2)
    out.sum().backward()
    # torchvision's kernels per level, forward and backward: no multi-level backward op,
    # no flat gradient buffer
    assert last_path == {"multiscale_roi_align_forward": "torchvision",
                         "multiscale_roi_align_backward": "torchvision"}
    grads = [v.grad.clone() for v in x.values()]
    for v in x.values():
        v.grad = None
    with reference_path():
        ref = kernels.MultiScaleRoIAlign(["0", "1"], 3, 2)(x, boxes, [(128, 128)] * 2)
        ref.sum().backward()
    assert_close(out, ref, **tol(torch.float32))
    for g, v in zip(grads, x.values()):
        assert_close(g, v.grad, **tol(torch.float32))


@pytest.mark.parametrize("dtype, channels_last", [
    (torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_multiscale_roi_align_with_grad_is_torchvisions_bit_for_bit(
        dtype, channels_last, monkeypatch, two_threads, pool_calls):
    """Training: every level's RoI slices forward, every level's groups of images backward,
    in one pass over the pool each; each part torchvision's kernel, so output and every
    map's gradient are torchvision's MultiScaleRoIAlign's bit for bit (bfloat16: its float32
    result rounded once); a level no RoI maps to gets a zero gradient, as torchvision's."""
    g = torch.Generator().manual_seed(5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = {str(i): torch.randn(3, 6, 64 >> i, 48 >> i, generator=g).to(dtype).contiguous(
        memory_format=layout) for i in range(4)}
    boxes = []
    for n in (17, 0, 25):
        side = torch.exp(torch.empty(n).uniform_(3.0, 6.0, generator=g))    # 20-400 px
        xy = torch.rand(n, 2, generator=g) * 300
        boxes.append(torch.cat([xy, xy + side[:, None] * torch.rand(n, 2, generator=g)], 1))
    shapes = [(256, 192)] * 3
    monkeypatch.setattr(_cpu.roi_align, "PART_SAMPLES",
                        2 * (6 + _cpu.roi_align.SAMPLE_WEIGHTS) * 5 * 4 * 4)
    xg = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = kernels.MultiScaleRoIAlign(list(x), (5, 4), 2)(xg, boxes, shapes)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)
    # several levels' parts, a pass each (after one that copies channels_last maps to NCHW)
    assert len(pool_calls) == 2 + channels_last and min(pool_calls[-2:]) > 4
    xt = {k: v.float().requires_grad_() for k, v in x.items()}
    expected = torchvision.ops.MultiScaleRoIAlign(list(x), (5, 4), 2)(xt, boxes, shapes)
    expected.backward(grad.float())
    assert torch.equal(out, expected.to(dtype))
    assert not xg["3"].grad.any()                   # no RoI maps to level 3
    for k in x:
        assert xg[k].grad.dtype == dtype
        assert torch.equal(xg[k].grad, xt[k].grad.to(dtype)), k


def test_multiscale_roi_align_without_grad_pools_every_level_in_one_pass(
        monkeypatch, two_threads, pool_calls):
    """Inference: every level's RoI slices go to the pool in one pass; each is
    torchvision's roi_align, so the result is torchvision's MultiScaleRoIAlign's, bit for
    bit."""
    g = torch.Generator().manual_seed(0)
    x = {str(i): torch.randn(2, 8, 64 >> i, 48 >> i, generator=g) for i in range(4)}
    boxes = []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=g) * 300
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(40, 2, generator=g) * 250], 1))
    shapes = [(512, 384)] * 2
    # 8 RoIs of these a part
    monkeypatch.setattr(_cpu.roi_align, "PART_SAMPLES",
                        8 * (8 + _cpu.roi_align.SAMPLE_WEIGHTS) * 5 * 4 * 4)
    with torch.no_grad():
        out = kernels.MultiScaleRoIAlign(list(x), (5, 4), 2)(x, boxes, shapes)
    assert len(pool_calls) == 1 and pool_calls[0] > 2     # several levels' slices, one pass
    expected = torchvision.ops.MultiScaleRoIAlign(list(x), (5, 4), 2)(x, boxes, shapes)
    assert torch.equal(out, expected)
    # torch.compile traces the per-level op instead of the pool: one graph, same result
    pooler = torch.compile(kernels.MultiScaleRoIAlign(list(x), (5, 4), 2), fullgraph=True)
    with torch.no_grad():
        assert_close(pooler(x, boxes, shapes), expected)


def _boxes(n, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 60], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("n, classes", [(300, 1), (1300, 1), (900, 40),
                                        (_cpu.suppression.NMS_CHUNK * 9, 3)])
def test_nms_runs_torchvisions_kernel_on_chunks_of_its_score_order(n, classes):
    """Past 2 * NMS_CHUNK boxes in a call, torchvision's kernel runs on chunks of the score
    order, each first cleared of what earlier kept boxes suppress: torchvision's result, the
    reference path's too, and the keep-mask form's."""
    boxes, scores, idxs = _boxes(n, classes)
    kept = kernels.batched_nms(boxes, scores, idxs, 0.4)
    assert last_path["nms_forward"] == "torchvision"
    assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, idxs, 0.4))
    with reference_path():
        assert torch.equal(kept, kernels.batched_nms(boxes, scores, idxs, 0.4))
    if classes == 1:
        assert torch.equal(kernels.nms(boxes, scores, 0.4),
                           torchvision.ops.nms(boxes, scores, 0.4))
    last_path.clear()
    mask = kernels.batched_nms_mask(boxes, scores, idxs, 0.4)
    assert last_path["nms_forward"] == "torchvision"
    assert torch.equal(torch.where(mask)[0], kept.sort().values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iou_over_in_reused_buffers_gives_the_same_bits(dtype):
    """The chunked nms's IoU tests write their temporaries into one IoUWork (a fresh
    process otherwise mapped and faulted in eight pair-sized tensors per chunk): the same
    operations, so the same answer at every pair, ties at the threshold included, across
    calls that grow the buffers past their first capacity."""
    from kernels._boxes import IoUWork, iou_over, iou_rows
    g = torch.Generator().manual_seed(11)
    boxes = ((torch.rand(700, 4, generator=g) * 40).round() * 4).to(dtype)
    boxes[:, 2:] += boxes[:, :2] + 4            # coarse grid: many IoUs exactly equal
    rows, threshold = iou_rows(boxes, 0.5)
    work = IoUWork(dtype, capacity=1000)
    for a, b in ((slice(0, 30), slice(30, 60)), (slice(0, 400), slice(400, 700)),
                 (slice(5, 25), slice(100, 140))):
        x, y = rows[:, a], rows[:, b]
        expected = iou_over(x, x[4], y, y[4], threshold)
        assert torch.equal(iou_over(x, x[4], y, y[4], threshold, work), expected)
        assert expected.any() and not expected.all()
    assert work.capacity >= 400 * 300


@pytest.mark.parametrize("seed", range(8))
def test_chunked_nms_is_torchvisions_with_ties_and_odd_inputs(seed):
    """Scores rounded to a few values and boxes to a coarse grid (ties everywhere), one
    class to 300, negative coordinates and class values (the offset classes may overlap:
    one call over them all), thresholds from -0.5 (everything overlaps) to 0.9, box counts
    around the chunk size and torchvision's 1,000-box switch, float64."""
    n = [_cpu.suppression.NMS_CHUNK * 2 + 1, 999, 1000, 1001, 1777, 700, 2600, 520][seed]
    boxes, scores, idxs = _boxes(n, [1, 2, 80, 300, 5, 40, 1, 7][seed], seed)
    boxes, scores = (boxes / 16).round() * 16, (scores * 4).round() / 4
    if seed % 3 == 1:
        boxes -= 200
    if seed % 4 == 2:
        idxs = idxs * 1000 - 7
    if seed == 7:                   # float64: IoU in float64, the threshold as given
        boxes, scores = boxes.double(), scores.double()
    threshold = [0.3, 0.5, 0.7, 0.0, -0.5, 0.9, 0.5, 0.45][seed]
    assert torch.equal(kernels.nms(boxes, scores, threshold),
                       torchvision.ops.nms(boxes, scores, threshold))
    assert torch.equal(kernels.batched_nms(boxes, scores, idxs, threshold),
                       torchvision.ops.batched_nms(boxes, scores, idxs, threshold))
    assert last_path["nms_forward"] == "torchvision"


def test_batched_nms_offset_classes_run_in_runs_of_whole_classes(monkeypatch):
    """Up to 1,000 boxes torchvision offsets the classes apart and calls nms once; ours
    calls it once per run of whole classes of about NMS_CHUNK boxes (less O(N x kept)
    work), the same result."""
    boxes, scores, idxs = _boxes(1000, 80, 3)
    calls = []
    real = torch.ops.torchvision.nms
    monkeypatch.setattr(_cpu.suppression, "_chunked_nms",
                        lambda b, s, t: (calls.append(len(b)), real(b, s, t))[1])
    kept = kernels.batched_nms(boxes, scores, idxs, 0.5)
    assert (len(calls) >= 3 and sum(calls) == 1000
            and max(calls) < 2 * _cpu.suppression.NMS_CHUNK)
    assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_runs_torchvisions_per_class_calls_in_threads(seed, monkeypatch, two_threads):
    """Past 4,000 coordinates torchvision's batched_nms runs one nms per class; ours runs
    the same calls from the thread pool: the same result, ties included (scores rounded to
    a few values, boxes to whole pixels, classes from 2 to 90)."""
    g = torch.Generator().manual_seed(seed)
    n = 1001 + 400 * seed
    boxes, scores, idxs = _boxes(n, [2, 3, 7, 20, 90, 5][seed], seed)
    if seed % 2:
        boxes, scores = boxes.round(), (scores * 4).round() / 4
    else:
        scores = scores.to(torch.bfloat16).float()
    idxs = idxs[torch.randperm(n, generator=g)]
    monkeypatch.setattr(_cpu.suppression, "PADDED_NMS_LARGEST", 0)  # (small classes: one pass)
    groups = []
    spy_pool(monkeypatch, lambda real: lambda fn, items: (groups.append(list(items)),
                                                          real(fn, items))[1])
    kept = kernels.batched_nms(boxes, scores, idxs, [0.3, 0.5, 0.7][seed % 3])
    assert last_path["nms_forward"] == "torchvision"
    assert len(groups) == 1 and sorted(c for grp in groups[0] for c in grp) == list(
        range(int(idxs.unique().numel())))
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, [0.3, 0.5, 0.7][seed % 3])
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_takes_many_small_classes_in_one_padded_pass(seed, monkeypatch):
    """Past 4,000 coordinates, classes of at most PADDED_NMS_LARGEST boxes go through one
    pass (padded (C, P, P) IoUs, the greedy rule solved for every class at once):
    torchvision's per-class result and order, ties included (scores rounded to a few
    values, boxes to whole pixels), thresholds from -0.5 to 0.9, float64, class values
    negative and sparse, classes of one box."""
    n = [1100, 2600, 5000, 1500, 3001, 1200][seed]
    boxes, scores, idxs = _boxes(n, [30, 90, 80, 700, 60, 20][seed], seed)
    if seed % 2:
        boxes, scores = boxes.round(), (scores * 4).round() / 4
    if seed == 3:
        idxs = idxs * 7 - 2000
    if seed == 5:
        boxes, scores = boxes.double(), scores.double()
    threshold = [0.5, 0.3, 0.7, 0.0, -0.5, 0.9][seed]
    sizes = []
    real = _cpu.suppression._padded_nms
    monkeypatch.setattr(_cpu.suppression, "_padded_nms",
                        lambda *a: (sizes.append(a[3]), real(*a))[1])
    kept = kernels.batched_nms(boxes, scores, idxs, threshold)
    assert len(sizes) == 1 and max(sizes[0]) <= _cpu.suppression.PADDED_NMS_LARGEST
    assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, idxs, threshold))


def test_padded_nms_follows_chains_of_suppression():
    """A suppresses B, B would suppress C but A does not: C is kept, as torchvision keeps
    it (the first round of the padded pass drops C; the rounds go on until the kept set
    reproduces itself)."""
    chain = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10], [6, 0, 16, 10]])
    boxes = torch.cat([chain, chain + 100, chain[:1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.4, 0.3, 0.2])
    box_class = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    kept = _cpu.suppression._padded_nms(boxes, scores, box_class, [4, 4, 1], 0.5)
    expected = torch.cat([torch.where(box_class == c)[0][torchvision.ops.nms(
        boxes[box_class == c], scores[box_class == c], 0.5)] for c in range(3)])
    assert torch.equal(kept.sort().values, expected.sort().values)
    assert 2 in kept.tolist()


def _mask_case(dtype):
    logits = torch.randn(6, 4, 7, 7).to(dtype)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    gt = [torch.rand(3, 40, 50) > 0.5, (torch.rand(2, 30, 20) > 0.5).to(torch.uint8)]
    proposals = [torch.tensor([[1.0, 2.0, 30.0, 35.0], [0.0, 0.0, 49.0, 39.0],
                               [10.0, 5.0, 12.0, 9.0], [20.0, 20.0, 45.0, 38.0]]),
                 torch.tensor([[0.0, 0.0, 19.0, 29.0], [3.0, 4.0, 15.0, 25.0]])]
    matched = [torch.tensor([0, 2, 1, 0]), torch.tensor([1, 0])]
    gt_labels = [torch.tensor([0, 3, 1]), torch.tensor([2, 1])]
    return logits, labels, (proposals, gt, gt_labels, matched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_losses_run_torchs_bce_and_autograd_with_the_references_result(dtype):
    logits, labels, inst = _mask_case(dtype)
    targets = torch.rand(6, 7, 7)
    results = {}
    for forced in (False, True):
        with reference_path() if forced else torch.enable_grad():
            x = logits.clone().requires_grad_()
            loss = kernels.mask_loss(x, targets, labels)
            loss.backward()
            y = logits.clone().requires_grad_()
            loss2 = kernels.maskrcnn_loss(y, *inst)
            loss2.backward()
            results[forced] = (loss, x.grad, loss2, y.grad)
            if not forced:
                assert last_path["mask_loss_forward"] == "torch"
                assert last_path["maskrcnn_loss_forward"] == "torch"
    for a, b in zip(results[False], results[True]):
        assert_close(a, b, **tol(dtype))


def test_mask_targets_by_chunks_of_masks_are_torchvisions(monkeypatch, two_threads,
                                                          pool_calls):
    """Mask targets from chunks of each image's masks (here two masks a chunk), sampled in
    the pool: torchvision's roi_align of the whole masks, bit for bit; maskrcnn_loss on them
    (each chunk's loss terms in its thread) is torchvision's maskrcnn_loss, value and
    gradient; a mask index out of range (data checks skipped) gets zero targets."""
    g = torch.Generator().manual_seed(3)
    monkeypatch.setattr(_cpu.losses, "TARGET_CHUNK_PIXELS", 2 * 40 * 50)
    gt = [torch.rand(7, 40, 50, generator=g) > 0.5,
          (torch.rand(5, 30, 20, generator=g) > 0.5).to(torch.uint8)]
    proposals, matched = [], []
    for masks, n in zip(gt, (23, 17)):
        h, w = masks.shape[1:]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.1 - 2
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh[::6] = 0.4                               # thinner than a pixel
        proposals.append(torch.cat([xy, xy + wh], 1))
        matched.append(torch.randint(0, masks.shape[0], (n,), generator=g))
    labels = [torch.randint(0, 3, (m.shape[0],), generator=g) for m in gt]
    rois = kernels._boxes.sampled_rois(proposals, matched)
    targets = _cpu.losses.mask_targets(rois, gt, [23, 17], 14, torch.float32)
    assert pool_calls == [4 + 1]     # 7 masks of 40x50 two a chunk; 5 of 30x20 fit in one
    expected = torch.cat([torchvision.ops.roi_align(
        m[:, None].float(), torch.cat([i[:, None].float(), p], 1), 14, 1.0)[:, 0]
        for m, p, i in zip(gt, proposals, matched)])
    assert torch.equal(targets, expected)

    logits = torch.randn(40, 3, 14, 14, generator=g)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = kernels.maskrcnn_loss(x, proposals, gt, labels, matched)
    loss.backward()
    ref = tv_maskrcnn_loss(y, proposals, gt, labels, matched)
    ref.backward()
    assert_close(loss, ref)
    assert_close(x.grad, y.grad)

    bad = rois.clone()
    bad[[4, 30], 0] = torch.tensor([9.0, -1.0])   # no such masks
    with _utils.skip_data_checks():
        targets = _cpu.losses.mask_targets(bad, gt, [23, 17], 14, torch.float32)
    assert not targets[[4, 30]].any()
    keep = torch.ones(40, dtype=torch.bool)
    keep[[4, 30]] = False
    assert torch.equal(targets[keep], expected[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_loss_gradients_are_pytorchs(dtype, two_threads):
    """The (N, K, M, M) gradient, zero but each row's class plane, written from the
    forward's saved d loss / d logit: PyTorch's BCE gradient / torchvision's maskrcnn_loss
    gradient, the same zeros."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(11, 6, 7, 7, generator=g) * 3).to(dtype)
    targets, labels = torch.rand(11, 7, 7, generator=g), torch.randint(0, 6, (11,), generator=g)
    x, y = logits.clone().requires_grad_(), logits.float().clone().requires_grad_()
    kernels.mask_loss(x, targets, labels).mul(2.5).backward()
    assert x.grad.dtype == dtype
    torch.nn.functional.binary_cross_entropy_with_logits(
        y[torch.arange(11), labels], targets).mul(2.5).backward()
    assert_close(x.grad, y.grad.to(dtype), **tol(dtype))
    assert torch.equal(x.grad != 0, y.grad != 0)

    masks = [torch.rand(3, 30, 40, generator=g) > 0.5]
    xy = torch.rand(11, 2, generator=g) * 20
    proposals = [torch.cat([xy, xy + 3 + torch.rand(11, 2, generator=g) * 15], 1)]
    matched = [torch.randint(0, 3, (11,), generator=g)]
    gt_labels = [torch.randint(0, 6, (3,), generator=g)]
    x, y = logits.clone().requires_grad_(), logits.float().clone().requires_grad_()
    kernels.maskrcnn_loss(x, proposals, masks, gt_labels, matched).mul(2.5).backward()
    assert x.grad.dtype == dtype
    tv_maskrcnn_loss(y, proposals, masks, gt_labels, matched).mul(2.5).backward()
    assert_close(x.grad, y.grad.to(dtype), **tol(dtype))
    assert torch.equal(x.grad != 0, y.grad != 0)


@pytest.mark.parametrize("scale", [1e-3, 30.0, 1e4])
def test_mask_loss_formula_holds_for_tiny_and_huge_logits(scale):
    """The CPU path's BCE terms (vectorized sigmoid and log) against PyTorch's own BCE in
    float64, where log(sigmoid(|x|)) rounds to 0 or sits near log(1/2)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, 6, 6, generator=g) * scale
    targets = torch.rand(5, 6, 6, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    x = logits.clone().requires_grad_()
    loss = kernels.mask_loss(x, targets, labels)
    loss.backward()
    assert last_path["mask_loss_forward"] == "torch"
    y = logits.double().requires_grad_()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        y[torch.arange(5), labels], targets.double())
    expected.backward()
    assert_close(loss.double(), expected, rtol=2e-6, atol=1e-7)
    assert_close(x.grad.double(), y.grad, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_predictor_losses_run_in_instance_chunks_with_the_references_result(
        dtype, channels_last, monkeypatch):
    """The fused predictor losses on the CPU: the reference's products on chunks of
    instances (here 2 and a remainder of 1, through a reused buffer for half types), the
    same loss and gradients as the reference, in the features' layout."""
    _, labels, inst = _mask_case(dtype)
    monkeypatch.setattr(_cpu.losses, "PREDICTOR_CHUNK_BYTES", 2 * 5 * 7 * 7 * 4)
    features = torch.randn(6, 5, 7, 7).to(dtype)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 5, 1, 1).to(dtype), torch.randn(4).to(dtype)
    targets = torch.rand(6, 7, 7)
    results = {}
    for forced in (False, True):
        with reference_path() if forced else torch.enable_grad():
            leaves = [t.clone().requires_grad_() for t in (features, weight, bias)]
            loss = kernels.mask_predictor_loss(*leaves, targets, labels)
            loss2 = kernels.maskrcnn_predictor_loss(*leaves, *inst)
            grads = torch.autograd.grad(loss * 2.5 + loss2 * 0.5, leaves)  # (not 1: scaled)
            results[forced] = (loss, loss2, *grads)
            if not forced:
                assert last_path["mask_predictor_loss_forward"] == "torch"
                assert last_path["maskrcnn_predictor_loss_forward"] == "torch"
                assert last_path["mask_predictor_loss_backward"] == "torch"
                assert grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for a, b in zip(results[False], results[True]):
        assert a.dtype == b.dtype
        assert_close(a, b, **tol(dtype))
