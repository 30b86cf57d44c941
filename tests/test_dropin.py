"""Drop-in for torchvision.ops: what torchvision accepts is accepted with its result, what it
rejects raises an error that handlers for torchvision's class and for ValueError/TypeError
both catch, and the ops trace with torch.fx as torchvision's do. torchvision itself is the
oracle: every expectation here is computed by calling it."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.feature_extraction import create_feature_extractor

import kernels


def _x():
    return torch.randn(2, 3, 8, 8)


def _rois():
    return torch.tensor([[0.0, 0.5, 0.5, 6.0, 7.0], [1.0, 1.0, 0.0, 4.0, 3.0]])


def _nms_in(n=3):
    xy = torch.rand(n, 2) * 10
    return torch.cat([xy, xy + 4], 1), torch.rand(n)


# (name, call with the ops module `o`): each fails in torchvision
BAD = [
    ("roi_align boxes (K, 4)", lambda o: o.roi_align(_x(), torch.zeros(3, 4), 2)),
    ("roi_align boxes 1-D", lambda o: o.roi_align(_x(), torch.zeros(5), 2)),
    ("roi_align boxes list of (L, 5)", lambda o: o.roi_align(_x(), [torch.zeros(3, 5)] * 2, 2)),
    ("roi_align boxes None", lambda o: o.roi_align(_x(), None, 2)),
    ("roi_align boxes int", lambda o: o.roi_align(_x(), _rois().long(), 2)),
    ("roi_align input int", lambda o: o.roi_align(_x().long(), _rois(), 2)),
    ("roi_align input 3-D", lambda o: o.roi_align(_x()[0], _rois(), 2)),
    ("roi_align input None", lambda o: o.roi_align(None, _rois(), 2)),
    ("roi_align sampling_ratio float", lambda o: o.roi_align(_x(), _rois(), 2, 1.0, 1.5)),
    ("RoIAlign boxes (K, 4)", lambda o: o.RoIAlign(2, 1.0, 2)(_x(), torch.zeros(3, 4))),
    ("nms boxes 1-D empty", lambda o: o.nms(torch.empty(0), torch.empty(0), 0.5)),
    ("nms boxes (N, 5)", lambda o: o.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)),
    ("nms scores of another length", lambda o: o.nms(*_nms_in()[:1], torch.zeros(2), 0.5)),
    ("nms scores 2-D", lambda o: o.nms(_nms_in()[0], torch.zeros(3, 1), 0.5)),
    ("nms boxes int", lambda o: o.nms(_nms_in()[0].long(), torch.zeros(3), 0.5)),
    ("nms scores int", lambda o: o.nms(_nms_in()[0], torch.zeros(3, dtype=torch.long), 0.5)),
    ("nms boxes None", lambda o: o.nms(None, torch.zeros(3), 0.5)),
    ("nms threshold None", lambda o: o.nms(*_nms_in(), None)),
    ("nms threshold str", lambda o: o.nms(*_nms_in(), "0.5")),
    ("batched_nms idxs None", lambda o: o.batched_nms(*_nms_in(), None, 0.5)),
    ("batched_nms idxs of another length",
     lambda o: o.batched_nms(*_nms_in(), torch.zeros(2, dtype=torch.long), 0.5)),
    ("batched_nms boxes (N, 5)",
     lambda o: o.batched_nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3).long(), 0.5)),
    ("MultiScaleRoIAlign boxes as a tensor",
     lambda o: o.MultiScaleRoIAlign(["0"], 2, 2)({"0": _x()}, torch.zeros(1, 4),
                                                 [(32, 32)] * 2)),
    ("MultiScaleRoIAlign boxes (L, 5)",
     lambda o: o.MultiScaleRoIAlign(["0"], 2, 2)({"0": _x()}, [torch.zeros(1, 5)] * 2,
                                                 [(32, 32)] * 2)),
    ("MultiScaleRoIAlign x a list",
     lambda o: o.MultiScaleRoIAlign(["0"], 2, 2)([_x()], [torch.zeros(1, 4)] * 2,
                                                 [(32, 32)] * 2)),
]


@pytest.mark.parametrize("name, call", BAD, ids=[b[0] for b in BAD])
def test_errors_are_also_torchvision_classes(name, call):
    with pytest.raises(Exception) as theirs:
        call(torchvision.ops)
    with pytest.raises((ValueError, TypeError)) as ours:
        call(kernels)
    assert isinstance(ours.value, type(theirs.value)), (
        f"{name}: ours {type(ours.value).__mro__}, torchvision {type(theirs.value)}")


def test_batched_nms_of_empty_boxes_of_any_shape():
    for boxes in (torch.empty(0), torch.empty(0, 4), torch.empty(0, 7, 3)):
        theirs = torchvision.ops.batched_nms(boxes, None, None, None)
        ours = kernels.batched_nms(boxes, None, None, None)
        assert ours.dtype == theirs.dtype == torch.int64 and ours.shape == theirs.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_batched_nms_takes_idxs_of_any_real_dtype(backend, dtype):
    boxes, scores = _nms_in(40)
    idxs = torch.randint(0, 2, (40,)).to(dtype)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.3)
    dev = backend.device
    ours = kernels.batched_nms(boxes.to(dev), scores.to(dev), idxs.to(dev), 0.3)
    assert torch.equal(ours.cpu(), expected)


def test_nms_nan_threshold_suppresses_nothing_as_torchvision(backend):
    boxes, scores = _nms_in(30)
    expected = torchvision.ops.nms(boxes, scores, float("nan"))
    ours = kernels.nms(boxes.to(backend.device), scores.to(backend.device), float("nan"))
    assert torch.equal(ours.cpu(), expected) and len(expected) == 30


def test_roi_align_output_size_zero_is_empty_as_torchvision(backend):
    x = _x().requires_grad_()
    expected = torchvision.ops.roi_align(x, _rois(), 0)
    ours = kernels.roi_align(x.detach().to(backend.device).requires_grad_(),
                             _rois().to(backend.device), 0)
    assert ours.shape == expected.shape == (2, 3, 0, 0)
    ours.sum().backward()


def test_quantized_inputs_run_torchvisions_quantized_kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # quantized tensors are deprecated in PyTorch
        x = torch.quantize_per_tensor(torch.rand(1, 3, 8, 8), 0.05, 0, torch.quint8)
        rois = torch.quantize_per_tensor(torch.tensor([[0.0, 0.0, 0.0, 6.0, 6.0]]), 0.125, 0,
                                         torch.quint8)
        boxes = torch.quantize_per_tensor(torch.tensor([[0.0, 0.0, 4.0, 4.0],
                                                        [1.0, 1.0, 5.0, 5.0]]), 0.25, 0,
                                          torch.quint8)
        scores = torch.quantize_per_tensor(torch.tensor([0.9, 0.8]), 0.01, 0, torch.quint8)
        assert torch.equal(kernels.roi_align(x, rois, 2).int_repr(),
                           torchvision.ops.roi_align(x, rois, 2).int_repr())
        assert torch.equal(kernels.nms(boxes, scores, 0.3),
                           torchvision.ops.nms(boxes, scores, 0.3))


class _Pool(torch.nn.Module):
    def __init__(self, pooler):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pooler

    def forward(self, x, rois):
        return self.pool(self.conv(x), rois).flatten(1)


class _Functional(torch.nn.Module):
    def forward(self, x, rois):
        return kernels.roi_align(x, rois, (2, 3), 0.5, 2, True) * 2


def _roi_nodes(gm) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "roi_align"]


@pytest.mark.parametrize("make", [lambda: _Pool(kernels.RoIAlign(2, 1.0, 2)), _Functional],
                         ids=["RoIAlign", "roi_align"])
def test_roi_align_is_an_fx_leaf(backend, make):
    model = make().to(backend.device)
    gm = torch.fx.symbolic_trace(model)
    assert len(_roi_nodes(gm)) == 1, gm.graph
    x, rois = _x().to(backend.device), _rois().to(backend.device)
    assert_close(gm(x, rois), model(x, rois))


def test_create_feature_extractor_through_roi_align(backend):
    model = _Pool(kernels.RoIAlign(2, 1.0, 2)).to(backend.device)
    extractor = create_feature_extractor(model, {"pool": "pooled", "conv": "features"})
    x, rois = _x().to(backend.device), _rois().to(backend.device)
    out = extractor(x, rois)
    assert_close(out["pooled"], kernels.roi_align(model.conv(x), rois, 2, 1.0, 2))


def test_torchvision_roi_align_traces_to_ours_under_the_patch(backend):
    model = _Pool(torchvision.ops.RoIAlign(2, 1.0, 2)).to(backend.device)
    x, rois = _x().to(backend.device), _rois().to(backend.device)
    with kernels.patch_torchvision():
        gm = torch.fx.symbolic_trace(model)
        targets = [n.target for n in _roi_nodes(gm)]
        assert targets == [kernels.roi_align], targets
        assert_close(gm(x, rois), model(x, rois))
        extractor = create_feature_extractor(model, {"pool": "pooled"})
        assert_close(extractor(x, rois)["pooled"], model.pool(model.conv(x), rois))


def test_data_checks_live_in_the_wrappers_and_sync_once(monkeypatch):
    """The custom ops run no data check (so a compiled graph has none at run time); the
    public function reads the values once."""
    bad = _rois()
    bad[0, 1] = float("nan")
    torch.ops.maskrcnn_triton.roi_align(_x(), bad, 1.0, 2, 2, -1, False)   # no check
    with pytest.raises(ValueError, match="finite"):
        kernels.roi_align(_x(), bad, 2)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("item() in a check"))
    kernels.roi_align(_x(), _rois(), 2)
    assert len(reads) == 1


def test_torchscript_compiles_ours_as_it_compiles_torchvisions():
    """torch.jit.script of our roi_align, nms and batched_nms — directly, and inside a
    torchvision module scripted under patch_torchvision() — compiles their scripted twins
    (torchvision's argument forms, then our custom op): torchvision's results and
    gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch.jit.script is deprecated in PyTorch
        x = torch.rand(2, 3, 10, 10, dtype=torch.float64, requires_grad=True)
        rois = torch.tensor([[0, 0, 0, 9, 9], [1, 0, 5, 4, 9.0]], dtype=torch.float64)
        scripted = torch.jit.script(kernels.roi_align)
        assert_close(scripted(x, rois, 5), torchvision.ops.roi_align(x, rois, 5))
        assert torch.autograd.gradcheck(lambda z: scripted(z, rois, 2, 1.0, 1), (x,))
        boxes, scores = _nms_in(60)
        idxs = torch.randint(0, 3, (60,))
        assert torch.equal(torch.jit.script(kernels.nms)(boxes, scores, 0.5),
                           torchvision.ops.nms(boxes, scores, 0.5))
        assert torch.equal(torch.jit.script(kernels.batched_nms)(boxes, scores, idxs, 0.5),
                           torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
        with kernels.patch_torchvision():
            module = torch.jit.script(torchvision.ops.RoIAlign(3, 0.5, -1))
        expected = torchvision.ops.RoIAlign(3, 0.5, -1)(x.float(), [rois[:, 1:].float()] * 2)
        assert_close(module(x.float(), [rois[:, 1:].float()] * 2), expected)
