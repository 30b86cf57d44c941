"""Host cost per call (``benchmarks.host``): every public call of ours within its budget of
host syncs and tensor operations, read on the CPU as a dry run of the CUDA code path; and
the counter itself, so that the budget check cannot pass by counting nothing."""
from __future__ import annotations

import pytest
import torch
import torchvision

from benchmarks import host
from benchmarks.host import count_host_work, measure, over_budget

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _default_check_policy(monkeypatch):
    """The budgets are for the default policy: no value checks on CUDA tensors."""
    monkeypatch.delenv("KERNELS_CHECK_VALUES", raising=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=[CUDA, pytest.mark.cuda])])
@pytest.mark.parametrize("call", [c.name for c in host.CALLS])
def test_call_is_within_its_host_budget(call, device):
    (row,) = measure([call], repeats=0, device=device)
    problems = over_budget([row])
    assert not problems, "\n".join(problems)
    assert row["launches"] >= 1, f"{call}: ours launched no Triton kernel on the CUDA path"


def test_counter_counts_ops_and_syncs():
    x = torch.randn(8)
    with count_host_work() as work:
        x + 1
    assert (work.ops, work.syncs) == (["add.Tensor"], [])
    with count_host_work() as work:
        x.nonzero()
    assert work.syncs == ["nonzero"]
    with count_host_work() as work:
        x.tolist()
    assert (work.ops, work.syncs) == ([], ["Tensor.tolist"])
    with count_host_work() as work:     # item() dispatches _local_scalar_dense: one sync
        x.sum().item()
    assert work.ops == ["sum", "_local_scalar_dense"]
    assert work.syncs == ["_local_scalar_dense"]
    with count_host_work() as work:
        x[x > 0]
    assert work.syncs == ["index.Tensor"]
    with count_host_work() as work:     # one copy to the host; reading the copy is free
        x.cpu().tolist()
    assert work.syncs == ["Tensor.cpu"]
    assert "tolist" not in torch.Tensor.__dict__ and "cpu" not in torch.Tensor.__dict__


def test_counter_does_not_count_host_arithmetic():
    # a tensor built from Python numbers lives on the host whatever the device: reading it,
    # or what is computed from it alone, is no sync (torchvision's scale inference does it)
    x = torch.randn(4)
    with count_host_work() as work:
        float(torch.tensor(24.0).log2().round())
        (x * torch.tensor(2.0)).sum().item()
    assert work.ops == ["lift_fresh", "log2", "round", "_local_scalar_dense", "lift_fresh",
                        "mul.Tensor", "sum", "_local_scalar_dense"]
    assert work.syncs == ["_local_scalar_dense"]


@torch.library.custom_op("host_test::scaled_by_count", mutates_args=())
def _scaled_by_count(x: torch.Tensor) -> torch.Tensor:
    return x * int((x > 0).sum())


def test_the_op_itself_is_not_extra_work_but_a_sync_inside_it_is():
    x = torch.randn(5, 4)
    with count_host_work(op_namespaces=("host_test",)) as work:
        _scaled_by_count(x)
    assert (work.op_calls, work.ops, work.syncs) == (
        ["host_test::scaled_by_count"], [], ["item"])
    scores = torch.rand(5)
    with count_host_work() as work:
        torchvision.ops.nms(x, scores, 0.5)
    assert (work.op_calls, work.ops, work.syncs) == (["torchvision::nms"], [], [])


def test_dry_run_reads_ours_on_the_cuda_path_and_the_baseline_for_real():
    rows = {r["call"]: r for r in measure(["roi_align.fwd", "roi_align.list.fwd",
                                           "MultiScaleRoIAlign.fwd"], repeats=0,
                                          device="cpu")}
    tensor, listed, pyramid = rows.values()
    assert tensor["launches"] >= 1 and tensor["runtime_args"] > 0
    assert tensor["launch_list"][0]["kernel"].startswith("kernels.")
    assert (tensor["baseline_op_calls"], tensor["baseline_ops"]) == (
        ["torchvision::roi_align"], 0)
    assert listed["baseline_ops"] >= 5      # the list -> (K, 5) conversion
    assert pyramid["baseline_syncs"] >= 1   # torchvision's per-level torch.where
    assert all("ours_us" not in r and "baseline_us" not in r for r in rows.values())


def test_budget_names_the_call_and_what_it_counted():
    row = {"call": "nms", "ours_syncs": 2, "baseline_syncs": 0, "ours_ops": 3,
           "baseline_ops": 0, "ours_sync_names": ["Tensor.tolist", "item"],
           "ours_op_names": ["abs", "all", "stack"], "baseline_op_names": []}
    assert host.budget(row) == {"syncs": 1, "ops": 2}
    syncs, ops = over_budget([row])
    assert syncs.startswith("nms: 2 host syncs, budget 1") and "'item'" in syncs
    assert ops.startswith("nms: 3 tensor ops, budget 2") and "'stack'" in ops
    assert over_budget([{"call": "nms", "error": "ours: RuntimeError: boom"}]) == [
        "nms: not measured: ours: RuntimeError: boom"]
    with pytest.raises(ValueError, match="unknown call"):
        measure(["no_such_call"], repeats=0, device="cpu")


@CUDA
@pytest.mark.cuda
def test_cuda_counter_counts_what_sync_debug_mode_reports():
    x = torch.randn(8, device="cuda")
    with count_host_work(cuda=True) as work:
        x + 1
    assert (work.ops, work.syncs) == (["add.Tensor"], [])
    with count_host_work(cuda=True) as work:
        x.sum().item()
    assert len(work.syncs) == 1


def test_dry_run_zero_fills_fresh_tensors_and_restores_the_allocators():
    # no kernel writes in the dry run; host code reading a kernel's output (an index_add_
    # by labels a kernel wrote) must find valid values, whatever memory malloc returns
    empty = torch.empty
    with host._dry():
        assert not torch.empty(64, dtype=torch.int64).any()
        assert not torch.randn(3).new_empty(64, dtype=torch.int32).any()
    assert torch.empty is empty and "new_empty" not in torch.Tensor.__dict__
