"""kernels._launch.launch: CUDA's grid limits, the tensors' device, launch records.

The interpreter checks none of CUDA's launch limits and runs every program on the CPU, so
these tests read what the launchers ask for instead of running it.
"""
from __future__ import annotations


import pytest
import torch
import torchvision

import kernels
from kernels import _launch, _utils

from kernels.ops import roi_align as roi_align_module

AXIS_0, OTHER_AXES = 2**31 - 1, 65535


def _capture(monkeypatch, module) -> list:
    """Replace the module's launch with one that records (kernel, grid) and runs nothing."""
    grids = []
    monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, **k: grids.append(
        (kernel, tuple(grid))))
    return grids


def _fits(grid) -> bool:
    return grid[0] <= AXIS_0 and all(g <= OTHER_AXES for g in grid[1:])


def test_roi_align_grid_fits_cuda_limits_at_1024x1024(monkeypatch):
    # 1024 * 1024 bins in blocks of 16 (9 channels: row 0) are 65,536 bin blocks: one
    # past the limit of axes 1 and 2
    grids = _capture(monkeypatch, roi_align_module)
    rois = torch.tensor([[0.0, 0.0, 0.0, 7.0, 7.0], [0.0, 1.0, 1.0, 5.0, 6.0]])
    roi_align_module.roi_align_forward(torch.randn(1, 9, 8, 8), rois, 1.0, 1024, 1024, 1,
                                       False)
    roi_align_module.roi_align_backward(torch.zeros(2, 9, 1024, 1024), rois, 1.0, 1024, 1024,
                                        1, False, (1, 9, 8, 8), False)
    assert [k for k, _ in grids] == [roi_align_module._roi_align_kernel] * 2
    for _, grid in grids:
        assert _fits(grid), grid
        assert grid[0] == 65536 and grid[2] == 2   # bin blocks on axis 0, RoIs on axis 2


def test_more_rois_than_a_grid_axis_takes_are_split_into_launches(monkeypatch):
    k = 2 * 65535 + 7
    launched = []
    monkeypatch.setattr(roi_align_module, "launch", lambda kernel, grid, rois, out, *a, **kw:
                        launched.append((tuple(grid), rois.shape[0], out.shape[0])))
    rois = torch.zeros(k, 5)
    rois[:, 3:] = 4.0
    roi_align_module.roi_align_forward(torch.randn(1, 2, 8, 8), rois, 1.0, 2, 2, 1, False)
    assert [g[2] for g, _, _ in launched] == [65535, 65535, 7]
    assert all(_fits(g) and g[2] == r == o for g, r, o in launched)


