"""MultiScaleRoIAlign: ours (one launch for all FPN levels) vs torchvision's (one roi_align
per level plus index gather/scatter), at Mask R-CNN shapes.

Feature pyramid of an 800x1216 batch: four 256-channel maps, strides 4..32. Proposals with
log-uniform sizes (16..800 px) so every level gets RoIs. Cases:
  train box  : 2 images x 512 RoIs, 7x7, forward and forward+backward
  train mask : 2 images x 128 RoIs, 14x14, forward and forward+backward
  infer box  : 1 image x 1000 RoIs, 7x7, forward
  infer mask : 1 image x 100 RoIs, 14x14, forward
Sampling ratio 2, as torchvision's Mask R-CNN. On CUDA both run their GPU kernels; on the CPU
ours is our CPU path (torchvision's kernel from a thread pool, bfloat16 upcast to float32)
and torchvision its CPU kernel (which has no bfloat16).

    python -m benchmarks.bench_multiscale_roi_align [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torchvision

import kernels
from benchmarks._common import (CPU_REPS, DTYPES, IMAGE, cli, default_device, measure, parity,
                                torchvision_as_autocast, write_results)

STRIDES = (4, 8, 16, 32)
NAMES = ["0", "1", "2", "3"]
# name: (images, RoIs per image, output size, modes)
CASES = {
    "train box": (2, 512, 7, ("forward", "forward+backward")),
    "train mask": (2, 128, 14, ("forward", "forward+backward")),
    "infer box": (1, 1000, 7, ("forward",)),
    "infer mask": (1, 100, 14, ("forward",)),
}


def make_inputs(images: int, rois_per_image: int, dtype: torch.dtype, device: str,
                channels: int = 256, channels_last: bool = False, seed: int = 0,
                image=IMAGE):
    g = torch.Generator().manual_seed(seed)
    x = OrderedDict()
    for name, stride in zip(NAMES, STRIDES):
        t = torch.randn(images, channels, image[0] // stride, image[1] // stride, generator=g)
        t = t.to(device=device, dtype=dtype)
        x[name] = t.contiguous(memory_format=torch.channels_last) if channels_last else t
    boxes = []
    for _ in range(images):
        # log-uniform sides, 20 to 800 px (or the image's size): every level gets RoIs
        top = min(6.7, math.log(max(image)))
        side = torch.exp(torch.empty(rois_per_image).uniform_(3.0, top, generator=g))
        aspect = torch.exp(torch.empty(rois_per_image).uniform_(-0.7, 0.7, generator=g))
        wh = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], 1)
        xy = torch.rand(rois_per_image, 2, generator=g) * torch.tensor([image[1], image[0]])
        boxes.append(torch.cat([xy - wh / 2, xy + wh / 2], 1).clamp(min=0).to(device))
    return x, boxes, [image] * images


def moved_bytes(x: dict, k: int, out_size: int, mode: str) -> int:
    """Bytes that must move at least once: outputs written, sampled inputs read (and in
    backward, grad_out read and every map's gradient written)."""
    first = next(iter(x.values()))
    feat = sum(t.numel() for t in x.values()) * first.element_size()
    out = k * first.shape[1] * out_size * out_size * first.element_size()
    if mode == "forward":
        return out + min(feat, 4 * out)
    return 2 * out + feat + 2 * min(feat, 4 * out)


def run(quick: bool = False, dtypes=("float32", "bfloat16"), device: str | None = None,
        channels_last: bool = False, write: bool = True, tiny: bool = False) -> list[dict]:
    device = device or default_device()
    on_cpu = device == "cpu"
    reps = 1 if tiny else CPU_REPS if on_cpu else None
    cases = {k: v for k, v in CASES.items() if not (quick or tiny) or k.startswith("train")}
    image, channels = ((128, 192), 8) if tiny else (IMAGE, 256)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        # torchvision's CPU kernel has no bfloat16: compare with it in float32 there
        tv_ok = not (on_cpu and dtype == torch.bfloat16)
        for cname, (images, per_image, size, modes) in cases.items():
            if tiny:
                images, per_image = 1, 6
            elif quick and on_cpu:   # the CPU reference's cost is mostly the maps' size
                images, per_image = 1, max(per_image // 8, 8)
            x, boxes, shapes = make_inputs(images, per_image, dtype, device, channels,
                                           channels_last=channels_last, image=image)
            ours = kernels.MultiScaleRoIAlign(NAMES, size, 2)
            theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, size, 2)
            out = ours(x, boxes, shapes)
            with torchvision_as_autocast(device, dtype):   # CUDA bfloat16: as autocast runs it
                ref = theirs(x if tv_ok else {n: t.float() for n, t in x.items()}, boxes, shapes)
            match = parity(lambda: torch.testing.assert_close(
                out.float(), ref.float(), rtol=2e-2, atol=2e-2))
            k = out.shape[0]
            for mode in modes:
                row = {"dtype": dname, "case": cname, "mode": mode, "rois": k,
                       "size": f"{size}x{size}", "parity": match}
                for provider, pooler in (("ours", ours), ("torchvision", theirs)):
                    if provider == "torchvision" and not tv_ok:
                        continue
                    backward = mode != "forward"
                    xin = {n: t.detach().requires_grad_(backward) for n, t in x.items()}
                    grad = torch.randn(k, out.shape[1], size, size, device=device, dtype=dtype)

                    def step(pooler=pooler, xin=xin, grad=grad, backward=backward,
                             provider=provider):
                        with torchvision_as_autocast(device, dtype, provider):
                            res = pooler(xin, boxes, shapes)
                        if backward:
                            res.backward(grad)
                            for t in xin.values():
                                t.grad = None
                    measure(row, provider, step, device, moved_bytes(x, k, size, mode), reps)
                if "torchvision_ms" in row:
                    row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
                rows.append(row)
    if write:
        path = write_results("multiscale_roi_align", rows, {
            "image": image, "channels": channels, "strides": STRIDES, "sampling_ratio": 2,
            "cases": {k: v[:3] for k, v in cases.items()}, "quick": quick,
            "channels_last": channels_last}, device)
        print(f"results: {path}")
    return rows


main = cli(__doc__, run, ["dtype", "case", "mode", "rois", "ours_ms", "torchvision_ms",
                          "speedup", "ours_peak_bytes", "torchvision_peak_bytes", "ours_GBps"],
           quick_help="training cases only; on the CPU one image and 1/8 of the RoIs",
           channels_last=True)


if __name__ == "__main__":
    main()
