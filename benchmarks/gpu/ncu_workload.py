"""The workloads the GPU kit's ncu step profiles: each hot kernel beside its baseline.

    ncu --profile-from-start off --nvtx ... python -m benchmarks.gpu.ncu_workload \\
        --manifest PATH [--budget S]                     # what benchmarks.gpu.ncu runs
    python -m benchmarks.gpu.ncu_workload --device cpu --tiny --manifest PATH   # dry run

One region per (workload, provider), float32, at the shapes Mask R-CNN trains with: RoI
Align forward and backward on a P2 map (2 images x 256 channels x 200 x 304, stride 4),
NCHW and channels_last, box head 7x7 (1024 RoIs) and mask head 14x14 (512 RoIs);
MultiScaleRoIAlign over P2-P5 (1024 boxes, 7x7) forward and backward; nms of 5,000 boxes
and batched_nms of 5,000 boxes in 80 classes; mask_loss (512 RoIs, 91 classes, 28x28)
against gather + BCE and maskrcnn_loss against torchvision's, forward with the logits
requiring a gradient (training: ours computes the gradient in that pass). Each region
runs ``--warmup`` times unprofiled (Triton compiles, the caching allocator fills), then
once between ``cudaProfilerStart`` and ``cudaProfilerStop`` inside an NVTX range named
``<workload>|<provider>``: ncu profiles only those launches, and its ``--print-nvtx-rename
kernel`` names each kernel by its range. Where NVTX is not available a ``torch.cuda._sleep``
marker kernel opens each profiled region instead (``markers`` in the manifest).

Writes a manifest (JSON): the regions in the order they ran with their shapes, and the
workloads left out when ``--budget`` seconds had passed (under ncu each profiled kernel is
replayed many times: a run that stops early still ends normally, so ncu writes its report).
On the CPU (the kit's dry run, kernels on Triton's interpreter at ``--tiny`` sizes) the
regions run without profiler calls: proof that the workload runs, no counters.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from benchmarks import bench_mask_loss, bench_multiscale_roi_align, bench_nms, bench_roi_align
from benchmarks._common import IMAGE

# The kernels ncu profiles inside the regions (`--kernel-name regex:`): ours (Triton's
# names), torchvision's, and the PyTorch kernels the loss baselines and the poolers are
# made of (elementwise, reductions, indexing). Sorts, scans, nonzero and cat are left out:
# both sides' totals count only what this matches.
KERNEL_REGEX = ("roi_align|nms|gather|mask_loss|maskrcnn_loss|elementwise|reduce_kernel|"
                "[Ii]ndex|scatter|spin_kernel")
MARKER = "spin_kernel"      # torch.cuda._sleep's kernel: a region's first launch without NVTX


@dataclass(frozen=True)
class Sizes:
    image: tuple[int, int] = IMAGE
    images: int = 2
    channels: int = 256
    box_rois: int = 512           # per image: 1024 RoIs for the box head
    mask_rois: int = 256          # per image: 512 for the mask head
    boxes: int = 5000
    instances: int = 512
    classes: int = 91


TINY = Sizes(image=(64, 96), images=2, channels=4, box_rois=1, mask_rois=1, boxes=100,
             instances=4, classes=5)


@dataclass
class Workload:
    name: str
    shape: dict
    # provider -> the call ncu profiles; built once, outside the profiled range
    providers: dict[str, Callable[[], object]]


def _grad_call(out: torch.Tensor, inputs: list[torch.Tensor]):
    grad = torch.randn_like(out)
    # allow_unused: a pyramid level no RoI maps to may be outside the baseline's graph
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True, allow_unused=True)


def roi_align(z: Sizes, device: str, layout: str, head: int, mode: str) -> Workload:
    per_image = z.box_rois if head == 7 else z.mask_rois
    x, rois = bench_roi_align.make_inputs(4, torch.float32, device, per_image, z.images,
                                          z.channels, channels_last=layout == "channels_last",
                                          image=z.image)
    args = (head, 0.25, 2, False)
    calls = {"ours": kernels.roi_align, "torchvision": torchvision.ops.roi_align}
    providers = {}
    for name, fn in calls.items():
        if mode == "forward":
            providers[name] = lambda fn=fn: fn(x, rois, *args)
        else:
            leaf = x.detach().requires_grad_()
            providers[name] = _grad_call(fn(leaf, rois, *args), [leaf])
    shape = {"map": list(x.shape), "layout": layout, "rois": rois.shape[0],
             "output": f"{head}x{head}", "sampling_ratio": 2, "stride": 4}
    return Workload(f"roi_align {mode} {head}x{head} {layout}", shape, providers)


def multiscale(z: Sizes, device: str, mode: str) -> Workload:
    x, boxes, shapes = bench_multiscale_roi_align.make_inputs(z.images, z.box_rois,
                                                              torch.float32, device,
                                                              z.channels, image=z.image)
    names = list(x)
    providers = {}
    for name, cls in (("ours", kernels.MultiScaleRoIAlign),
                      ("torchvision", torchvision.ops.MultiScaleRoIAlign)):
        pooler = cls(names, 7, 2)
        if mode == "forward":
            providers[name] = lambda p=pooler: p(x, boxes, shapes)
        else:
            leaves = {n: t.detach().requires_grad_() for n, t in x.items()}
            providers[name] = _grad_call(pooler(leaves, boxes, shapes), list(leaves.values()))
    shape = {"maps": [list(t.shape) for t in x.values()], "rois": sum(len(b) for b in boxes),
             "output": "7x7", "sampling_ratio": 2}
    return Workload(f"MultiScaleRoIAlign {mode} 7x7 4 levels", shape, providers)


def nms(z: Sizes, device: str, classes: int) -> Workload:
    boxes, scores, idxs = bench_nms.make_inputs(z.boxes, classes, torch.float32, device)
    if classes == 1:
        providers = {"ours": lambda: kernels.nms(boxes, scores, 0.5),
                     "torchvision": lambda: torchvision.ops.nms(boxes, scores, 0.5)}
        name = f"nms {z.boxes} boxes"
    else:
        providers = {"ours": lambda: kernels.batched_nms(boxes, scores, idxs, 0.5),
                     "torchvision": lambda: torchvision.ops.batched_nms(boxes, scores, idxs,
                                                                        0.5)}
        name = f"batched_nms {z.boxes} boxes {classes} classes"
    return Workload(name, {"boxes": z.boxes, "classes": classes, "iou_threshold": 0.5},
                    providers)


def mask_losses(z: Sizes, device: str) -> list[Workload]:
    logits, targets, labels, inst = bench_mask_loss.make_instances(
        z.instances, z.classes, torch.float32, device, images=z.images,
        image=(48, 64) if z is TINY else z.image)
    x = logits.detach().requires_grad_()   # training: ours writes the gradient in this pass
    shape = {"N": z.instances, "K": z.classes, "M": bench_mask_loss.M, "logits_grad": True}
    return [
        Workload("mask_loss forward", shape, {
            "ours": lambda: kernels.mask_loss(x, targets, labels),
            "torch": lambda: bench_mask_loss.torch_mask_loss(x, targets, labels)}),
        Workload("maskrcnn_loss forward", shape, {
            "ours": lambda: kernels.maskrcnn_loss(x, *inst),
            "torchvision": lambda: tv_maskrcnn_loss(x, *inst)}),
    ]


def workloads(z: Sizes, device: str):
    """Built lazily, one at a time, in priority order (a run cut by its budget keeps the
    first): RoI Align NCHW, the multi-level pooler, NMS, the losses, RoI Align
    channels_last."""
    for head in (7, 14):
        for mode in ("forward", "backward"):
            yield lambda head=head, mode=mode: roi_align(z, device, "NCHW", head, mode)
    for mode in ("forward", "backward"):
        yield lambda mode=mode: multiscale(z, device, mode)
    yield lambda: nms(z, device, 1)
    yield lambda: nms(z, device, 80)
    yield lambda: mask_losses(z, device)
    for head in (7, 14):
        for mode in ("forward", "backward"):
            yield lambda head=head, mode=mode: roi_align(z, device, "channels_last", head, mode)


class Profiler:
    """cudaProfilerStart/Stop around one call, inside an NVTX range (or after a marker
    kernel where NVTX is missing); nothing but the call on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.nvtx = self.cuda
        if self.cuda:
            try:
                torch.cuda.nvtx.range_push("probe")
                torch.cuda.nvtx.range_pop()
            except Exception:  # a torch built without NVTX: markers instead
                self.nvtx = False

    @contextlib.contextmanager
    def region(self, name: str):
        if not self.cuda:
            yield
            return
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        else:
            torch.cuda._sleep(1)
        try:
            yield
            torch.cuda.synchronize()
        finally:
            if self.nvtx:
                torch.cuda.nvtx.range_pop()
            torch.cuda.profiler.stop()


