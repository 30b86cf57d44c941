"""COCO box and mask AP via pycocotools.

pycocotools is imported when first needed (``data.require_pycocotools``), not with this
module: the ops, the model and training work without it (a GPU machine may not have it),
and what needs it raises ``DataError`` (the CLI's exit code 2) saying so.
"""
from __future__ import annotations

import contextlib
import io
from typing import Optional

import numpy as np
import torch

from .data import require_pycocotools

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def encode_mask(mask: np.ndarray) -> dict:
    mask_util, _, _ = require_pycocotools()
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_ground_truth(dataset):
    """The data set's own COCO object, or one built from its targets (SyntheticShapes)."""
    if hasattr(dataset, "coco"):
        return dataset.coco
    _, coco_module, _ = require_pycocotools()
    images, anns = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        h, w = image.shape[-2:]
        images.append({"id": image_id, "height": int(h), "width": int(w),
                       "file_name": f"{image_id}.png"})
        for box, label, m, crowd in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                        target["masks"].numpy(), target["iscrowd"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(m.sum()),
                         "iscrowd": int(crowd), "segmentation": encode_mask(m)})
    coco = coco_module.COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [dict(c) for c in dataset.categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(output: dict, image_id: int, label_to_cat_id: Optional[dict] = None,
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's model output -> COCO result entries (bbox xywh, RLE segmentation)."""
    boxes = output["boxes"].detach().cpu().tolist()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = output["masks"].detach().cpu()
    if masks.dtype != torch.bool:
        masks = masks > mask_threshold
    masks = masks[:, 0].numpy()
    results = []
    for (x1, y1, x2, y2), s, lab, m in zip(boxes, scores, labels, masks):
        if label_to_cat_id is not None and lab not in label_to_cat_id:
            continue  # a class the data set does not have (model trained elsewhere)
        cat = label_to_cat_id[lab] if label_to_cat_id else lab
        results.append({"image_id": image_id, "category_id": int(cat), "score": float(s),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": encode_mask(m)})
    return results


@torch.no_grad()
def predict_dataset(model, dataset, device, batch_size: int = 4, progress: bool = False):
    """Run ``model`` (eval mode) over ``dataset``; COCO-format results."""
    from tqdm import tqdm
    model.eval()
    label_to_cat_id = getattr(dataset, "label_to_cat_id", None)
    results = []
    indices = range(0, len(dataset), batch_size)
    for start in tqdm(indices, desc="evaluate", disable=not progress, leave=False):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = [img.to(device) for img, _ in batch]
        outputs = model(images)
        for (_, target), out in zip(batch, outputs):
            results += detections_to_coco(out, int(target["image_id"]), label_to_cat_id)
    return results


def coco_evaluate(coco_gt, results: list[dict]) -> tuple[dict, str]:
    """Box and mask AP: ({"bbox": {AP, AP50, ...}, "segm": {...}}, printed table)."""
    _, _, cocoeval = require_pycocotools()
    metrics, out = {}, io.StringIO()
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(out if results else io.StringIO()):
            if results:
                coco_dt = coco_gt.loadRes([dict(r) for r in results])
                ev = cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
                print(f"IoU metric: {iou_type}")
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                stats = [float(s) for s in ev.stats]
            else:
                stats = [0.0] * len(STAT_NAMES)
        if not results:
            out.write(f"IoU metric: {iou_type}\n(no detections: every AP is 0)\n")
        metrics[iou_type] = dict(zip(STAT_NAMES, stats))
    table = "\n".join(line for line in out.getvalue().splitlines()
                      if not line.startswith(("Loading", "DONE", "creating", "index created",
                                              "Running", "Evaluate annotation",
                                              "Accumulating", "loading")))
    return metrics, table


def evaluate(model, dataset, device, batch_size: int = 4, progress: bool = False):
    results = predict_dataset(model, dataset, device, batch_size, progress)
    return coco_evaluate(coco_ground_truth(dataset), results)
