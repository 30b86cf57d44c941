"""NMS and batched NMS: ours vs torchvision.ops.nms / batched_nms.

Detection-like boxes in an 800x1216 image (sides 16..256 px, uniform scores); N in
{1k, 5k, 20k, 100k}; plain NMS, and batched NMS over 1, 5 and 80 classes (a few large
classes, as in the RPN's levels, and COCO's many small ones); IoU threshold 0.5
(0.7 for the RPN-like 1-class case is no different in cost). Both results are checked for
equality (same kept set, same score order) before timing. On CUDA both run their CUDA
kernels; on the CPU ours is our CPU path (torchvision's kernel on chunks, see
``kernels._cpu``) and torchvision its C++ kernel.
Peak memory is the extra CUDA memory one call allocates. torchvision's plain NMS holds an
N x N/64-word mask and copies it to the host; its batched_nms runs plain NMS on
class-offset boxes up to 25k boxes (CUDA; 1k on the CPU) and loops over classes above.

    python -m benchmarks.bench_nms [--quick] [--dtype float32,float16]
"""
from __future__ import annotations


import torch
import torchvision

import kernels
from benchmarks._common import (CPU_REPS, DTYPES, IMAGE, cli, default_device, format_table,
                                measure, parity, write_results)

SIZES = (1000, 5000, 20000, 100000)
CASES = (("nms", 1), ("batched_nms", 1), ("batched_nms", 5), ("batched_nms", 80))
THRESHOLD = 0.5


def make_inputs(n: int, classes: int, dtype: torch.dtype, device: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    wh = 16 + torch.rand(n, 2, generator=g) * 240
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([IMAGE[1], IMAGE[0]]) - wh)
    boxes = torch.cat([xy, xy + wh], 1).to(device=device, dtype=dtype)
    scores = torch.rand(n, generator=g).to(device=device, dtype=dtype)
    idxs = torch.randint(0, classes, (n,), generator=g).to(device)
    return boxes, scores, idxs


def check_equal(ours: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor) -> None:
    """Same kept set and the same score sequence (ties may be ordered differently)."""
    torch.testing.assert_close(ours.sort()[0], ref.sort()[0], rtol=0, atol=0)
    torch.testing.assert_close(scores[ours], scores[ref], rtol=0, atol=0)


def run(quick: bool = False, dtypes=("float32",), device: str | None = None,
        write: bool = True, tiny: bool = False) -> list[dict]:
    device = device or default_device()
    sizes = (200,) if tiny else SIZES[:2] if quick else SIZES
    reps = 1 if tiny else CPU_REPS if device == "cpu" else None
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n in sizes:
            for op, classes in CASES:
                boxes, scores, idxs = make_inputs(n, classes, dtype, device)
                # torchvision's CPU kernels take float32 only; on CUDA it runs half natively
                # and bfloat16 as under autocast (in float32).
                tv_boxes, tv_scores = ((boxes.float(), scores.float())
                                       if device == "cpu" or dtype == torch.bfloat16
                                       else (boxes, scores))
                if op == "nms":
                    ours_fn = lambda: kernels.nms(boxes, scores, THRESHOLD)  # noqa: E731
                    tv_fn = lambda: torchvision.ops.nms(tv_boxes, tv_scores,  # noqa: E731
                                                        THRESHOLD)
                else:
                    ours_fn = lambda: kernels.batched_nms(  # noqa: E731
                        boxes, scores, idxs, THRESHOLD)
                    tv_fn = lambda: torchvision.ops.batched_nms(  # noqa: E731
                        tv_boxes, tv_scores, idxs, THRESHOLD)
                kept = ours_fn()
                row = {"dtype": dname, "op": op, "classes": classes, "boxes": n,
                       "kept": int(kept.numel()),
                       "parity": parity(lambda: check_equal(kept, tv_fn(), scores.float()))}
                # bytes that must move: boxes and scores read, kept indices written
                nbytes = n * (boxes.element_size() * 5 + (8 if op != "nms" else 0))
                for provider, fn in (("ours", ours_fn), ("torchvision", tv_fn)):
                    measure(row, provider, fn, device, nbytes, reps)
                row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
                if row["ours_peak_bytes"] and row["torchvision_peak_bytes"]:
                    row["memory_ratio"] = row["ours_peak_bytes"] / row["torchvision_peak_bytes"]
                rows.append(row)
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    if write:
        path = write_results("nms", rows, {"image": IMAGE, "iou_threshold": THRESHOLD,
                                           "sizes": list(sizes), "box_sides": [16, 256]},
                             device)
        print(f"results: {path}")
    return rows


COLUMNS = ["dtype", "op", "classes", "boxes", "kept", "parity", "ours_ms", "torchvision_ms",
           "speedup", "ours_peak_bytes", "torchvision_peak_bytes"]


main = cli(__doc__, run, COLUMNS, dtype="float32", quick_help="1k and 5k boxes only")


if __name__ == "__main__":
    main()
