"""Mask losses: ours vs the PyTorch / torchvision paths at Mask R-CNN training shapes.

Two comparisons, each forward and forward+backward, at N in {128, 512} instances,
K in {2, 91} classes, M = 28 (the fused predictor + loss: ``bench_mask_predictor_loss``):

* ``mask_loss``: ours vs gather + ``F.binary_cross_entropy_with_logits`` (provider "torch").
* ``maskrcnn_loss``: ours (targets sampled inside the loss kernel) vs torchvision's
  ``roi_heads.maskrcnn_loss`` (roi_align of the gt masks, then the loss), 2 images of
  800x1216 with 16 uint8 gt masks each and N/2 proposals per image.
Forward+backward rows end by touching every page of the returned gradient (``consume``),
for every provider. Memory columns (CUDA): ``*_peak_bytes``, the step's high-water mark
above what existed before; ``*_scratch_bytes``, that peak less the gradients every provider
must return; ``*_held_bytes``, what the forward keeps alive for the backward.

On CUDA every provider runs its CUDA kernels; on the CPU ours is our CPU path (PyTorch
operations, ``kernels._cpu``; the Triton interpreter under TRITON_INTERPRET=1, very slow) and peak memory is not
measured.

    python -m benchmarks.bench_mask_loss [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from benchmarks._common import (CPU_REPS, DTYPES, IMAGE, cli, default_device, measure, parity,
                                write_results)

M = 28
MASKS_PER_IMAGE = 16


def torch_mask_loss(logits, targets, labels):
    n = logits.shape[0]
    return F.binary_cross_entropy_with_logits(
        logits[torch.arange(n, device=labels.device), labels], targets)


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


PAGE = 4096


def consume(grad):
    """Touch every memory page of the returned gradient (one element a page), as the
    layer before the loss, which reads it, does in training. The CPU path's large gradient
    is fresh zero pages (``kernels._cpu.LAZY_ZEROS_BYTES``) whose mapping is deferred to the
    first access: untouched, its rows would leave out that cost. One element a page keeps
    the touch itself on one thread (a parallel read would leave the main thread's OpenMP
    workers spinning into the next repeat, a cost no other benchmark's loop has)."""
    step = max(1, PAGE // grad.element_size())
    return grad.as_strided((-(-grad.numel() // step),), (step,)).sum()


def time_providers(row, providers, mode, device, reps, nbytes):
    for name, (forward, params) in providers.items():
        def step(forward=forward, params=params):
            loss = forward()
            if mode != "forward":
                loss.backward()
                for p in params:
                    consume(p.grad)
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


def time_modes(rows: list, row: dict, providers: dict, device, reps,
               nbytes: tuple[int, int]) -> None:
    """Time ``providers`` in forward and in forward+backward (``nbytes``: the bytes each
    mode moves), appending one row per mode (``row``'s fields plus the timings)."""
    for mode, moved in zip(("forward", "forward+backward"), nbytes):
        timed = {**row, "mode": mode}
        time_providers(timed, providers, mode, device, reps, moved)
        rows.append(timed)


def check_equal(ours, base, dtype):
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


def settings(quick: bool, dtypes, device: str | None, tiny: bool):
    """(device, repeats, image size, cases) of both mask-loss benchmarks; cases are
    (dtype name, dtype, instances, classes): float32 and bfloat16 by default (float32 only
    for --quick on the CPU), N in {128, 512}, K in {2, 91}."""
    device = device or default_device()
    small = quick and device == "cpu"
    dtypes = dtypes or (("float32",) if small else ("float32", "bfloat16"))
    sizes = (4,) if tiny else (128,) if small else (128, 512)
    image = (48, 64) if tiny else (400, 608) if small else IMAGE
    cases = [(d, DTYPES[d], n, k) for d in dtypes for n in sizes for k in (2, 91)]
    return device, 1 if tiny else CPU_REPS if device == "cpu" else None, image, cases


def run(quick: bool = False, dtypes=None, device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    """dtypes: default float32 and bfloat16 (float32 only for --quick on the CPU)."""
    device, reps, image, cases = settings(quick, dtypes, device, tiny)
    rows = []
    for dname, dtype, n, k in cases:
        logits, targets, labels, inst = make_instances(n, k, dtype, device, image=image)
        x = logits.detach().requires_grad_()
        e = logits.element_size()
        loss_bytes = n * M * M * (2 * e) + n * k * M * M * e   # selected + targets + grad

        # --- mask_loss vs gather + BCE
        ours = (partial(kernels.mask_loss, x, targets, labels), [x])
        base = (partial(torch_mask_loss, x, targets, labels), [x])
        shape = {"dtype": dname, "N": n, "K": k, "M": M}
        nbytes = (2 * n * M * M * e, loss_bytes)
        time_modes(rows, {"op": "mask_loss", **shape, "parity": parity(
            partial(check_equal, ours, base, dtype))}, {"ours": ours, "torch": base},
            device, reps, nbytes)

        # --- maskrcnn_loss vs torchvision (the reference CPU path of ours builds the
        # targets densely too; on the CPU only float32 is compared, as torchvision's
        # CPU roi_align lacks bfloat16)
        if not (device == "cpu" and dtype != torch.float32):
            ours = (partial(kernels.maskrcnn_loss, x, *inst), [x])
            base = (partial(tv_maskrcnn_loss, x, *inst), [x])
            time_modes(rows, {"op": "maskrcnn_loss", **shape, "parity": parity(
                partial(check_equal, ours, base, dtype))},
                {"ours": ours, "torchvision": base}, device, reps, nbytes)

        del x, logits
    if write:
        path = write_results("mask_loss", rows, {"M": M, "image": image,
                                                 "masks_per_image": MASKS_PER_IMAGE,
                                                 "images": 2}, device)
        print(f"results: {path}")
    return rows


main = cli(__doc__, run, ["op", "dtype", "N", "K", "mode", "baseline", "ours_ms", "torch_ms",
                          "torchvision_ms", "speedup", "ours_peak_bytes", "ours_GBps"],
           dtype=None)


if __name__ == "__main__":
    main()
