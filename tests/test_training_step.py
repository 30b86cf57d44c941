"""The training step without host syncs: counted on the CPU (every read of tensor data and
every operation that syncs on CUDA, on the Triton path with its launches dry), on the meta
device (no values at all), as one graph under ``torch.compile(fullgraph=True)`` on CPU
tensors and on the Triton path, and the fixed-size sampler's draws against torchvision's
sampler: the same counts every time, each candidate equally likely.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

import maskrcnn
from benchmarks.graph_breaks import SETTINGS
from benchmarks.graph_breaks import inputs as batch
from benchmarks.host import _dry, count_host_work
from kernels import _utils
from maskrcnn.fixed_size import BalancedSampler, pad_targets
from test_compile_model import COVERING, _HostTraffic, graph_breaks

pytestmark = pytest.mark.usefixtures("one_thread")


def model(**kw):
    torch.manual_seed(0)
    return maskrcnn.maskrcnn_resnet18_fpn(fpn_channels=16, **{**SETTINGS, **kw})


@pytest.fixture
def quiet_dynamo():
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    yield
    torch._logging.set_logs()
    torch._dynamo.reset()


def test_training_step_syncs_never_and_inference_once():
    """On CPU tensors standing for CUDA ones, the Triton path with its launches observed,
    not run (nothing computed: only the host's work is counted): a read of tensor data or
    an operation that sizes its output from data is a sync."""
    train, static = model().train(), model(static_shapes=True).eval()
    images, targets = batch()
    with _dry():
        def step():
            losses = train(images, targets)
            sum(losses.values()).backward()
        step()                       # warm-up: the anchor cache
        with count_host_work() as work:
            step()
        assert work.syncs == []
        with torch.no_grad():
            train.eval()(images)
            with count_host_work() as work:
                train(images)
            assert work.syncs == ["Tensor.tolist"]     # the detection counts, once
            static(images)
            with count_host_work() as work:
                static(images)
            assert work.syncs == []


def test_training_step_reads_no_value_and_copies_nothing_on_the_meta_device():
    # the meta device has no values: a read raises, a host <-> device copy is recorded
    train = model().train()
    images, targets = batch()
    with _utils.reference_path():
        train(images, targets)       # the anchor cache
    train.to("meta")
    images = [im.to("meta") for im in images]
    targets = [{k: v.to("meta") for k, v in t.items()} for t in targets]
    train(images, targets)           # the cached anchors move to the device once
    traffic = _HostTraffic()
    with traffic:
        losses = train(images, targets)
        sum(losses.values()).backward()
    assert traffic.copies == []
    assert all(v.is_meta and v.shape == () for v in losses.values())
    # the CUDA-graph step's own work too: padding, clipping, the foreach SGD update
    from maskrcnn.graphed import GraphedStep
    step = GraphedStep(train, torch.optim.SGD(train.parameters(), lr=0.1, momentum=0.9,
                                              weight_decay=1e-4), 1.0, "meta", capture=False)
    with traffic:
        step.lr = 0.05
        losses = step(images, targets)
    assert traffic.copies == []
    assert losses["loss"].is_meta


def test_training_step_is_one_graph(quiet_dynamo, monkeypatch):
    images, targets = batch()
    with _utils.reference_path():
        assert graph_breaks(model().train(), images, targets) == 0
    monkeypatch.setattr(_utils, "INTERPRET", False)     # the CPU path
    assert graph_breaks(model().train(), images, targets) == 0


def _eager_and_compiled(net, images, targets):
    """One step's losses and gradients, eager then compiled whole (aot_eager: the graph
    as dynamo and AOTAutograd capture it, run by PyTorch's own kernels)."""
    results = []
    for fn in (net, torch.compile(net, fullgraph=True, backend="aot_eager")):
        net.zero_grad()
        losses = fn(images, targets)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    return results


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_fullgraph_training_step_equals_eager(path, quiet_dynamo, monkeypatch):
    # budgets above the candidate counts: every candidate is drawn, so the compiled graph's
    # random draws (ordered as it likes) cannot change the losses
    if path == "cpu":
        monkeypatch.setattr(_utils, "INTERPRET", False)
        net, images, targets = model(**COVERING).train(), *batch()
    else:
        if not _utils.INTERPRET:
            pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
        # the interpreter pays per program: one image, fewer proposals (the image keeps
        # its size: a resize, decomposed by AOTAutograd, rounds otherwise than eager's)
        net = model(**{**COVERING, "rpn_post_nms_top_n_train": 6}).train()
        images, targets = (x[:1] for x in batch())
    (eager, eager_grads), (compiled, compiled_grads) = _eager_and_compiled(net, images, targets)
    used = _utils.last_path
    assert used.get("multiscale_roi_align_backward") == (
        "triton" if path == "triton" else "torchvision"), used
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert_close(compiled[k], eager[k], msg=k)
    assert len(eager_grads) == len(compiled_grads) > 0
    for e, c in zip(eager_grads, compiled_grads):
        assert_close(c, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The sampler: torchvision's counts, uniform draws

LABELS = torch.tensor([1] * 6 + [0] * 20 + [-1] * 4 + [2] * 2)   # 8 positives, 4 ignored


@pytest.mark.parametrize("size,fraction", [(8, 0.25), (16, 0.75), (64, 0.5)])
def test_sampler_draws_torchvisions_counts_every_time(size, fraction):
    ours = BalancedSampler(size, fraction)
    theirs = BalancedPositiveNegativeSampler(size, fraction)
    labels = LABELS[torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(size))]
    expected = [m[0] for m in theirs([labels])]
    for seed in range(50):
        torch.manual_seed(seed)
        pos, neg = (m[0] for m in ours([labels]))
        assert int(pos.sum()) == int(expected[0].sum())
        assert int(neg.sum()) == int(expected[1].sum())
        assert bool((labels[pos] >= 1).all()) and bool((labels[neg] == 0).all())


def test_sampler_draws_each_candidate_equally_often():
    # 2 of 8 positives and 6 of 20 negatives per draw: over n draws each candidate's count
    # is Binomial(n, 1/4) or Binomial(n, 3/10); every count within 5 standard deviations,
    # and the counts together pass a chi-square test of uniformity (p > 1e-4)
    ours, draws = BalancedSampler(8, 0.25), 3000
    counts = torch.zeros(len(LABELS))
    for seed in range(draws):
        torch.manual_seed(seed)
        pos, neg = (m[0] for m in ours([LABELS]))
        counts += pos.float() + neg.float()
    assert not counts[LABELS == -1].any()
    for picked, group in ((2, LABELS >= 1), (6, LABELS == 0)):
        p = picked / int(group.sum())
        mean, std = draws * p, math.sqrt(draws * p * (1 - p))
        assert float((counts[group] - mean).abs().max()) < 5 * std, counts[group]
        chi2 = float(((counts[group] - mean) ** 2 / mean).sum())
        dof = int(group.sum()) - 1
        # Wilson-Hilferty: the chi-square quantile for p = 1e-4 (z = 3.72)
        limit = dof * (1 - 2 / (9 * dof) + 3.72 * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2 < limit, (chi2, limit)


# ---------------------------------------------------------------------------------------
# Padded targets and the graphed step (its body on the CPU; capture and replay on CUDA)

def _padded_and_plain_steps(targets, rows):
    """Losses and gradients of one step on ``targets`` and on them padded to ``rows``."""
    results = []
    images = batch()[0]
    for padded in (False, True):
        net = model(**COVERING).train()
        ts = pad_targets(targets, rows) if padded else targets
        losses = net(images, ts)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        [p.grad for p in net.parameters() if p.grad is not None]))
    return results