def run(device: str, tiny: bool, warmup: int, budget: float, only: str | None = None) -> dict:
    z = TINY if tiny else Sizes()
    profiler = Profiler(device)
    manifest = {"device": device, "tiny": tiny, "kernel_regex": KERNEL_REGEX,
                "nvtx": profiler.nvtx, "markers": profiler.cuda and not profiler.nvtx,
                "regions": [], "left_out": []}
    t0 = time.monotonic()
    for build in workloads(z, device):
        if time.monotonic() - t0 > budget:
            manifest["left_out"].append(build)
            continue
        built = build()
        for w in built if isinstance(built, list) else [built]:
            if only and only not in w.name:
                continue
            for provider, call in w.providers.items():
                start = time.monotonic()
                for _ in range(warmup):
                    call()
                with profiler.region(f"{w.name}|{provider}"):
                    call()
                manifest["regions"].append({"name": f"{w.name}|{provider}", "workload": w.name,
                                            "provider": provider, "shape": w.shape,
                                            "seconds": round(time.monotonic() - start, 2)})
                print(f"{w.name:45s} {provider:12s} {time.monotonic() - start:6.1f} s",
                      flush=True)
        del built
    manifest["left_out"] = len(manifest["left_out"])
    manifest["seconds"] = round(time.monotonic() - t0, 1)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True, help="where the regions are listed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="shapes for Triton's CPU interpreter")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled runs of each region first")
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds after which no further workload starts")
    p.add_argument("--only", default=None, help="workloads whose name contains this")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    manifest = run(a.device, a.tiny, a.warmup, a.budget, a.only)
    a.manifest.write_text(json.dumps(manifest, indent=1))
    print(f"{len(manifest['regions'])} regions in {manifest['seconds']:.0f} s"
          + (f"; {manifest['left_out']} workload(s) left out for time"
             if manifest["left_out"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
