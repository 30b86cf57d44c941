"""Mask pasting: ours vs torchvision's roi_heads.paste_masks_in_image (Mask R-CNN inference).

100 masks of 28x28 (sigmoid probabilities) pasted with padding 1 into an 800x1216 image,
boxes of detection-like sizes (20 to 400 px), some reaching past the image border.
Modes: "float" returns the (N, 1, H, W) probabilities; "threshold" returns the binary masks
(ours: ``threshold=0.5`` in the same pass, bool out; torchvision: paste, then ``> 0.5``).
On CUDA ours is the Triton kernel; on the CPU it is the PyTorch reference path (--quick on
the CPU uses a 200x304 image).

    python -m benchmarks.bench_paste_masks_in_image [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations


import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import kernels
from benchmarks._common import (CPU_REPS, DTYPES, IMAGE, cli, default_device, measure, parity,
                                write_results)

MASKS = 100
MASK_SIZE = 28
THRESHOLD = 0.5


def make_inputs(n: int, image: tuple[int, int], dtype: torch.dtype, device: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image
    masks = torch.randn(n, 1, MASK_SIZE, MASK_SIZE, generator=g).mul(3).sigmoid()
    size = torch.rand(n, 2, generator=g) * 380 + 20
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - size * 0.2
    boxes = torch.cat([xy, xy + size], 1)
    return masks.to(device=device, dtype=dtype), boxes.to(device)


def moved_bytes(masks: torch.Tensor, image: tuple[int, int], out_itemsize: int) -> int:
    """Bytes that must move at least once: the output written, the masks read."""
    written = masks.shape[0] * image[0] * image[1] * out_itemsize
    return written + masks.numel() * masks.element_size()


def check_equal(ours: torch.Tensor, ref: torch.Tensor, mode: str, dtype: torch.dtype,
                masks: torch.Tensor, boxes: torch.Tensor, image: tuple[int, int]):
    """Results must match the baseline before anything is timed."""
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    if mode == "float":
        torch.testing.assert_close(ours.float(), ref.float(), rtol=atol, atol=atol)
        return
    # thresholded: equal to torchvision's except where its float32 probability lies within
    # rounding of the threshold (there low-precision rounding may go either way)
    if ours.shape != ref.shape or ours.dtype != ref.dtype:
        raise AssertionError(f"got {ours.dtype}{tuple(ours.shape)}, "
                             f"torchvision {ref.dtype}{tuple(ref.shape)}")
    prob = tv_paste(masks.float(), boxes, image, 1)
    sure = (prob - THRESHOLD).abs() > 2 * atol
    differ = int((ours != ref)[sure].sum())
    if differ:
        raise AssertionError(f"{differ} thresholded pixels differ from torchvision's")


def run(quick: bool = False, dtypes=("float32", "bfloat16"), device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    device = device or default_device()
    image = (48, 64) if tiny else (200, 304) if quick and device == "cpu" else IMAGE
    count = 6 if tiny else MASKS
    reps = 1 if tiny else CPU_REPS if device == "cpu" else None
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        masks, boxes = make_inputs(count, image, dtype, device)
        providers = {
            "float": {
                "ours": lambda: kernels.paste_masks_in_image(masks, boxes, image, 1),
                "torchvision": lambda: tv_paste(masks, boxes, image, 1),
            },
            "threshold": {
                "ours": lambda: kernels.paste_masks_in_image(masks, boxes, image, 1,
                                                             threshold=THRESHOLD),
                "torchvision": lambda: tv_paste(masks, boxes, image, 1) > THRESHOLD,
            },
        }
        for mode, fns in providers.items():
            ours, ref = fns["ours"](), fns["torchvision"]()
            row = {"dtype": dname, "mode": mode, "masks": count,
                   "image": f"{image[0]}x{image[1]}", "out_dtype": str(ours.dtype)[6:],
                   "parity": parity(lambda: check_equal(ours, ref, mode, dtype, masks, boxes,
                                                        image))}
            nbytes = moved_bytes(masks, image, ours.element_size())
            del ours, ref
            for provider, fn in fns.items():
                measure(row, provider, fn, device, nbytes, reps)
            row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
            rows.append(row)
    if write:
        path = write_results("paste_masks_in_image", rows, {"image": image, "masks": count,
                                                   "mask_size": MASK_SIZE, "padding": 1,
                                                   "threshold": THRESHOLD}, device)
        print(f"results: {path}")
    return rows


def _in_mib(row: dict) -> dict:
    return {**row, **{k.replace("_bytes", "_MiB"): None if row[k] is None else row[k] / 2**20
                      for k in ("ours_peak_bytes", "torchvision_peak_bytes")}}


main = cli(__doc__, run, ["dtype", "mode", "image", "out_dtype", "ours_ms", "torchvision_ms",
                          "speedup", "ours_GBps", "ours_peak_MiB", "torchvision_peak_MiB"],
           quick_help="smaller image on the CPU, fewer repeats", shown=_in_mib)


if __name__ == "__main__":
    main()
