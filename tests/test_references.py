"""Where the references live and how they are used: one home (kernels.reference), one naming
rule (a reference is named after the launcher it stands in for and takes its arguments), and
no Triton path that calls into it."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import kernels
import kernels.ops
from kernels import reference


def _public_functions(module) -> dict:
    return {name: f for name, f in vars(module).items()
            if inspect.isfunction(f) and not name.startswith("_")
            and f.__module__ == module.__name__}


def _launchers() -> dict:
    found = {}
    for info in pkgutil.iter_modules(kernels.ops.__path__):
        module = importlib.import_module(f"kernels.ops.{info.name}")
        found.update(_public_functions(module))
    return found


def _required(f) -> list[str]:
    return [p.name for p in inspect.signature(f).parameters.values()
            if p.default is inspect.Parameter.empty]


def test_each_reference_is_named_after_its_launcher_and_takes_its_arguments():
    refs = _public_functions(reference)
    launchers = _launchers()
    assert len(refs) >= 10, sorted(refs)      # the module was read
    for name, ref in refs.items():
        assert name in launchers, f"reference.{name} stands in for no launcher"
        # launch hints (keyword arguments with defaults) are the launcher's alone
        assert _required(ref) == _required(launchers[name]), name


def test_no_reference_is_defined_outside_kernels_reference():
    names = [name for name in _launchers() if "reference" in name]
    assert names == []


@pytest.mark.skipif(not kernels._utils.INTERPRET,
                    reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
def test_the_triton_path_never_calls_a_reference(monkeypatch):
    """Every reference raises; each op, forward and backward (atomic and deterministic),
    then runs on the Triton path without reaching one."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"the Triton path called reference.{name}")
        return call

    for name in _public_functions(reference):
        monkeypatch.setattr(reference, name, forbidden(name))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 0.5, 0.5, 6.0, 7.0], [1.0, 1.0, 0.0, 4.0, 3.0]])
    kernels.roi_align(x, rois, 2, 1.0, -1).sum().backward()
    with kernels._utils.deterministic_algorithms():
        kernels.roi_align(x, rois, 2, 1.0, -1).sum().backward()
    feats = {"0": torch.randn(1, 3, 16, 16, requires_grad=True),
             "1": torch.randn(1, 3, 8, 8, requires_grad=True)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 20.0], [0.0, 0.0, 3.0, 4.0]])]
    pooled = kernels.MultiScaleRoIAlign(["0", "1"], 2, 2)(feats, boxes, [(32, 32)])
    pooled.sum().backward()
    with kernels._utils.deterministic_algorithms():
        kernels.MultiScaleRoIAlign(["0", "1"], 2, 2)(feats, boxes, [(32, 32)]).sum().backward()
    xy = torch.rand(20, 2) * 20
    b = torch.cat([xy, xy + 5], 1)
    s, idxs = torch.rand(20), torch.randint(0, 3, (20,))
    kernels.nms(b, s, 0.5)
    kernels.batched_nms(b, s, idxs, 0.5)
    kernels.batched_nms_mask(b, s, idxs, 0.5)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.tensor([0, 2])
    kernels.mask_loss(logits, torch.rand(2, 4, 4), labels).backward()
    kernels.maskrcnn_loss(logits, [torch.tensor([[0.5, 1.0, 8.0, 7.5], [2.0, 0.0, 5.0, 9.0]])],
                          [torch.rand(2, 9, 11) > 0.5], [labels],
                          [torch.tensor([1, 0])]).backward()
    features = torch.randn(2, 5, 4, 4, requires_grad=True)
    kernels.mask_predictor_loss(features, torch.randn(3, 5, 1, 1), torch.randn(3),
                                torch.rand(2, 4, 4), labels).backward()
    kernels.paste_masks_in_image(torch.rand(2, 1, 4, 4), b[:2], (12, 14), threshold=0.5)
