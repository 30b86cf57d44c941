"""Every kernel the ops launch compiles for sm_80 and sm_90, with no register spills.

The interpreter runs a kernel's Python, not the GPU compiler: it accepts code no GPU can
compile and says nothing about registers. This test compiles, ahead of time and without a
GPU, each specialization recorded from real op launches — those of this test session
(it runs last) plus each op module's ``_compile_examples()`` — expanded over every row of
the kernel's tuning table. It proves the kernels compile and fit in registers; it does not
prove speed or numerical results on a GPU (the CUDA run of the suite does that).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernels import _aot, _utils

pytestmark = pytest.mark.compile_check


@pytest.fixture(scope="module")
def compiled():
    reason = _aot.can_compile_without_gpu()
    if reason:
        pytest.skip(reason)
    session = [s.as_json() for s in _utils.LAUNCHES]
    specs = _aot.record_in_subprocess(session)
    return specs, _aot.compile_in_subprocess(specs)


def test_every_launched_kernel_is_recorded(compiled):
    specs, _ = compiled
    recorded = {s["kernel"] for s in specs}
    missing = _aot.launched_kernels() - recorded
    assert not missing, f"kernels never launched by any op example or test: {sorted(missing)}"


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
    assert not low, (f"below {_utils.OCCUPANCY_TARGET:.0%} occupancy on sm_90 with no "
                     "occupancy_note:\n" + "\n".join(low))


def test_no_fenced_atomics(compiled):
    """A scatter-add whose ordering comes from the kernel boundary must not fence each add:
    Triton's default ``sem="acq_rel"`` puts a ``MEMBAR`` (and an L1 invalidation) around
    every atomic; ``sem="relaxed"`` compiles to a plain ``RED``. Read from the SASS."""
    _, results = compiled
    with_atomics = [r for r in results if r["ok"] and r["atomics"]]
    assert {r["spec"]["kernel"].split(":")[1] for r in with_atomics} >= {
        "_roi_align_bwd_kernel", "_multiscale_roi_align_bwd_kernel", "_nms_greedy_kernel"}
    fenced = [f"{r['spec']['kernel']} [{_aot.describe(r['spec'])}] sm_{r['arch']}: "
              f"{r['fences']} MEMBAR for {r['atomics']} atomics" for r in results
              if r["ok"] and r["fences"]]
    assert not fenced, "memory fences in compiled kernels:\n" + "\n".join(fenced)


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
