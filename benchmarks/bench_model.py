"""End to end: our Mask R-CNN (maskrcnn.maskrcnn_resnet50_fpn on kernels) vs torchvision's
maskrcnn_resnet50_fpn with identical weights.

One training step (forward + backward, batch of 2) and one inference pass (batch of 2, 100
detections per image: box_score_thresh=0) at 800x1216 on CUDA. Outputs (losses; boxes,
labels, scores, masks) are checked against torchvision's before timing. On the CPU (and with
--quick) images are 128x192 and proposal counts are cut, so the run takes about a minute.

    python -m benchmarks.bench_model [--quick] [--device cuda] [--amp]
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torchvision

import maskrcnn
from benchmarks._common import default_device, format_table, measure, parity, write_results


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


def run(quick: bool = False, device: str | None = None, write: bool = True,
        amp: bool = False, tiny: bool = False) -> list[dict]:
    """The model in float32 (``amp``: bfloat16 autocast on CUDA)."""
    device = device or default_device()
    if device == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        # shared CPU: multi-threaded kernels mostly wait at barriers (both sides alike)
        torch.set_num_threads(1)
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

    # equality before timing
    torch.manual_seed(1)
    tv.train()
    ref_losses = tv(images, targets)
    torch.manual_seed(1)
    ours.train()
    our_losses = ours(images, targets)

    def same_losses():
        for k in ref_losses:
            torch.testing.assert_close(our_losses[k].float(), ref_losses[k].float(),
                                       rtol=2e-2 if amp else 1e-3, atol=2e-2 if amp else 1e-4,
                                       msg=lambda m, k=k: f"{k}: {m}")

    ref_out, our_out = infer(tv)(), infer(ours)()

    def same_detections():
        for r, o in zip(ref_out, our_out):
            assert torch.equal(o["labels"], r["labels"]), "labels differ"
            torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-3,
                                       atol=1e-2 if not amp else 1)
            torch.testing.assert_close(o["masks"].float(), r["masks"].float(), rtol=1e-2,
                                       atol=1e-2 if not amp else 5e-2)

    match = {"train step": parity(same_losses), "inference": parity(same_detections)}
    rows = []
    for mode, make in (("train step", train_step), ("inference", infer)):
        row = {"mode": mode, "images": len(images), "size": f"{size[0]}x{size[1]}",
               "dtype": "bf16 autocast" if amp and device == "cuda" else "float32",
               "detections": sum(len(o["boxes"]) for o in our_out), "parity": match[mode]}
        for provider, model in (("ours", ours), ("torchvision", tv)):
            measure(row, provider, make(model), device, None, reps)
        row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
        if row["ours_peak_bytes"] and row["torchvision_peak_bytes"]:
            row["memory_ratio"] = row["torchvision_peak_bytes"] / row["ours_peak_bytes"]
        rows.append(row)
    if write:
        path = write_results("model", rows, {"size": size, "images": len(images), **{
            k: v for k, v in kwargs.items()}, "amp": amp}, device)
        print(f"results: {path}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small images, fewer repeats")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    a = p.parse_args(argv)
    rows = run(a.quick, device=a.device, amp=a.amp)
    print(format_table(rows, ["mode", "size", "dtype", "detections", "ours_ms",
                              "torchvision_ms", "speedup", "ours_peak_bytes",
                              "torchvision_peak_bytes"]))


if __name__ == "__main__":
    main()
