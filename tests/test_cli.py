"""``python -m maskrcnn {train,evaluate,predict}``: checkpoints, resume, evaluation, prediction
PNGs, torchrun/gloo DDP, and bad input (exit code 2, nothing written).

In-process runs are wrapped in ``reference_path()``: these tests check the CLI and the
training loop, not the kernels (under the project's TRITON_INTERPRET=1 the kernels would run
in Triton's interpreter, far too slowly for a training loop). Subprocess runs get
TRITON_INTERPRET=0 for the same reason.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires_pycocotools
from kernels._utils import reference_path
from maskrcnn import cli, engine

TINY = ["--num-images", "8", "--image-size", "64", "--batch-size", "2", "--val-images", "0",
        "--device", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv):
    with reference_path():
        return cli.main(argv)


def _env():
    return dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    assert _run(["train", *TINY, "--epochs", "1", "--output", path]) == 0
    return path


def test_train_writes_checkpoint_and_resumes(checkpoint, tmp_path):
    ckpt = engine.load_checkpoint(checkpoint)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    assert set(ckpt) >= {"model", "optimizer", "config", "losses"}
    # round trip: the rebuilt model holds exactly the saved weights
    model, _ = engine.model_from_checkpoint(checkpoint, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    # resume continues from epoch 1 / step 4 to epoch 2 / step 8, from the saved weights
    resumed = str(tmp_path / "resumed.pt")
    assert _run(["train", *TINY, "--epochs", "2", "--resume", checkpoint,
                 "--output", resumed]) == 0
    after = engine.load_checkpoint(resumed)
    assert after["epoch"] == 2 and after["step"] == 8
    assert any(not torch.equal(after["model"][k], ckpt["model"][k])
               for k in ckpt["model"] if ckpt["model"][k].is_floating_point())
    # no temp files left behind by the atomic writes
    assert sorted(os.listdir(tmp_path)) == ["resumed.pt"]


def _weights(path):
    return engine.load_checkpoint(path)["model"]


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_reproducible_and_resumes_exactly(tmp_path, monkeypatch):
    # Same seed, same threads: the same weights, bit for bit, with any --workers (the flips
    # are seeded per sample). Before 2026-12-05 the augmentations drew from Python's
    # unseeded `random` and the time budget moved the first steps' learning rate: runs
    # differed from the third step. A run resumed from a checkpoint written mid-epoch, or
    # from the one Ctrl-C writes, ends with exactly the uninterrupted run's weights.
    args = [*TINY, "--epochs", "2"]                     # 2 epochs of 4 steps
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    assert _run(["train", *args, "--output", a]) == 0
    assert _run(["train", *args, "--workers", "2", "--output", b]) == 0
    wa = _weights(a)
    assert _same(wa, _weights(b))

    kept = []                                           # every checkpoint as written
    save = engine.save_checkpoint

    def save_and_keep(path, state):
        save(path, state)
        kept.append(str(tmp_path / f"kept-{len(kept)}.pt"))
        save(kept[-1], state)

    monkeypatch.setattr(engine, "save_checkpoint", save_and_keep)
    c = str(tmp_path / "c.pt")
    assert _run(["train", *args, "--save-every", "3", "--output", c]) == 0
    states = [engine.load_checkpoint(k) for k in kept]
    assert [(s["epoch"], s["batch"], s["step"]) for s in states] == [
        (0, 3, 3), (1, 0, 4), (1, 2, 6), (2, 0, 8)]
    assert _same(wa, _weights(c))                       # saving changes nothing
    for k, state in zip(kept[:3], states):              # resume from each but the last
        resumed = str(tmp_path / f"resumed-{state['step']}.pt")
        assert _run(["train", *args, "--resume", k, "--output", resumed]) == 0
        assert engine.load_checkpoint(resumed)["step"] == 8
        assert _same(wa, _weights(resumed)), f"resumed at step {state['step']}"
    # a mid-epoch checkpoint refuses another batch size (its first batches were others)
    assert _run(["train", *args, "--batch-size", "1", "--resume", kept[0],
                 "--output", str(tmp_path / "refused.pt")]) == 2
    assert not os.path.exists(tmp_path / "refused.pt")
    # and the weights did move after the first checkpoint (no idle comparison)
    assert any(not torch.equal(states[0]["model"][k], wa[k]) for k in wa
               if wa[k].is_floating_point())

    # Ctrl-C during step 2 (the third): that step ends, the checkpoint is written, exit 130
    kept.clear()
    calls = []
    lr_at = engine.lr_at

    def interrupt_at_third_step(*a):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return lr_at(*a)

    monkeypatch.setattr(engine, "lr_at", interrupt_at_third_step)
    # a process started in the background without job control ignores SIGINT, and keeps
    # ignoring it: that run ends normally
    original = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _run(["train", *args, "--output", str(tmp_path / "ignored.pt")]) == 0
        assert len(calls) == 8 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        calls.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)    # Python's own, as in a shell
        d = str(tmp_path / "d.pt")
        assert _run(["train", *args, "--output", d]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored
    finally:
        signal.signal(signal.SIGINT, original)
    state = engine.load_checkpoint(d)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    monkeypatch.setattr(engine, "lr_at", lr_at)
    resumed = str(tmp_path / "resumed-ctrl-c.pt")
    assert _run(["train", *args, "--resume", d, "--output", resumed]) == 0
    assert _same(wa, _weights(resumed))


def test_time_budget_binds_only_when_time_leads():
    # a run inside its budget follows the step schedule exactly; one that falls behind
    # switches to time and stays there, ending when the budget is spent
    p = engine.Progress(100, 1000.0, 0, 0.0, torch.device("cpu"))
    assert p.at(10) == 0.1 and not p.time_bound
    p.t0 -= 200.0                       # 20% of the budget spent at 10% of the steps
    assert p.at(10) == pytest.approx(0.2, abs=1e-3) and p.time_bound
    p.t0 += 150.0                       # back to 5%: stays time-bound, steps lead now
    assert p.at(30) == 0.3
    late = engine.Progress(100, 10.0, 99, 10.5, torch.device("cpu"))
    assert late.value == 1.0            # budget spent at 99% of the steps: done


_AGREE = """
import sys, torch, torch.distributed as dist
from maskrcnn import engine
rank, ctrl_c = int(sys.argv[1]), int(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
p = engine.Progress(100 if rank == 0 else 50, None, 0, 0.0, torch.device("cpu"))
first = p.at(1)
if rank == ctrl_c:
    p.requested = True          # what stop_on_interrupt's handler sets on a Ctrl-C
print(first, p.at(2), p.interrupted)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("ctrl_c_rank", [0, 1])
def test_ddp_ranks_agree_on_progress_and_on_a_ctrl_c_any_rank_got(tmp_path, ctrl_c_rank):
    # rank 0's progress binds every rank (rank 1 counts 50 steps, rank 0 100); a Ctrl-C
    # that reached one rank stops all of them at the same step, each saying interrupted
    # (exit 130 from each: before, only rank 0's signal counted, and only rank 0 said so)
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE, str(rank),
                               str(tmp_path / "rendezvous"), str(ctrl_c_rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT) for rank in (0, 1)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert [out.split() for out, _ in outs] == [["0.01", "1.0", "True"]] * 2


@pytest.mark.parametrize("running, shared", [(2, False), (3, True)])
def test_cpu_shared_counts_runnable_threads_now(monkeypatch, running, shared):
    # 2 cores: our own runnable thread plus one other fits; two others do not. The load
    # averages (here 9.0) are not read: they count the previous run's work too.
    import io
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(engine.time, "sleep", lambda s: None)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(
        f"9.00 9.00 9.00 {running}/300 4242\n") if path == "/proc/loadavg"
        else real_open(path, *a, **k))
    assert engine.cpu_shared() is shared


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    engine.save_checkpoint(str(path), {"model": {"w": torch.ones(2)}, "config": {}})

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        engine.save_checkpoint(str(path), {"model": {"w": torch.zeros(2)}, "config": {}})
    # the old checkpoint is intact and no temp file is left
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]