@pytest.mark.parametrize("empty", [False, True])
def test_padded_targets_train_as_the_unpadded_ones(empty):
    # with budgets covering every candidate, the same rows are sampled whatever the tensor
    # sizes: padding rows must be matched by nothing and never join the proposals
    _, targets = batch()
    if empty:   # an image without objects: every row of its padded targets is padding
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                      "masks": torch.zeros(0, *targets[1]["masks"].shape[1:], dtype=torch.uint8)}
    padded = pad_targets(targets, 8)
    assert padded[0]["boxes"].shape == (8, 4) and int(padded[0]["valid"].sum()) == 1
    with _utils.reference_path():
        (plain, plain_grads), (pad, pad_grads) = _padded_and_plain_steps(targets, 8)
    for k in plain:
        assert_close(pad[k], plain[k], msg=k)
    assert len(plain_grads) == len(pad_grads) > 0
    for p, q in zip(pad_grads, plain_grads):
        assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_padded_targets_are_checked():
    _, targets = batch()
    net = model().train()
    bad = pad_targets(targets, 8)
    bad[0]["valid"] = bad[0]["valid"].to(torch.uint8)
    with pytest.raises(ValueError, match=r"targets\[0\]\['valid'\]"):
        net(batch()[0], bad)
    # a degenerate box among the real rows is still refused; the padding rows are not
    bad = pad_targets(targets, 8)
    bad[1]["boxes"][0, 2] = bad[1]["boxes"][0, 0]
    with pytest.raises(ValueError, match="non-positive size"):
        net(batch()[0], bad)
    with pytest.raises(ValueError, match="more than the 1 padded rows"):
        pad_targets([{**targets[0], "boxes": torch.rand(2, 4), "labels": torch.ones(2)}], 1)


