"""The tuning sweep: candidate rows, the winners file, pick_tuning's choice, the sweep CLI.

The sweep times rows on a GPU only; here its dry run (every row launched through the
interpreter and compared with the launcher's own rows) and ``--apply`` on a synthetic GPU
result, merged into a copy of the winners file.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import kernels
from benchmarks.gpu import sweep
from kernels import _launch
from kernels._utils import INTERPRET
from kernels.ops import roi_align as roi_align_ops

ROI_ALIGN = _launch.kernel_id(roi_align_ops._roi_align_kernel)
# the kernels issue 32 names; each must have candidates to time
SWEPT = {ROI_ALIGN, "kernels.ops.mask_loss:_mask_loss_fwd_kernel",
         "kernels.ops.paste_masks_in_image:_paste_masks_in_image_kernel",
         "kernels.ops.nms:_nms_greedy_kernel"}
# one fast workload per op family the dry run's test covers
DRY_RUN_WORKLOADS = ["roi_align backward float32 channels_last 7x7",
                     "mask_loss forward N=128 float32", "mask_loss backward N=128 K=91 float32",
                     "paste_masks_in_image threshold float32", "nms classes=1 boxes=1000"]
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="the dry run launches the kernels: TRITON_INTERPRET=1 (this "
                          "pass runs the CPU path)")


def _rules_rows(kid: str) -> list[dict]:
    return [r for r in _launch.gpu_rows(kid) if r not in _launch.CANDIDATE_ROWS[kid]]


def test_candidates_are_registered_beside_the_rules_rows():
    with_candidates = {k for k, rows in _launch.CANDIDATE_ROWS.items() if rows}
    assert SWEPT <= with_candidates
    for kid in with_candidates:
        candidates = _launch.CANDIDATE_ROWS[kid]
        assert 2 <= len(candidates) <= 4, kid
        assert _launch.gpu_rows(kid)[-len(candidates):] == candidates   # after the rules'
        assert not any(c in _rules_rows(kid) for c in candidates), kid
        assert not any(c in _launch.INTERPRETER_ROWS[kid] for c in candidates), kid
        assert _launch.KEY_FIELDS[kid], f"{kid}: candidates without a workload key"


def _some_kernel():
    pass


def test_register_tuning_refuses_a_repeated_row_and_candidates_without_a_key():
    row = {"BLOCK": 16, "num_warps": 4}
    with pytest.raises(ValueError, match="listed twice"):
        _launch.register_tuning(_some_kernel, [row], candidates=[dict(row)], key_fields=("n",))
    with pytest.raises(ValueError, match="key_fields"):
        _launch.register_tuning(_some_kernel, [row], candidates=[{"BLOCK": 32, "num_warps": 4}])
    assert _launch.kernel_id(_some_kernel) not in _launch.TUNING_TABLES


def test_key_text_reads_back():
    key = (256, 49, "bfloat16", "channels_last", "backward", 4)
    assert _launch.key_text(key) == "256|49|bfloat16|channels_last|backward|4"
    assert _launch.parse_key(_launch.key_text(key)) == key
    for bad in [(True,), ("12",), ("a|b",), (torch.float32,)]:
        with pytest.raises((TypeError, ValueError)):
            _launch.key_text(bad)


def test_the_committed_winners_file_reads_and_names_registered_rows():
    text = _launch.WINNERS_PATH.read_text()
    data = json.loads(text)
    assert sweep.dump_winners(data) == text   # as --apply writes it
    assert data["key_fields"] == sweep.key_fields()
    for device, by_kernel in _launch.read_winners(_launch.WINNERS_PATH).items():
        for kid, keyed in by_kernel.items():
            for key, row in keyed.items():
                assert len(key) == len(_launch.KEY_FIELDS[kid]), (device, kid, key)
                assert row in _launch.gpu_rows(kid), (device, kid, key, row)


def _gpu_result(tmp_path, winner: dict, key: str, *, dry_run=False, kid=ROI_ALIGN):
    own = _launch.gpu_rows(kid)[0]
    result = {"dry_run": dry_run, "date": "2026-12-07T00:00:00+00:00",
              "environment": {"device": "NVIDIA Test GPU", "torch": torch.__version__,
                              "triton": "3.8.0", "git_sha": "abc1234"},
              "winners": [{"kernel": kid, "key": key, "own_row": own, "row": winner,
                           "changed": winner != own, "speedup": 1.2, "workloads": ["w"]}]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(result))
    return path


@pytest.fixture
def winners_copy(tmp_path):
    path = tmp_path / "tuned.json"
    shutil.copy(_launch.WINNERS_PATH, path)
    return path


def test_apply_merges_a_gpu_result_and_pick_tuning_takes_its_winner(tmp_path, winners_copy,
                                                                    capsys):
    key = (256, 49, "float32", "channels_last", "forward", 1)
    own = roi_align_ops._tuning_row(256, 49)
    winner = _launch.CANDIDATE_ROWS[ROI_ALIGN][1]
    results = _gpu_result(tmp_path, winner, _launch.key_text(key))
    assert sweep.main(["--apply", str(results), "--winners", str(winners_copy)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA Test GPU _roi_align_kernel [256|49|float32|channels_last|forward|1]" in out
    assert "launcher's rule" in out
    data = json.loads(winners_copy.read_text())
    assert data["devices"]["NVIDIA Test GPU"]["source"]["git_sha"] == "abc1234"
    assert sweep.apply(results, winners_copy) == []   # the same result again: no change
    assert _launch.WINNERS_PATH.read_text() != winners_copy.read_text()   # only the copy

    kernel = roi_align_ops._roi_align_kernel
    with _launch.winners_file(winners_copy):
        with _launch.simulated_device("NVIDIA Test GPU"):
            taken = _launch.pick_tuning(kernel, own, key=key)
            assert taken == winner and taken is _launch.CANDIDATE_ROWS[ROI_ALIGN][1]
            other = (256, 196, "float32", "channels_last", "forward", 1)
            assert _launch.pick_tuning(kernel, own, key=other) is own
            assert _launch.pick_tuning(kernel, own) is own   # no key: the launcher's row
            with _launch.forced_tuning_row(0):   # a forced row wins over the table
                assert _launch.pick_tuning(kernel, own, key=key) == _launch.gpu_rows(
                    ROI_ALIGN)[0]
            forced = _launch.CANDIDATE_ROWS[ROI_ALIGN][0]
            with _launch.forced_tuning_row(forced, kernel, key):
                assert _launch.pick_tuning(kernel, own, key=key) is forced
                assert _launch.pick_tuning(kernel, own, key=other) is own
        with _launch.simulated_device("NVIDIA Other GPU"):
            assert _launch.pick_tuning(kernel, own, key=key) is own
    with _launch.simulated_device("NVIDIA Test GPU"):   # the committed file: no entry
        assert _launch.pick_tuning(kernel, own, key=key) is own


def test_apply_refuses_a_dry_run_and_a_row_outside_the_table(tmp_path, winners_copy):
    with pytest.raises(ValueError, match="dry run"):
        sweep.apply(_gpu_result(tmp_path, _launch.gpu_rows(ROI_ALIGN)[3], "1|9|float32|NCHW|"
                                "forward|1", dry_run=True), winners_copy)
    with pytest.raises(ValueError, match="not a GPU row"):
        sweep.apply(_gpu_result(tmp_path, {"BLOCK_P": 4, "BLOCK_C": 4, "num_warps": 1},
                                "1|9|float32|NCHW|forward|1"), winners_copy)


def test_a_stale_winner_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "devices": {"NVIDIA Test GPU": {"kernels": {
        ROI_ALIGN: {"8|9|float32|NCHW|forward|1": {"BLOCK_P": 4, "BLOCK_C": 4,
                                                    "num_warps": 1}}}}}}))
    own = roi_align_ops._TUNING[0]
    with _launch.winners_file(path), _launch.simulated_device("NVIDIA Test GPU"):
        with pytest.warns(UserWarning, match="not in the kernel's tuning table"):
            taken = _launch.pick_tuning(roi_align_ops._roi_align_kernel, own,
                                        key=(8, 9, "float32", "NCHW", "forward", 1))
    assert taken is own


def _entry(own, rows):
    return {"kernel": "k:_kernel", "key": "1|2", "own_row": own,
            "rows": [{"row": r, "status": s, "ms": ms} for r, s, ms in rows]}


def test_winner_is_the_fastest_row_ok_everywhere_beyond_the_margin():
    a, b, c, d = ({"BLOCK": x, "num_warps": 4} for x in (1, 2, 3, 4))
    rows = [(a, "ok", 1.0), (b, "mismatch", 0.5), (c, "failed", None), (d, "ok", 0.9)]
    [w] = sweep.winners([{"name": "w1", "entries": [_entry(a, rows)]}])
    assert w["row"] == d and w["changed"] and w["speedup"] == pytest.approx(1 / 0.9)
    close = [(a, "ok", 1.0), (d, "ok", 0.99)]   # within the margin: the rule's row stays
    [w] = sweep.winners([{"name": "w1", "entries": [_entry(a, close)]}])
    assert w["row"] == a and not w["changed"]
    # a key two workloads share: times add; a row that mismatched in one never wins
    one = [(a, "ok", 1.0), (b, "ok", 0.2), (d, "ok", 0.5)]
    two = [(a, "ok", 1.0), (b, "mismatch", None), (d, "ok", 2.0)]
    [w] = sweep.winners([{"name": "w1", "entries": [_entry(a, one)]},
                         {"name": "w2", "entries": [_entry(a, two)]}])
    assert w["row"] == a and w["workloads"] == ["w1", "w2"]
    untimed = [(a, "ok", None), (d, "ok", None)]   # a dry run: no winner
    [w] = sweep.winners([{"name": "w1", "entries": [_entry(a, untimed)]}])
    assert w["row"] is None and not w["changed"]


@needs_interpreter
def test_a_row_that_computes_something_else_is_a_mismatch():
    x = torch.randn(1, 8, 10, 12)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 7.0]])
    step = lambda: kernels.roi_align(x, rois, 3, 1.0, 1)   # noqa: E731
    key = (8, 9, "float32", "NCHW", "forward", 1)
    own = roi_align_ops._tuning_row(8, 9)
    rows = _launch.gpu_rows(ROI_ALIGN)
    ok = sweep.run_row(step, step(), ROI_ALIGN, key, rows[3], own, "cpu", timed=False)
    assert ok["status"] == "ok" and ok["candidate"] and ok["ms"] is None
    wrong = sweep.run_row(step, step() + 1, ROI_ALIGN, key, rows[3], own, "cpu", timed=False)
    assert wrong["status"] == "mismatch" and wrong["error"]
    other_key = sweep.run_row(step, step(), ROI_ALIGN, key[:-1] + (4,), rows[3], own, "cpu",
                              timed=False)
    assert other_key["status"] == "not launched"   # forced for a key no launch passes


@needs_interpreter
def test_dry_run_launches_every_row_and_writes_a_well_formed_result(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--dry-run", "--device", "cpu"]
    for name in DRY_RUN_WORKLOADS:
        argv += ["--only", name]
    assert sweep.main(argv) == 0, capsys.readouterr().out
    result = json.loads((tmp_path / sweep.RESULT_NAME).read_text())
    assert result["dry_run"] and not result["problems"]
    env = result["environment"]
    assert {"device", "torch", "triton", "git_sha"} <= set(env)
    assert set(result["kernels"]) == {k for k, r in _launch.CANDIDATE_ROWS.items() if r}
    ran = [w for w in result["workloads"] if "entries" in w]
    assert {w["name"] for w in ran} >= set(DRY_RUN_WORKLOADS)
    seen = set()
    for w in ran:
        assert w["entries"], f"{w['name']}: no kernel with candidates launched"
        for e in w["entries"]:
            kid = e["kernel"]
            seen.add(kid)
            assert len(_launch.parse_key(e["key"])) == len(_launch.KEY_FIELDS[kid])
            assert [r["row"] for r in e["rows"]] == _launch.gpu_rows(kid)
            assert all(r["status"] == "ok" and r["ms"] is None for r in e["rows"])
            # (the interpreter's own row of the NMS greedy pass is no GPU row)
            assert sum(r["own"] for r in e["rows"]) == (e["own_row"] in _launch.gpu_rows(kid))
            assert [r["row"] for r in e["rows"] if r["candidate"]] == \
                _launch.CANDIDATE_ROWS[kid]
    assert seen >= {ROI_ALIGN, "kernels.ops.mask_loss:_mask_loss_bwd_kernel",
                    "kernels.ops.nms:_nms_greedy_kernel"}
    assert result["winners"] and all(w["row"] is None for w in result["winners"])
    assert f"{len(ran)} of {len(result['workloads'])} workloads" in capsys.readouterr().out


def test_the_cpu_without_the_interpreter_or_without_dry_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "INTERPRET", True)
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--device", "cpu"])   # no --dry-run
    monkeypatch.setattr(sweep, "INTERPRET", False)
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--dry-run", "--device", "cpu"])


def test_the_dry_run_plan_runs_one_workload_per_tiny_build():
    plan = sweep.workloads()
    assert len({w.name for w in plan}) == len(plan)
    tiny = {(w.build.func, w.tiny) for w in plan}
    assert len(tiny) <= 40   # the dry run's workloads: about 40 s on a 2-core CPU
    ops = [w.name.split()[0] for w in plan]
    assert ops[:7] == ["roi_align", "multiscale_roi_align", "mask_loss", "maskrcnn_loss",
                       "nms", "paste_masks_in_image", "mask_predictor_loss"]   # op by op
