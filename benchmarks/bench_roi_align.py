"""RoI Align: ours vs torchvision.ops.roi_align at Mask R-CNN training shapes.

2 images, 256 channels, the four FPN maps of an 800x1216 image (strides 4..32), 512 RoIs
per image pooled from each map; 7x7 (box head) and 14x14 (mask head), sampling ratio 2.
Modes: forward, forward+backward, and forward+backward with deterministic algorithms on.
Layouts: NCHW and channels_last maps (the deterministic mode in NCHW float32 only: its
torchvision baseline, a Python loop, takes 75-350 ms a call on an H200, and the GPU kit's
budget holds one case of it). On CUDA both run their CUDA kernels; on the CPU ours is our CPU path
(torchvision's kernel from a thread pool, bfloat16 upcast to float32) and torchvision its
CPU kernel (which has no bfloat16).

    python -m benchmarks.bench_roi_align [--quick] [--dtype float32,bfloat16]
                                         [--layout NCHW,channels_last]
"""
from __future__ import annotations

import itertools

import torch
import torchvision

import kernels
from kernels._utils import deterministic_algorithms
from benchmarks._common import (CPU_REPS, DTYPES, IMAGE, cli, default_device, measure, parity,
                                torchvision_as_autocast, write_results)

LEVELS = {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
HEADS = {"box 7x7": 7, "mask 14x14": 14}


# "deterministic": torch.use_deterministic_algorithms(True) — our atomic-free backward;
# torchvision's answer on CUDA is its pure-Python fallback.
MODES = ("forward", "forward+backward", "forward+backward deterministic")
LAYOUTS = ("NCHW", "channels_last")


def make_inputs(level_stride: int, dtype: torch.dtype, device: str, rois_per_image=512,
                images=2, channels=256, channels_last=False, seed=0, image=IMAGE):
    g = torch.Generator().manual_seed(seed)
    h, w = image[0] // level_stride, image[1] // level_stride
    x = torch.randn(images, channels, h, w, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    k = rois_per_image * images
    xy = torch.rand(k, 2, generator=g) * torch.tensor([image[1], image[0]]) * 0.9
    wh = (torch.rand(k, 2, generator=g) * 0.25 + 0.02) * torch.tensor([image[1], image[0]])
    batch = torch.arange(images).repeat_interleave(rois_per_image)[:, None].float()
    rois = torch.cat([batch, xy, xy + wh], 1).to(device=device, dtype=torch.float32)
    return x, rois


def moved_bytes(x: torch.Tensor, k: int, out_size: int, mode: str) -> int:
    """Bytes that must move at least once: outputs written, the sampled input read."""
    out = k * x.shape[1] * out_size * out_size * x.element_size()
    if mode == "forward":
        return out + min(x.numel() * x.element_size(), 4 * out)
    # backward also reads grad_out and writes the whole input gradient
    return 2 * out + x.numel() * x.element_size() + 2 * min(x.numel() * x.element_size(), 4 * out)


def run(quick: bool = False, dtypes=("float32", "bfloat16"), device: str | None = None,
        layouts=LAYOUTS, write: bool = True, tiny: bool = False) -> list[dict]:
    device = device or default_device()
    small = quick and device == "cpu"
    levels = ({"P4": 16} if small or tiny else {"P2": 4, "P4": 16}) if quick else LEVELS
    rois_per_image = 4 if tiny else 64 if small else 512
    image, channels = ((128, 192), 16) if tiny else (IMAGE, 256)
    reps = 1 if tiny else CPU_REPS if device == "cpu" else None
    rows = []
    for dname, layout, (lname, stride) in itertools.product(dtypes, layouts, levels.items()):
        dtype = DTYPES[dname]
        x, rois = make_inputs(stride, dtype, device, rois_per_image, channels=channels,
                              channels_last=layout == "channels_last", image=image)
        for hname, size in HEADS.items():
            args = (size, 1.0 / stride, 2, False)
            # torchvision's CPU kernel has no bfloat16: compare with it in float32; on
            # CUDA it runs bfloat16 as under autocast (in float32, cast back)
            tv_ok = not (device == "cpu" and dtype == torch.bfloat16)
            with torchvision_as_autocast(device, dtype):
                ref = torchvision.ops.roi_align(x if tv_ok else x.float(), rois, *args)
            ours = kernels.roi_align(x, rois, *args)
            match = parity(lambda: torch.testing.assert_close(
                ours.float(), ref.float(), rtol=2e-2, atol=2e-2))
            for mode in MODES if (layout, dname) == ("NCHW", "float32") else MODES[:2]:
                row = {"dtype": dname, "layout": layout, "level": lname, "head": hname,
                       "mode": mode, "rois": rois.shape[0], "map": f"{x.shape[2]}x{x.shape[3]}",
                       "parity": match}
                for provider, fn in (("ours", kernels.roi_align),
                                     ("torchvision", torchvision.ops.roi_align)):
                    if provider == "torchvision" and not tv_ok:
                        continue
                    xin = x.detach().requires_grad_(mode != "forward")
                    grad = torch.randn(rois.shape[0], x.shape[1], size, size,
                                       device=device, dtype=dtype)

                    def step(fn=fn, xin=xin, grad=grad, mode=mode, provider=provider):
                        with deterministic_algorithms(mode == "forward+backward deterministic"):
                            with torchvision_as_autocast(device, dtype, provider):
                                out = fn(xin, rois, *args)
                            if mode != "forward":
                                out.backward(grad)
                                xin.grad = None
                    measure(row, provider, step, device,
                            moved_bytes(x, rois.shape[0], size, mode), reps)
                if "torchvision_ms" in row:
                    row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
                rows.append(row)
    if write:
        path = write_results("roi_align", rows, {"image": image, "channels": channels,
                                                 "images": 2, "rois_per_image": rois_per_image,
                                                 "sampling_ratio": 2, "aligned": False,
                                                 "layouts": list(layouts)}, device)
        print(f"results: {path}")
    return rows


main = cli(__doc__, run, ["dtype", "layout", "level", "head", "mode", "ours_ms",
                          "torchvision_ms", "speedup", "ours_GBps", "torchvision_GBps"],
           layouts=LAYOUTS)


if __name__ == "__main__":
    main()
