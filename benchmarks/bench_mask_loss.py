"""Mask losses: ours vs the PyTorch / torchvision paths at Mask R-CNN training shapes.

Three comparisons, each forward and forward+backward, at N in {128, 512} instances,
K in {2, 91} classes, M = 28:

* ``mask_loss``: ours vs gather + ``F.binary_cross_entropy_with_logits`` (provider "torch").
* ``maskrcnn_loss``: ours (targets sampled inside the loss kernel) vs torchvision's
  ``roi_heads.maskrcnn_loss`` (roi_align of the gt masks, then the loss), 2 images of
  800x1216 with 16 uint8 gt masks each and N/2 proposals per image.
* ``fused_mask_predictor_loss``: ours vs ``F.conv2d`` (1x1, 256 channels) + gather + BCE.
  Memory columns (CUDA): ``*_peak_bytes``, the step's high-water mark above what existed
  before; ``*_scratch_bytes``, that peak less the parameter gradients every provider must
  return (the features' gradient alone is N x 256 x M x M); ``*_held_bytes``, what the
  forward keeps alive for the backward.

On CUDA every provider runs its CUDA kernels; on the CPU ours is the PyTorch reference path
(or the Triton interpreter under TRITON_INTERPRET=1, very slow) and peak memory is not
measured.

    python -m benchmarks.bench_mask_loss [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from benchmarks._common import default_device, format_table, measure, parity, write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
M = 28
CHANNELS = 256
IMAGE = (800, 1216)
MASKS_PER_IMAGE = 16


def torch_mask_loss(logits, targets, labels):
    n = logits.shape[0]
    return F.binary_cross_entropy_with_logits(
        logits[torch.arange(n, device=labels.device), labels], targets)


def torch_predictor_loss(features, weight, bias, targets, labels):
    return torch_mask_loss(F.conv2d(features, weight, bias), targets, labels)


def make_instances(n: int, k: int, dtype, device, images: int = 2, seed: int = 0,
                   image=IMAGE):
    """Logits, soft targets, labels, and the maskrcnn_loss inputs for n instances."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, M, M, generator=g) * 2).to(device=device, dtype=dtype)
    targets = torch.rand(n, M, M, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n,), generator=g).to(device)
    per_image = [n // images + (i < n % images) for i in range(images)]
    proposals, gt_masks, gt_labels, idxs = [], [], [], []
    h, w = image
    for r in per_image:
        # soft-edged blobs thresholded to uint8, as instance masks are
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cy, cx = torch.rand(MASKS_PER_IMAGE, generator=g) * h, torch.rand(MASKS_PER_IMAGE,
                                                                             generator=g) * w
        rad = (torch.rand(MASKS_PER_IMAGE, generator=g) * 0.2 + 0.05) * min(h, w)
        masks = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
                 < rad[:, None, None] ** 2).to(torch.uint8)
        xy = torch.rand(r, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = (torch.rand(r, 2, generator=g) * 0.2 + 0.03) * torch.tensor([w, h])
        proposals.append(torch.cat([xy, xy + wh], 1).to(device))
        gt_masks.append(masks.to(device))
        gt_labels.append(torch.randint(0, k, (MASKS_PER_IMAGE,), generator=g).to(device))
        idxs.append(torch.randint(0, MASKS_PER_IMAGE, (r,), generator=g).to(device))
    return logits, targets, labels, (proposals, gt_masks, gt_labels, idxs)


def held_bytes(forward, device: str) -> int | None:
    """Memory the forward leaves allocated while its output (and graph) is alive."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del out
    return held


def _time_providers(row, providers, mode, device, reps, nbytes):
    for name, (forward, params) in providers.items():
        def step(forward=forward, params=params):
            loss = forward()
            if mode != "forward":
                loss.backward()
                for p in params:
                    p.grad = None
        measure(row, name, step, device, nbytes, reps)
        peak = row[f"{name}_peak_bytes"]
        # beyond the gradients both providers must return: the op's own scratch memory
        grads = sum(p.numel() * p.element_size() for p in params)
        row[f"{name}_scratch_bytes"] = (peak - grads if peak is not None and mode != "forward"
                                        else peak)
        row[f"{name}_held_bytes"] = held_bytes(forward, device) if mode != "forward" else None
    base = next(p for p in providers if p != "ours")
    row["baseline"] = base
    row["speedup"] = row[f"{base}_ms"] / row["ours_ms"]
    if row["ours_peak_bytes"]:
        row["memory_ratio"] = row[f"{base}_peak_bytes"] / row["ours_peak_bytes"]
    if row["ours_scratch_bytes"]:
        row["scratch_ratio"] = row[f"{base}_scratch_bytes"] / row["ours_scratch_bytes"]
    if row.get("ours_held_bytes"):
        row["held_ratio"] = row[f"{base}_held_bytes"] / row["ours_held_bytes"]


def _check_equal(ours, base, dtype):
    """Loss and every gradient of ours vs the baseline (each a (forward, params) pair),
    before anything is timed."""
    atol = 2e-2 if dtype != torch.float32 else 1e-4
    loss_o, grads_o = _loss_and_grads(*ours)
    loss_b, grads_b = _loss_and_grads(*base)
    torch.testing.assert_close(loss_o.float(), loss_b.float(), rtol=atol, atol=atol)
    for go, gb in zip(grads_o, grads_b):
        scale = gb.float().abs().max().clamp(min=1e-30)
        torch.testing.assert_close(go.float() / scale, gb.float() / scale, rtol=atol, atol=atol)


def _loss_and_grads(forward, params):
    for p in params:
        p.grad = None
    loss = forward()
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def run(quick: bool = False, dtypes=None, device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    """dtypes: default float32 and bfloat16 (float32 only for --quick on the CPU)."""
    device = device or default_device()
    small = quick and device == "cpu"
    dtypes = dtypes or (("float32",) if small else ("float32", "bfloat16"))
    sizes = (4,) if tiny else (128,) if small else (128, 512)
    image = (48, 64) if tiny else (400, 608) if small else IMAGE
    channels = 8 if tiny else CHANNELS
    reps = 1 if tiny else 3 if device == "cpu" else None
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n in sizes:
            for k in (2, 91):
                logits, targets, labels, inst = make_instances(n, k, dtype, device, image=image)
                x = logits.detach().requires_grad_()
                e = logits.element_size()
                loss_bytes = n * M * M * (2 * e) + n * k * M * M * e   # selected + targets + grad

                # --- mask_loss vs gather + BCE
                ours = (partial(kernels.mask_loss, x, targets, labels), [x])
                base = (partial(torch_mask_loss, x, targets, labels), [x])
                match = parity(partial(_check_equal, ours, base, dtype))
                for mode in ("forward", "forward+backward"):
                    row = {"op": "mask_loss", "dtype": dname, "N": n, "K": k, "M": M,
                           "mode": mode, "parity": match}
                    _time_providers(row, {"ours": ours, "torch": base}, mode, device, reps,
                                    loss_bytes if mode != "forward" else 2 * n * M * M * e)
                    rows.append(row)

                # --- maskrcnn_loss vs torchvision (the reference CPU path of ours builds the
                # targets densely too; on the CPU only float32 is compared, as torchvision's
                # CPU roi_align lacks bfloat16)
                if not (device == "cpu" and dtype != torch.float32):
                    ours = (partial(kernels.maskrcnn_loss, x, *inst), [x])
                    base = (partial(tv_maskrcnn_loss, x, *inst), [x])
                    match = parity(partial(_check_equal, ours, base, dtype))
                    for mode in ("forward", "forward+backward"):
                        row = {"op": "maskrcnn_loss", "dtype": dname, "N": n, "K": k, "M": M,
                               "mode": mode, "parity": match}
                        _time_providers(row, {"ours": ours, "torchvision": base}, mode, device,
                                        reps, loss_bytes if mode != "forward"
                                        else 2 * n * M * M * e)
                        rows.append(row)

                # --- fused predictor vs conv2d + gather + BCE
                g = torch.Generator().manual_seed(1)
                feats = torch.randn(n, channels, M, M, generator=g).to(device, dtype)
                feats.requires_grad_()
                weight = (torch.randn(k, channels, 1, 1, generator=g) / 16).to(device, dtype)
                bias = torch.zeros(k).to(device, dtype)
                weight.requires_grad_()
                bias.requires_grad_()
                params = [feats, weight, bias]
                ours = (partial(kernels.fused_mask_predictor_loss, feats, weight, bias, targets,
                                labels), params)
                base = (partial(torch_predictor_loss, feats, weight, bias, targets, labels),
                        params)
                match = parity(partial(_check_equal, ours, base, dtype))
                fbytes = feats.numel() * e
                for mode in ("forward", "forward+backward"):
                    row = {"op": "fused_mask_predictor_loss", "dtype": dname, "N": n, "K": k,
                           "M": M, "C": channels, "mode": mode, "parity": match}
                    _time_providers(row, {"ours": ours, "torch": base}, mode, device, reps,
                                    fbytes * (2 if mode != "forward" else 1))
                    rows.append(row)
                del feats, weight, bias, x, logits
    if write:
        path = write_results("mask_loss", rows, {"M": M, "channels": channels,
                                                 "image": image,
                                                 "masks_per_image": MASKS_PER_IMAGE,
                                                 "images": 2}, device)
        print(f"results: {path}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--dtype", default=None, help="default: float32,bfloat16")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    rows = run(a.quick, a.dtype.split(",") if a.dtype else None, a.device)
    print(format_table(rows, ["op", "dtype", "N", "K", "mode", "baseline", "ours_ms",
                              "torch_ms", "torchvision_ms", "speedup", "ours_peak_bytes",
                              "memory_ratio", "scratch_ratio", "held_ratio", "ours_GBps"]))


if __name__ == "__main__":
    main()