@requires_pycocotools
def test_evaluate_on_tiny_synthetic_set(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert _run(["evaluate", "--checkpoint", checkpoint, "--num-images", "3",
                 "--output", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    for kind in ("bbox", "segm"):
        assert set(metrics[kind]) >= {"AP", "AP50", "AP75"}
        assert all(-1 <= v <= 1 for v in metrics[kind].values())
    assert "IoU metric: segm" in capsys.readouterr().out


@requires_pycocotools
def test_predict_writes_png_and_json(checkpoint, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)) \
        .save(src)
    out_dir = tmp_path / "pred"
    assert _run(["predict", "--checkpoint", checkpoint, str(src), "--output-dir", str(out_dir),
                 "--score-thresh", "0.0", "--device", "cpu"]) == 0
    with Image.open(out_dir / "in.png") as im:
        im.load()
        assert im.size == (70, 50) and im.mode == "RGB"
    result = json.loads((out_dir / "in.json").read_text())
    assert result["width"] == 70 and result["height"] == 50
    for det in result["detections"]:
        assert len(det["box_xyxy"]) == 4 and 0 <= det["score"] <= 1


# ---------------------------------------------------------------------------------------
# bad input: exit code 2, a message naming the problem, nothing written

def test_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert _run(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"),
                 "--output", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not out.exists()


@requires_pycocotools
def test_malformed_annotation_json(checkpoint, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "bad.json"
    ann.write_text('{"images": [{"id": 1, "file_name"')
    out = tmp_path / "e.json"
    assert _run(["evaluate", "--checkpoint", checkpoint, "--images", str(tmp_path / "imgs"),
                 "--annotations", str(ann), "--output", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_image_in_predict_writes_nothing(checkpoint, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out_dir = tmp_path / "pred"
    assert _run(["predict", "--checkpoint", checkpoint, str(good), str(bad),
                 "--output-dir", str(out_dir)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert not out_dir.exists()


def test_without_pycocotools(checkpoint, tmp_path, capsys, monkeypatch):
    # evaluate and predict (RLE masks in the JSON) exit with 2 naming pycocotools, writing
    # nothing; train on the synthetic set skips its held-out evaluation and says so
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    out = tmp_path / "e.json"
    assert _run(["evaluate", "--checkpoint", checkpoint, "--num-images", "2",
                 "--output", str(out), "--device", "cpu"]) == 2
    assert "pycocotools" in capsys.readouterr().err and not out.exists()
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src)
    assert _run(["predict", "--checkpoint", checkpoint, str(src), "--output-dir",
                 str(tmp_path / "pred"), "--device", "cpu"]) == 2
    assert "pycocotools" in capsys.readouterr().err and not (tmp_path / "pred").exists()
    model = tmp_path / "m.pt"
    assert _run(["train", *TINY[:2], "--image-size", "64", "--batch-size", "2",
                 "--val-images", "2", "--max-steps", "1", "--device", "cpu",
                 "--output", str(model)]) == 0
    assert "no held-out evaluation after training" in capsys.readouterr().out
    assert model.exists() and not (tmp_path / "m_eval.json").exists()


class _RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(str(marker)), "config": {}}, evil)
    out = tmp_path / "e.json"
    assert _run(["evaluate", "--checkpoint", str(evil), "--output", str(out)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert _run(["train", *TINY[:-2], "--device", "cuda", "--output", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_cuda_graph_needs_a_cuda_device(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert _run(["train", *TINY[:-2], "--device", "cpu", "--cuda-graph",
                 "--output", str(out)]) == 2
    assert "--cuda-graph needs one process on a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_exit_code_2_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maskrcnn", "predict", "--checkpoint",
                           str(tmp_path / "missing.pt"), str(tmp_path / "missing.png")],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "error: image not found" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_torchrun_ddp_two_processes_on_cpu(tmp_path):
    # 8 images / (2 processes x batch 2) = 2 steps an epoch, each over 4 images. A run
    # stopped after its first step (mid-epoch: each rank skips its own shard's first batch
    # on resume) and resumed ends with the uninterrupted run's weights.
    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "maskrcnn", "train", *TINY, "--epochs", "2",
               "--output", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    whole, part, resumed = tmp_path / "ddp.pt", tmp_path / "part.pt", tmp_path / "resumed.pt"
    proc = torchrun(whole)
    assert "2 process(es), device cpu, 1 thread(s)" in proc.stdout   # one per process
    assert engine.load_checkpoint(str(whole))["step"] == 4
    torchrun(part, "--max-steps", "1")      # step 0's learning rate is the same either way
    state = engine.load_checkpoint(str(part))
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 1)
    torchrun(resumed, "--resume", str(part))
    assert engine.load_checkpoint(str(resumed))["step"] == 4
    assert _same(_weights(str(whole)), _weights(str(resumed)))


@requires_pycocotools
def test_evaluate_on_a_coco_format_folder(checkpoint, tmp_path):
    # a COCO folder made from synthetic images (RLE masks), evaluated through --images
    from maskrcnn.data import SyntheticShapes
    from maskrcnn.evaluation import coco_ground_truth
    ds = SyntheticShapes(3, image_size=64, seed=77)
    gt = coco_ground_truth(ds)
    (tmp_path / "imgs").mkdir()
    for i in range(len(ds)):
        image, _ = ds[i]
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()) \
            .save(tmp_path / "imgs" / f"{i}.png")
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(gt.dataset))
    out = tmp_path / "eval.json"
    assert _run(["evaluate", "--checkpoint", checkpoint, "--images", str(tmp_path / "imgs"),
                 "--annotations", str(ann), "--output", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 3 and set(metrics) >= {"bbox", "segm"}
