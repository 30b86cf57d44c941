"""The fused mask predictor + loss, forward and forward+backward at Mask R-CNN training
shapes (N in {128, 512} instances, K in {2, 91} classes, M = 28, 256 channels):

* ``mask_predictor_loss``: ours vs ``F.conv2d`` (1x1) + gather + BCE (provider "torch").
* ``maskrcnn_predictor_loss``: ours (targets sampled from the uint8 gt masks inside the
  kernel) vs torchvision's ``maskrcnn_loss`` on ``F.conv2d`` logits (float copies of the gt
  masks, roi_align targets, gather, BCE): ``bench_mask_loss``'s instances, 2 images of
  800x1216 with 16 gt masks each (float32 only on the CPU, as there).
Memory columns (CUDA) as in ``bench_mask_loss``: the features' gradient alone, which every
provider returns, is N x 256 x M x M.

    python -m benchmarks.bench_mask_predictor_loss [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

import kernels
from benchmarks._common import cli, ieee_float32, parity, write_results
from benchmarks.bench_mask_loss import (M, MASKS_PER_IMAGE, check_equal, make_instances,
                                        settings, time_modes, torch_mask_loss)

CHANNELS = 256


def torch_predictor_loss(features, weight, bias, targets, labels):
    return torch_mask_loss(F.conv2d(features, weight, bias), targets, labels)


def torchvision_predictor_loss(features, weight, bias, *instances):
    return tv_maskrcnn_loss(F.conv2d(features, weight, bias), *instances)


def checked(ours, base, dtype):
    """Parity of ours with the baseline, the baseline's 1x1 convolution in IEEE float32."""
    with ieee_float32():
        return parity(partial(check_equal, ours, base, dtype))


def run(quick: bool = False, dtypes=None, device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    """dtypes: as ``bench_mask_loss.settings``."""
    device, reps, image, cases = settings(quick, dtypes, device, tiny)
    channels = 8 if tiny else CHANNELS
    rows = []
    for dname, dtype, n, k in cases:
        _, targets, labels, inst = make_instances(n, k, dtype, device, image=image)
        e = targets.element_size()
        g = torch.Generator().manual_seed(1)
        feats = torch.randn(n, channels, M, M, generator=g).to(device, dtype)
        feats.requires_grad_()
        weight = (torch.randn(k, channels, 1, 1, generator=g) / 16).to(device, dtype)
        bias = torch.zeros(k).to(device, dtype)
        weight.requires_grad_()
        bias.requires_grad_()
        params = [feats, weight, bias]
        ours = (partial(kernels.mask_predictor_loss, feats, weight, bias, targets,
                        labels), params)
        base = (partial(torch_predictor_loss, feats, weight, bias, targets, labels),
                params)
        shape = {"dtype": dname, "N": n, "K": k, "M": M, "C": channels}
        nbytes = (feats.numel() * e, 2 * feats.numel() * e)
        time_modes(rows, {"op": "mask_predictor_loss", **shape, "parity": checked(
            ours, base, dtype)}, {"ours": ours, "torch": base},
            device, reps, nbytes)
        # torchvision's CPU roi_align lacks bfloat16: float32 only on the CPU
        if not (device == "cpu" and dtype != torch.float32):
            ours = (partial(kernels.maskrcnn_predictor_loss, feats, weight, bias,
                            *inst), params)
            base = (partial(torchvision_predictor_loss, feats, weight, bias, *inst),
                    params)
            time_modes(rows, {"op": "maskrcnn_predictor_loss", **shape,
                              "parity": checked(ours, base, dtype)},
                       {"ours": ours, "torchvision": base}, device, reps, nbytes)
        del feats, weight, bias
    if write:
        path = write_results("mask_predictor_loss", rows, {
            "M": M, "channels": channels, "image": image, "masks_per_image": MASKS_PER_IMAGE,
            "images": 2}, device)
        print(f"results: {path}")
    return rows


main = cli(__doc__, run, ["op", "dtype", "N", "K", "mode", "baseline", "ours_ms", "torch_ms",
                          "torchvision_ms", "speedup",
                          "ours_peak_bytes", "memory_ratio", "scratch_ratio", "held_ratio",
                          "ours_GBps"], dtype=None)


if __name__ == "__main__":
    main()
