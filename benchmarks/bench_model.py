"""End to end: our Mask R-CNN (maskrcnn.maskrcnn_resnet50_fpn on kernels) vs torchvision's
maskrcnn_resnet50_fpn with identical weights.

One training step (forward + backward, batch of 2) and one inference pass (batch of 2, 100
detections per image: box_score_thresh=0) at 800x1216 on CUDA. Outputs (losses; boxes,
labels, scores, masks) are checked against torchvision's before timing; the losses with
sampling budgets above every candidate count (the samplers then pick the same anchors and
proposals, whatever their draws). On the CPU (and with --quick) images are 128x192 and
proposal counts are cut, so the run takes about a minute.

The whole training step with the SGD update (forward, backward, clipping, SGD with
momentum; each side trains its own copy of the weights) runs eager, compiled (with
``--compiled``) and on CUDA as one CUDA graph replay (``maskrcnn.graphed``), each against
torchvision's eager step, with its host syncs per step (``*_syncs_per_step``) and peak memory.

Our model also runs in its static mode (``static_shapes=True``; on CUDA captured once and
replayed as a CUDA graph) and, with ``--compiled``, under ``torch.compile`` (inference and
training step; compile time excluded, one warm-up call). Every row times torchvision's
eager model, once per mode, in the same run.

    python -m benchmarks.bench_model [--quick] [--device cuda] [--amp] [--compiled]
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torchvision

import maskrcnn
from maskrcnn.engine import cpu_shared
from benchmarks._common import (default_device, format_table, ieee_float32, measure, parity,
                                write_results)


def make_batch(size: tuple[int, int], device: str, images: int = 2, objects: int = 8,
               num_classes: int = 91, seed: int = 0):
    """Random images and rectangle-or-ellipse instances with their boxes and masks."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ims, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for _ in range(images):
        ims.append(torch.rand(3, h, w, generator=g))
        wh = (torch.rand(objects, 2, generator=g) * 0.4 + 0.05) * torch.tensor([w, h])
        xy = torch.rand(objects, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[i] = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(1, num_classes, (objects,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device),
                        "masks": masks.to(device)})
    return [im.to(device) for im in ims], targets


def build_pair(device: str, **kwargs):
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                            **kwargs)
    ours = maskrcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(device), ours.to(device)


@contextlib.contextmanager
def covering_budgets(*models):
    """Sampling budgets above any candidate count, in every sampler of ``models``."""
    samplers = [s for m in models for s in (m.rpn.fg_bg_sampler, m.roi_heads.fg_bg_sampler)]
    saved = [(s.batch_size_per_image, s.positive_fraction) for s in samplers]
    for s in samplers:
        s.batch_size_per_image, s.positive_fraction = 10**9, 0.5
    try:
        yield
    finally:
        for s, (b, f) in zip(samplers, saved):
            s.batch_size_per_image, s.positive_fraction = b, f


