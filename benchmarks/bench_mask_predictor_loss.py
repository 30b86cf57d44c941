"""The fused mask predictor + loss: ours vs ``F.conv2d`` (1x1, 256 channels) + gather + BCE.

Forward and forward+backward at Mask R-CNN training shapes: N in {128, 512} instances,
K in {2, 91} classes, M = 28. Memory columns (CUDA) as in ``bench_mask_loss``: the
features' gradient alone, which every provider returns, is N x 256 x M x M.

    python -m benchmarks.bench_mask_predictor_loss [--quick] [--dtype float32,bfloat16]
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import kernels
from benchmarks._common import DTYPES, cli, parity, write_results
from benchmarks.bench_mask_loss import (M, check_equal, make_instances, settings,
                                        time_providers, torch_mask_loss)

CHANNELS = 256


def torch_predictor_loss(features, weight, bias, targets, labels):
    return torch_mask_loss(F.conv2d(features, weight, bias), targets, labels)


def run(quick: bool = False, dtypes=None, device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    """dtypes: as ``bench_mask_loss.settings``."""
    device, dtypes, sizes, reps = settings(quick, dtypes, device, tiny)
    channels = 8 if tiny else CHANNELS
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n in sizes:
            for k in (2, 91):
                _, targets, labels, _ = make_instances(n, k, dtype, device, images=1,
                                                       image=(48, 64))
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
                match = parity(partial(check_equal, ours, base, dtype))
                fbytes = feats.numel() * e
                for mode in ("forward", "forward+backward"):
                    row = {"op": "mask_predictor_loss", "dtype": dname, "N": n, "K": k,
                           "M": M, "C": channels, "mode": mode, "parity": match}
                    time_providers(row, {"ours": ours, "torch": base}, mode, device, reps,
                                   fbytes * (2 if mode != "forward" else 1))
                    rows.append(row)
                del feats, weight, bias
    if write:
        path = write_results("mask_predictor_loss", rows, {"M": M, "channels": channels},
                             device)
        print(f"results: {path}")
    return rows


main = cli(__doc__, run, ["dtype", "N", "K", "mode", "ours_ms", "torch_ms", "speedup",
                          "ours_peak_bytes", "memory_ratio", "scratch_ratio", "held_ratio",
                          "ours_GBps"], dtype=None)


if __name__ == "__main__":
    main()