def test_multiscale_grid_fits_cuda_limits_at_1024x1024(monkeypatch):
    # the public pooler takes the Triton path (its launches captured, nothing runs) also
    # where the suite runs without the interpreter
    monkeypatch.setattr(_utils, "INTERPRET", True)
    grids = _capture(monkeypatch, roi_align_module)   # the pyramid's launches are its
    feats = [torch.randn(1, 9, 16, 16), torch.randn(1, 9, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    pooler = kernels.MultiScaleRoIAlign(["0", "1"], 1024, 1)
    pooler({"0": feats[0], "1": feats[1]}, boxes, [(64, 64)])
    assert grids and all(_fits(g) for _, g in grids), grids


def test_launch_refuses_a_grid_past_cuda_limits(monkeypatch):
    # a stand-in kernel: kept out of the launch record the GPU compile check compiles
    monkeypatch.setattr(_launch, "LAUNCHES", set())
    ran = []

    class Kernel:
        fn = staticmethod(lambda x: None)

        def __getitem__(self, grid):
            return lambda *a, **k: ran.append(grid)

    kernel = Kernel()
    for grid in ((1, OTHER_AXES + 1), (1, 1, OTHER_AXES + 1), (AXIS_0 + 1,)):
        with pytest.raises(ValueError, match="grid"):
            _launch.launch(kernel, grid, torch.zeros(1), tuning={"num_warps": 1})
    _launch.launch(kernel, (AXIS_0, OTHER_AXES, OTHER_AXES), torch.zeros(1),
                  tuning={"num_warps": 1})
    assert ran == [(AXIS_0, OTHER_AXES, OTHER_AXES)]


def test_launches_are_recorded_only_while_recording(backend, monkeypatch):
    if not backend.triton:
        pytest.skip("the reference path launches no kernel")
    x = torch.randn(1, 2, 6, 6, device=backend.device)
    rois = torch.tensor([[0.0, 0.5, 0.5, 4.0, 5.0]], device=backend.device)
    monkeypatch.setattr(_launch, "_recording", False)
    monkeypatch.setattr(_launch, "LAUNCHES", set())
    kernels.roi_align(x, rois, 3, 1.0, 2, True)
    assert _launch.LAUNCHES == set()
    with _launch.record_launches():
        kernels.roi_align(x, rois, 3, 1.0, 2, True)
    assert {s.kernel.split(":")[1] for s in _launch.LAUNCHES} == {"_roi_align_kernel"}


def test_launches_are_recorded_as_tritons_jit_specializes_them(backend, monkeypatch):
    """The compile check builds what the JIT compiles: an int equal to 1 is the constant 1,
    None (the levels a one-level launch leaves out) a constant, pointers and ints divisible
    by 16 carry that, except the arguments the kernel's do_not_specialize exempts
    (roi_align's map sizes and batch size)."""
    if not backend.triton:
        pytest.skip("the reference path launches no kernel")
    x = torch.randn(1, 16, 32, 8, device=backend.device)   # N = 1, H = 32
    rois = torch.tensor([[0.0, 0.5, 0.5, 4.0, 5.0]], device=backend.device)
    monkeypatch.setattr(_launch, "LAUNCHES", set())
    with _launch.record_launches():
        kernels.roi_align(x, rois, (1, 3), 1.0, 1, True)   # PH = 1, sampling_ratio = 1
    [spec] = _launch.LAUNCHES
    constexprs, signature = dict(spec.constexprs), dict(spec.signature)
    assert constexprs["PH"] == 1 and constexprs["sampling_ratio"] == 1
    assert constexprs["x1_ptr"] is None and constexprs["W4"] is None
    assert signature["PW"] == "i32" and "PW" not in spec.divisible
    assert signature["N"] == "i32"   # exempt, though 1
    assert {"C", "x0_ptr", "pooled_ptr", "rois_ptr"} <= set(spec.divisible)
    assert "H0" not in spec.divisible   # exempt, though 32


def test_the_written_out_rule_is_tritons_specialization(monkeypatch):
    """Where Triton's own specialization function is missing or changed its signature, the
    recording falls back to the rule written out; both agree on every kind of argument."""
    if _launch._native_specialize is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    values = [1, 0, 16, 17, 2**40, -32, 2.5, True, torch.zeros(8), torch.zeros(9)[1:]]
    native = [_launch.jit_specialization(v, s) for v in values for s in (True, False)]
    monkeypatch.setattr(_launch, "_native_specialize", None)
    written = [_launch.jit_specialization(v, s) for v in values for s in (True, False)]
    assert written == native


def test_launch_device_is_the_first_tensors_cuda_device():
    assert _launch.launch_device((torch.zeros(1), 3)) is None
    assert _launch.launch_device((3, 1.0)) is None


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_another_gpu_than_the_current_one():
    # Triton launches on the current device: the launch must be guarded to the tensors'
    with torch.cuda.device(0):
        x = torch.randn(2, 8, 20, 24, device="cuda:1", requires_grad=True)
        rois = torch.tensor([[0, 1.0, 2.0, 15.0, 18.0], [1, 3.0, 0.0, 20.0, 9.0]],
                            device="cuda:1")
        out = kernels.roi_align(x, rois, 7, 0.5, 2)
        ref = torchvision.ops.roi_align(x, rois, 7, 0.5, 2)
        torch.testing.assert_close(out, ref)
        boxes = torch.rand(300, 4, device="cuda:1") * 100
        boxes[:, 2:] += boxes[:, :2]
        scores = torch.rand(300, device="cuda:1")
        assert torch.equal(kernels.nms(boxes, scores, 0.5),
                           torchvision.ops.nms(boxes, scores, 0.5))


def _runtime_args(call) -> dict[str, list[int]]:
    """Each kernel one call launches on the CUDA code path (dry run), with the runtime
    argument count of each launch."""
    seen = {}
    with _utils.dry_run(lambda kid, grid, args: seen.setdefault(kid.split(":")[1],
                                                                []).append(args)):
        call()
    return seen


def test_roi_align_launches_take_few_runtime_arguments():
    """Triton's launch path costs about 0.4 us per runtime argument: the RoI Align kernel
    takes 11 at one level forward (55 when every level's shape and strides were passed),
    4 more per level and the output gradient's 4 strides backward."""
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 7.0], [1.0, 0.0, 2.0, 9.0, 8.0]])
    assert _runtime_args(lambda: kernels.roi_align(x, rois, 2)) == {"_roi_align_kernel": [11]}
    assert _runtime_args(lambda: kernels.roi_align(x, rois, 2).sum().backward()) == {
        "_roi_align_kernel": [11, 15]}
    feats = {str(i): torch.randn(2, 3, 32 >> i, 32 >> i) for i in range(4)}
    pooler = kernels.MultiScaleRoIAlign(list(feats), 2, 2)
    boxes = [rois[:1, 1:] * 10, rois[1:, 1:] * 20]
    assert _runtime_args(lambda: pooler(feats, boxes, [(128, 128)] * 2)) == {
        "_roi_align_kernel": [11 + 3 * 4]}