def cuda_graph(model, images):
    """``model(images)`` captured once as a CUDA graph: returns the replay."""
    inputs = [im.clone() for im in images]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        model(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outputs = model(inputs)

    def replay():
        graph.replay()
        return outputs
    return replay


def step_syncs(step, device: str, gpu_code_path: bool = False) -> int:
    """Host syncs in one call of ``step``: on CUDA what the sync debug mode reports; on the
    CPU the reads of tensor data that would sync a CUDA host (benchmarks.host), with
    ``gpu_code_path`` on our CUDA code path, its kernels launched dry (what a CUDA host
    would run; the CPU path reads values freely, having no sync to save)."""
    from benchmarks.host import _dry, count_host_work
    with _dry() if gpu_code_path and device != "cuda" else contextlib.nullcontext():
        step()
        with count_host_work(cuda=device == "cuda") as work:
            step()
    return len(work.syncs)


def sgd_step_modes(tv, ours, images, targets, autocast, amp: bool, device: str,
                   compiled: bool, same_losses):
    """The whole training step (forward, backward, gradient clipping, SGD with momentum)
    as a user's loop runs it: torchvision's eager step, ours eager, compiled (with
    ``compiled``) and, on CUDA, replayed as one CUDA graph (``maskrcnn.graphed``). Each
    side trains its own copy of the weights (a step changes them). Returns (mode, ours,
    torchvision, parity) rows."""
    from maskrcnn.graphed import GraphedStep
    lr, clip = 1e-4, 10.0

    def sgd(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return params, torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

    def eager(model, forward=None):
        model = copy.deepcopy(model).train()
        forward = forward(model) if forward else model
        params, opt = sgd(model)

        def step():
            torch.manual_seed(1)
            with autocast():
                losses = forward(images, targets)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return losses
        return step

    def graphed():
        model = copy.deepcopy(ours).train()
        return GraphedStep(model, sgd(model)[1], clip, device, amp=amp)

    def same_graphed_losses():
        # one step's losses from a fresh graph, budgets covering every candidate (the
        # graph's draws then cannot matter), against our eager model's
        step = graphed()
        with covering_budgets(step.model, ours), ieee_float32():
            losses = step(images, targets)
            with autocast():
                expected = ours.train()(images, targets)
        same_losses(losses, expected)

    def same_first_step(forward):
        # one step's losses of a fresh copy, budgets covering every candidate, against
        # torchvision's eager step's
        def check():
            model, theirs = copy.deepcopy(ours).train(), copy.deepcopy(tv).train()
            run = forward(model) if forward else model
            with covering_budgets(model, theirs), ieee_float32(), autocast():
                same_losses(run(images, targets), theirs(images, targets))
        return parity(check)

    tv_step = eager(tv)
    modes = [("train step + SGD", eager(ours), tv_step, same_first_step(None))]
    if compiled:
        modes.append(("train step + SGD (compiled)", eager(ours, torch.compile), tv_step,
                      same_first_step(torch.compile)))
    if device == "cuda":
        step = graphed()
        modes.append(("train step + SGD (CUDA graph)", lambda: step(images, targets),
                      tv_step, parity(same_graphed_losses)))
    return modes


def run(quick: bool = False, device: str | None = None, write: bool = True,
        amp: bool = False, tiny: bool = False, compiled: bool = False) -> list[dict]:
    """The model in float32 (``amp``: bfloat16 autocast on CUDA)."""
    device = device or default_device()
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_shared():
        # shared CPU: multi-threaded kernels mostly wait at barriers (both sides alike)
        torch.set_num_threads(1)
    try:
        return _run(quick, device, write, amp, tiny, compiled)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: str, write: bool, amp: bool, tiny: bool,
         compiled: bool) -> list[dict]:
    small = quick or tiny or device == "cpu"
    size = (64, 96) if tiny else (128, 192) if small else (800, 1216)
    kwargs = dict(min_size=size[0], max_size=size[1], box_score_thresh=0.0,
                  box_detections_per_img=5 if tiny else 100)
    if small:
        top = (30, 10) if tiny else (300, 200)
        kwargs.update(rpn_pre_nms_top_n_train=top[0], rpn_post_nms_top_n_train=top[1],
                      rpn_pre_nms_top_n_test=top[0], rpn_post_nms_top_n_test=top[1],
                      box_batch_size_per_image=16 if tiny else 128)
    reps = 1 if tiny else 3 if device == "cpu" else None
    tv, ours = build_pair(device, **kwargs)
    images, targets = make_batch(size, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and device == "cuda" \
        else contextlib.nullcontext

    def train_step(model):
        def step():
            model.train()
            torch.manual_seed(1)  # same proposal sampling for both models
            with autocast():
                losses = model(images, targets)
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)
            return losses
        return step

    def infer(model):
        @torch.no_grad()
        def step():
            model.eval()
            with autocast():
                return model(images)
        return step

    # equality before timing, in IEEE float32: cuDNN's default TF32 turns the ops' float32
    # rounding differences into other detections (measured on an H200); timed with defaults
    with covering_budgets(tv, ours), ieee_float32():
        ref_losses = tv.train()(images, targets)
        our_losses = ours.train()(images, targets)

    def same_losses(losses, expected):
        for k in expected:
            torch.testing.assert_close(losses[k].float(), expected[k].float(),
                                       rtol=2e-2 if amp else 1e-3, atol=2e-2 if amp else 1e-4,
                                       msg=lambda m, k=k: f"{k}: {m}")

    with ieee_float32():
        ref_exact, our_exact = infer(tv)(), infer(ours)()
    our_out = infer(ours)()   # with the defaults, as the static model runs

    def same_detections(out):
        for r, o in zip(ref_exact, out):
            assert torch.equal(o["labels"], r["labels"]), "labels differ"
            torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-3,
                                       atol=1e-2 if not amp else 1)
            torch.testing.assert_close(o["masks"].float(), r["masks"].float(), rtol=1e-2,
                                       atol=1e-2 if not amp else 5e-2)

    static = maskrcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                            static_shapes=True, **kwargs).to(device)
    static.load_state_dict(ours.state_dict())
    static.eval()
    static_infer = cuda_graph(static, images) if device == "cuda" and not amp else infer(static)

    def same_static_rows():
        for o, s in zip(our_out, static_infer()):
            n = int(s["num_detections"])
            assert n == len(o["boxes"]), f"{n} static rows, {len(o['boxes'])} detections"
            for k in ("boxes", "labels", "scores", "masks"):
                torch.testing.assert_close(s[k][:n], o[k], msg=lambda m, k=k: f"{k}: {m}")

    static_mode = "inference (static, CUDA graph)" if device == "cuda" and not amp \
        else "inference (static)"
    modes = [("train step", train_step(ours),
              parity(lambda: same_losses(our_losses, ref_losses))),
             ("inference", infer(ours), parity(lambda: same_detections(our_exact))),
             (static_mode, static_infer, parity(same_static_rows))]
    if compiled:
        fast = torch.compile(ours)

        def same_compiled_losses():
            # compiled graphs draw their random numbers in their own order: compare with
            # budgets that sample every candidate, as against torchvision above
            with covering_budgets(ours):
                same_losses(train_step(fast)(), train_step(ours)())

        def same_compiled_scores():
            # Inductor's fused arithmetic moves scores by rounding, which reorders the
            # near-ties of random weights: the same count and the same sorted scores as our
            # eager model now (training steps have moved its BatchNorm statistics).
            for o, c in zip(infer(ours)(), infer(fast)()):
                assert len(c["scores"]) == len(o["scores"]), "detection counts differ"
                torch.testing.assert_close(c["scores"].sort().values,
                                           o["scores"].sort().values, rtol=1e-3, atol=1e-5)

        modes += [("train step (compiled)", train_step(fast), parity(same_compiled_losses)),
                  ("inference (compiled)", infer(fast), parity(same_compiled_scores))]
    sgd_modes = sgd_step_modes(tv, ours, images, targets, autocast, amp, device, compiled,
                               same_losses)
    rows = []
    detections = sum(len(o["boxes"]) for o in our_out)
    timed = [(mode, ours_fn, (train_step if mode.startswith("train") else infer)(tv), match,
              detections) for mode, ours_fn, match in modes]
    timed += [(mode, ours_fn, tv_fn, match, "-") for mode, ours_fn, tv_fn, match in sgd_modes]
    for mode, ours_fn, tv_fn, match, found in timed:
        row = {"mode": mode, "images": len(images), "size": f"{size[0]}x{size[1]}",
               "dtype": "bf16 autocast" if amp and device == "cuda" else "float32",
               "detections": found, "parity": match}
        if device == "cpu":
            row["threads"] = torch.get_num_threads()
        measure(row, "ours", ours_fn, device, None, reps)
        measure(row, "torchvision", tv_fn, device, None, reps)
        row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
        if row["ours_peak_bytes"] and row["torchvision_peak_bytes"]:
            row["memory_ratio"] = row["torchvision_peak_bytes"] / row["ours_peak_bytes"]
        if "SGD" in mode:     # the whole step: its host syncs, ours on the CUDA code path
            row["ours_syncs_per_step"] = step_syncs(ours_fn, device, gpu_code_path=True)
            row["torchvision_syncs_per_step"] = step_syncs(tv_fn, device)
        rows.append(row)
    if write:
        path = write_results("model", rows, {"size": size, "images": len(images), **{
            k: v for k, v in kwargs.items()}, "amp": amp, "compiled": compiled}, device)
        print(f"results: {path}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small images, fewer repeats")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--compiled", action="store_true",
                   help="also torch.compile'd inference and training step")
    a = p.parse_args(argv)
    rows = run(a.quick, device=a.device, amp=a.amp, compiled=a.compiled)
    print(format_table(rows, ["mode", "size", "dtype", "detections", "ours_ms",
                              "torchvision_ms", "speedup", "ours_peak_bytes",
                              "torchvision_peak_bytes"]))


if __name__ == "__main__":
    main()
