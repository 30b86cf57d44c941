"""Every kernel the ops launch compiles for sm_80 and sm_90, with no register spills.

The interpreter runs a kernel's Python, not the GPU compiler: it accepts code no GPU can
compile and says nothing about registers. This test compiles, ahead of time and without a
GPU, each specialization recorded from real op launches — those of this test session
(it runs last; under `make test`, also those of the first pass's processes: conftest) plus
each op module's ``_compile_examples()`` — expanded over every row of
the kernel's tuning table. It proves the kernels compile and fit in registers; it does not
prove speed or numerical results on a GPU (the CUDA run of the suite does that).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import static
from benchmarks.__main__ import markdown as report_markdown
from conftest import launches_of_earlier_passes
from kernels import _aot, _launch, _sampling
from kernels.ops import roi_align as roi_align_ops

pytestmark = pytest.mark.compile_check


@pytest.fixture(scope="module")
def compiled():
    reason = _aot.can_compile_without_gpu()
    if reason:
        pytest.skip(reason)
    session = [s.as_json() for s in _launch.LAUNCHES] + launches_of_earlier_passes()
    specs = _aot.record_in_subprocess(session)
    return specs, _aot.compile_in_subprocess(specs)


def test_every_launched_kernel_is_recorded(compiled):
    specs, _ = compiled
    recorded = {s["kernel"] for s in specs}
    missing = _aot.launched_kernels() - recorded
    assert not missing, f"kernels never launched by any op example or test: {sorted(missing)}"


def test_the_benchmark_reports_static_section_lists_every_kernel(compiled):
    """`python -m benchmarks` ends with this table (``static.report_section``): one row per
    kernel and tuning row, every launched kernel in it, none spilling; or why it was
    skipped where nothing compiles."""
    _, results = compiled
    section = static.report_section(results=results)
    assert not section["failures"]
    assert {r["kernel"] for r in section["rows"]} == {
        k.split(":")[1] for k in _aot.launched_kernels()}
    assert all(r["spill_bytes"] == 0 for r in section["rows"])
    environment = dict.fromkeys(("device", "torch", "triton", "torchvision", "git_sha"), "-")
    text = report_markdown({"environment": environment, "benchmarks": {}, "static": section})
    assert "## Static kernel report" in text and "occupancy_sm90" in text
    skipped = report_markdown({"environment": environment, "benchmarks": {},
                               "static": {"skipped": "no ptxas"}})
    assert "Skipped: no ptxas" in skipped


def test_every_specialization_compiles_for_sm80_and_sm90(compiled):
    _, results = compiled
    assert {r["arch"] for r in results} == set(_aot.ARCHS)
    failures = [f"{r['spec']['kernel']} [{_aot.describe(r['spec'])}] on sm_{r['arch']}: "
                f"{r['error']}" for r in results if not r["ok"]]
    assert not failures, "GPU compile failed:\n" + "\n".join(failures)


def test_no_spills_on_sm90(compiled):
    _, results = compiled
    spills = [f"{r['spec']['kernel']} [{_aot.describe(r['spec'])}]: {r['spill_bytes']} bytes"
              for r in results if r["ok"] and r["arch"] == 90 and r["spill_bytes"]]
    assert not spills, "register spills (local memory) on sm_90:\n" + "\n".join(spills)


def test_occupancy_target_on_sm90(compiled):
    """Every row a GPU runs reaches the theoretical sm_90 occupancy target (50%), or its
    kernel's tuning table says why a lower one is the right trade (``occupancy_note``).
    Interpreter-only rows are compiled above but never run on a GPU."""
    _, results = compiled
    assert any(r["spec"].get("interpreter_only") is False for r in results)
    low = [f"{r['spec']['kernel']} [{_aot.describe(r['spec'])}]: "
           f"{r['occupancy_sm90']:.0%} at {r['registers']} registers"
           for r in _aot.below_occupancy_target(results)]
    assert not low, (f"below {_launch.OCCUPANCY_TARGET:.0%} occupancy on sm_90 with no "
                     "occupancy_note:\n" + "\n".join(low))


def test_no_fenced_atomics(compiled):
    """A scatter-add whose ordering comes from the kernel boundary must not fence each add:
    Triton's default ``sem="acq_rel"`` puts a ``MEMBAR`` (and an L1 invalidation) around
    every atomic; ``sem="relaxed"`` compiles to a plain ``RED``. Read from the SASS."""
    _, results = compiled
    with_atomics = [r for r in results if r["ok"] and r["atomics"]]
    assert {r["spec"]["kernel"].split(":")[1] for r in with_atomics} >= {
        "_roi_align_kernel", "_nms_greedy_kernel"}
    fenced = [f"{r['spec']['kernel']} [{_aot.describe(r['spec'])}] sm_{r['arch']}: "
              f"{r['fences']} MEMBAR for {r['atomics']} atomics" for r in results
              if r["ok"] and r["fences"]]
    assert not fenced, "memory fences in compiled kernels:\n" + "\n".join(fenced)


def test_sass_is_read_wherever_the_ptx_allows_an_atomic_or_a_fence(compiled):
    """The check disassembles only what its PTX could lower to an atomic or a fence (the
    disassembly is most of a compile's time). Reading every kernel's SASS — one sm_90
    variant of each kernel, one whose SASS the check read where it read any — finds the
    counts the check reported. (A variant may rightly have none to read: nms of one box,
    whose sizes all specialize to constants, compiles its greedy pass without an atomic.)"""
    _, results = compiled
    picked = {}
    for r in results:
        if r["ok"] and r["arch"] == 90:
            kernel = r["spec"]["kernel"]
            if kernel not in picked or (r["sass_read"] and not picked[kernel]["sass_read"]):
                picked[kernel] = r
    assert any(r["sass_read"] for r in picked.values())
    assert any(not r["sass_read"] for r in picked.values())
    code = ("import json, sys; from kernels._aot import compile_one; "
            "specs = json.loads(sys.stdin.read()); "
            "print(json.dumps([compile_one((s, 90), full_sass=True) for s in specs]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, input=json.dumps([r["spec"] for r in picked.values()]))
    full = json.loads(out.stdout.strip().splitlines()[-1])
    for r, f in zip(picked.values(), full):
        assert f["ok"] and f["sass_read"]
        assert (f["atomics"], f["fences"]) == (r["atomics"], r["fences"]), r["spec"]["kernel"]


def test_lanes_run_along_the_stride_1_dimension(compiled):
    """Every global access in a hot loop that a lane rule names puts a warp's lanes along
    the stride-1 dimension of the tensor it touches, for each input layout, as read from
    the sm_90 TTGIR layouts; an exception needs a note in the kernel's lane rule."""
    _, results = compiled
    rows = _aot.lane_rows(results)
    seen = {(r["kernel"], r["layout"]) for r in rows}
    assert {("_roi_align_kernel", "NCHW"), ("_roi_align_kernel", "channels_last")} <= seen
    wrong = [f"{r['kernel']} [{r['spec']}] {r['layout']} {r['access']} tile {r['tile']} "
             f"lanes {r['lanes']}: {r['along']} of {r['needed']} on the stride-1 axis"
             for r in rows if not r["ok"] and not r["note"]]
    assert not wrong, "lanes off the stride-1 dimension:\n" + "\n".join(wrong)


def _hot_load(shape: str, lanes: str, per_thread: str, order: str) -> list[dict]:
    ttgir = "\n".join([
        f"#blocked = #ttg.blocked<{{sizePerThread = [{per_thread}], threadsPerWarp = "
        f"[{lanes}], warpsPerCTA = [8], order = [{order}]}}>",
        "scf.for %iy = %c0 to %n step %c1 : i32 {",
        f"  %v = tt.load %p, %m : tensor<{shape}x!tt.ptr<f32>, #blocked> loc(#loc1)",
        "} loc(#loc2)",
        f"tt.store %q, %v : tensor<{shape}x!tt.ptr<f32>, #blocked> loc(#loc3)",
    ])
    return _aot.memory_ops(ttgir)   # the store is outside the loop: not a hot access


def _roi_align_row(ops: list[dict]) -> dict:
    kernel = _launch.kernel_id(roi_align_ops._roi_align_kernel)
    # P_MAJOR=True, the NCHW specialization: bins are the flat vector's fast index
    spec = {"kernel": kernel, "signature": [], "constexprs": [["P_MAJOR", True]],
            "tunables": [["BLOCK_C", 32], ["BLOCK_P", 16], ["num_warps", 8]]}
    [row] = _aot.lane_rows([{"ok": True, "arch": 90, "spec": spec, "memory_ops": ops}])
    return row


def test_lane_check_flags_lanes_along_channels_for_nchw():
    """What the H200's Triton 3.6 compiled the 2-D roi_align tiles to: a (C, P) gather with
    a warp's 32 lanes along channels, 32 channel planes per warp load in NCHW. The rule now
    wants a flat vector; a 2-D access fails it."""
    ops = _hot_load("32x16", "32, 1", "1, 1", "0, 1")
    assert ops == [{"op": "load", "shape": [32, 16], "lanes": [32, 1], "per_thread": [1, 1]}]
    row = _roi_align_row(ops)
    assert row["layout"] == "NCHW" and not row["ok"] and row["note"] is None


def test_lane_check_counts_a_flat_vectors_run_along_the_fast_index():
    """A flat (bin, channel) vector, bins fast, 2 entries per thread: a warp covers 64
    consecutive entries, 16 of them along the bins (BLOCK_P) before the next channel."""
    row = _roi_align_row(_hot_load("512", "32", "2", "0"))
    assert row["ok"] and (row["along"], row["needed"]) == (16, 16)


def test_the_launcher_picks_the_layout_the_lane_rule_checks():
    """The lane rule checks P_MAJOR specializations as NCHW and the others as
    channels_last: that is what the launchers choose."""
    x = torch.randn(2, 16, 8, 8)
    assert _sampling.p_major([x]) is True
    assert _sampling.p_major([x.contiguous(memory_format=torch.channels_last)]) is False


def test_compile_check_catches_what_the_interpreter_accepts(tmp_path):
    """A kernel with `break` in a loop runs in the interpreter but must fail here."""
    reason = _aot.can_compile_without_gpu()
    if reason:
        pytest.skip(reason)
    module = tmp_path / "bad_kernel_mod.py"
    module.write_text(
        "import triton, triton.language as tl\n"
        "@triton.jit\n"
        "def _bad_kernel(x_ptr, n, B: tl.constexpr):\n"
        "    for i in range(n):\n"
        "        if i > 2:\n"
        "            break\n"
        "        tl.store(x_ptr + i, i)\n")
    spec = {"kernel": "bad_kernel_mod:_bad_kernel", "signature": [["x_ptr", "*fp32"],
                                                                   ["n", "i32"]],
            "constexprs": [["B", 4]], "tunables": [["num_warps", 1]]}
    code = ("import json, sys; from kernels._aot import compile_one; "
            f"print(json.dumps(compile_one(({spec!r}, 90))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert not result["ok"]
    assert "break" in result["error"].lower()