def test_graphed_steps_body_equals_the_engine_step():
    """GraphedStep without capture: its padding, clipping and foreach SGD update equal
    engine._step's (torch.optim.SGD), step by step: three steps (momentum, a new learning
    rate) in lockstep, each from the same weights and momentum (the eager side's are copied
    over after each comparison: rounding differences would otherwise grow step by step)."""
    from maskrcnn import engine
    from maskrcnn.graphed import GraphedStep
    images, targets = batch()
    sides = []
    for _ in range(2):
        net = model(**COVERING).train()
        params = [p for p in net.parameters() if p.requires_grad]
        sides.append((net, params, torch.optim.SGD(params, lr=0.02, momentum=0.9,
                                                   weight_decay=1e-4)))
    (net, params, opt), (g_net, g_params, g_opt) = sides
    step = GraphedStep(g_net, g_opt, 1.0, "cpu", capture=False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    start = [p.detach().clone() for p in params]
    with _utils.reference_path():
        for i, lr in enumerate((0.02, 0.01, 0.005)):
            for group in opt.param_groups:
                group["lr"] = lr
            expected = engine._step(net, opt, scaler, params, images, targets,
                                    torch.device("cpu"), False, 1.0, i)
            step.lr = lr
            got = engine._read_losses(step(images, targets), i)
            assert got.keys() == expected.keys()
            for k in expected:
                assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), (i, k)
            bufs = [opt.state[p]["momentum_buffer"] for p in params]
            g_bufs = [g_opt.state[p]["momentum_buffer"] for p in g_params]
            for e, g in zip(params + bufs, g_params + g_bufs):
                assert_close(g.detach(), e.detach(), rtol=1e-5, atol=1e-7)
            with torch.no_grad():
                for e, g in zip(params + bufs, g_params + g_bufs):
                    g.copy_(e)
    assert g_opt.param_groups[0]["lr"] == 0.005
    assert any(not torch.equal(p.detach(), q) for p, q in zip(params, start))


def test_graph_targets_have_sizes_fixed_by_the_row_bucket():
    from maskrcnn.graphed import graph_targets, padded_rows

    def target(n):
        return {"boxes": torch.rand(n, 4) + torch.tensor([0, 0, 2, 2]),
                "labels": torch.ones(n, dtype=torch.int64),
                "masks": torch.zeros(n, 6, 7, dtype=torch.uint8), "area": torch.rand(n),
                "iscrowd": torch.zeros(n, dtype=torch.int64), "image_id": torch.tensor(3)}

    def shapes(ts):
        return [{k: tuple(v.shape) for k, v in t.items()} for t in ts]

    assert [padded_rows([target(n)]) for n in (0, 1, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 32]
    three, five = graph_targets([target(3), target(1)]), graph_targets([target(5), target(0)])
    assert shapes(three) == shapes(five) == [{"boxes": (8, 4), "labels": (8,),
                                             "masks": (8, 6, 7), "valid": (8,)}] * 2
    assert three[0]["valid"].tolist() == [True] * 3 + [False] * 5


def test_graphed_step_refuses_what_it_cannot_graph():
    from maskrcnn.graphed import GraphedStep
    net = model()
    with pytest.raises(TypeError, match="optimizer must be torch.optim.SGD"):
        GraphedStep(net, torch.optim.Adam(net.parameters()), 1.0, "cpu", capture=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphedStep(net, torch.optim.SGD(net.parameters(), lr=0.1), 1.0, "cpu", capture=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_step_never_syncs_and_replays_the_eager_step(monkeypatch):
    from maskrcnn.graphed import GraphedStep
    monkeypatch.setattr(_utils, "_force_reference", False)   # the Triton kernels
    images = [im.cuda() for im in batch()[0]]
    targets = [{k: v.cuda() for k, v in t.items()} for t in batch()[1]]
    runs = []
    for capture in (False, True):
        net = model(**COVERING).cuda().train()
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        step = GraphedStep(net, opt, 1.0, "cuda", capture=capture)
        # a capture, then its first replay (a graph's outputs are rewritten by each replay)
        losses = [{k: v.clone() for k, v in step(images, targets).items()}]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for lr in (0.01, 0.005):
                step.lr = lr
                losses.append({k: v.clone() for k, v in step(images, targets).items()})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append((losses, [p.detach().clone() for p in net.parameters()]))
        if capture:
            assert len(step.graphs) == 1 and step.eager_steps == 0
    (eager, eager_params), (graphed, graphed_params) = runs
    for e, g in zip(eager, graphed):
        for k in e:
            assert_close(g[k], e[k], rtol=1e-4, atol=1e-6, msg=k)
    for e, g in zip(eager_params, graphed_params):
        assert_close(g, e, rtol=1e-4, atol=1e-5)
