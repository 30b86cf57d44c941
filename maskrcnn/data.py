"""Data: a seeded synthetic shapes set (the embedded default) and COCO-format data sets.

Both return ``(image, target)`` like torchvision's detection data sets: ``image`` a float
(3, H, W) tensor in [0, 1]; ``target`` a dict with ``boxes`` (L, 4) float32 xyxy,
``labels`` (L,) int64 (1..K, 0 is background), ``masks`` (L, H, W) uint8, ``image_id``,
``area`` and ``iscrowd``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A data set file is missing, malformed or unreadable (the CLI exits with code 2)."""


def require_pycocotools():
    """The pycocotools modules (mask, coco, cocoeval), or DataError naming what is missing."""
    try:
        from pycocotools import coco, cocoeval, mask
    except ImportError as e:
        raise DataError(f"COCO data, COCO evaluation and RLE masks need pycocotools ({e}); "
                        "install it with `pip install pycocotools`") from None
    return mask, coco, cocoeval


SHAPES = ("rectangle", "ellipse", "triangle")


class SyntheticShapes(torch.utils.data.Dataset):
    """Seeded, deterministic instance segmentation: coloured rectangles, ellipses and
    triangles of varied sizes on a noisy gradient background, overlapping (later shapes
    occlude earlier ones; masks are the visible parts).

    ``dataset[i]`` depends only on ``(seed, i)``: two splits with different seeds are
    disjoint draws. Images are rendered on access (nothing is read from disk).
    """

    def __init__(self, num_images: int = 512, *, image_size: int = 128, seed: int = 0,
                 num_classes: int = len(SHAPES), max_objects: int = 4,
                 size_range: tuple[float, float] = (0.15, 0.5),
                 transforms: Optional[Callable] = None) -> None:
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
        if num_images < 0 or image_size < 16 or max_objects < 1:
            raise ValueError("num_images >= 0, image_size >= 16 and max_objects >= 1 expected")
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.num_classes = num_classes
        self.max_objects = max_objects
        self.size_range = size_range
        self.transforms = transforms
        self.categories = [{"id": i + 1, "name": SHAPES[i]} for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, target = self.render(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def render(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        # background: a random linear gradient between two dull colours, plus noise
        c0, c1 = rng.uniform(0.0, 0.6, 3), rng.uniform(0.0, 0.6, 3)
        angle = rng.uniform(0, 2 * math.pi)
        t = ((xx * math.cos(angle) + yy * math.sin(angle)) / (s * 1.5) + 0.5).clip(0, 1)
        image = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        image += rng.normal(0, 0.03, image.shape)

        masks, labels = [], []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            label = int(rng.integers(1, self.num_classes + 1))
            mask = self._shape(rng, SHAPES[label - 1], xx, yy)
            colour = rng.uniform(0.35, 1.0, 3)
            image[:, mask] = colour[:, None] + rng.normal(0, 0.02, (3, int(mask.sum())))
            masks = [m & ~mask for m in masks]       # the new shape occludes older ones
            masks.append(mask)
            labels.append(label)
        keep = [i for i, m in enumerate(masks) if m.sum() >= 20]
        masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, s, s), bool)
        labels = [labels[i] for i in keep]
        image = torch.from_numpy(image.clip(0, 1).astype(np.float32))
        return image, make_target(torch.from_numpy(masks.astype(np.uint8)),
                                  torch.tensor(labels, dtype=torch.int64), index)

    def _shape(self, rng, kind: str, xx, yy) -> np.ndarray:
        s = self.image_size
        lo, hi = self.size_range
        w, h = rng.uniform(lo, hi, 2) * s
        cx, cy = rng.uniform(w / 2, s - w / 2), rng.uniform(h / 2, s - h / 2)
        if kind == "rectangle":
            return (abs(xx - cx) <= w / 2) & (abs(yy - cy) <= h / 2)
        if kind == "ellipse":
            return ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
        # triangle: apex on the top edge of its box, base on the bottom edge
        ax = cx + rng.uniform(-0.5, 0.5) * w
        pts = [(ax, cy - h / 2), (cx - w / 2, cy + h / 2), (cx + w / 2, cy + h / 2)]
        inside = np.ones_like(xx, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) <= 0
        return inside


def make_target(masks: Tensor, labels: Tensor, image_id: int,
                iscrowd: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Target dict from (L, H, W) masks: boxes are the masks' tight extents."""
    boxes = masks_to_boxes(masks)
    return {"boxes": boxes, "labels": labels, "masks": masks,
            "image_id": torch.tensor(image_id), "area": masks.flatten(1).sum(1).float(),
            "iscrowd": iscrowd if iscrowd is not None else torch.zeros(len(labels),
                                                                      dtype=torch.int64)}


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(L, H, W) -> (L, 4) float32 xyxy, pixel-edge convention (x2 = last column + 1)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    masks = masks.bool()
    rows, cols = masks.any(2), masks.any(1)
    idx_h = torch.arange(masks.shape[1])
    idx_w = torch.arange(masks.shape[2])
    y1 = torch.where(rows, idx_h, masks.shape[1]).min(1).values
    y2 = torch.where(rows, idx_h, -1).max(1).values + 1
    x1 = torch.where(cols, idx_w, masks.shape[2]).min(1).values
    x2 = torch.where(cols, idx_w, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def collate(batch):
    """List of (image, target) -> (list of images, list of targets)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------
# Augmentations on (image, target) pairs. Each draws from ``generator`` (torch's global one
# when None). Training draws them from :class:`Augmented`'s generator seeded per sample by
# (seed, epoch, index): the same flips whichever loader worker renders a sample, with any
# --workers, and after a resume mid-epoch. (They drew from Python's never-seeded ``random``
# until 2026-12-05: no two runs were alike.)

class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target, generator: Optional[torch.Generator] = None):
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, generator: Optional[torch.Generator] = None):
        if float(torch.rand((), generator=generator)) < self.p:
            w = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
            target["masks"] = target["masks"].flip(-1)
        return image, target


class Resize:
    """Scale so the shorter side is ``min_size`` (one picked at random from a sequence),
    the longer at most ``max_size``; boxes and masks follow."""

    def __init__(self, min_size, max_size: int = 1333):
        self.min_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size

    def __call__(self, image, target, generator: Optional[torch.Generator] = None):
        h, w = image.shape[-2:]
        size = self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=generator))]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = torch.nn.functional.interpolate(image[None], (nh, nw), mode="bilinear",
                                                align_corners=False)[0]
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if target["masks"].shape[0]:
            target["masks"] = torch.nn.functional.interpolate(
                target["masks"][None].float(), (nh, nw), mode="nearest")[0].to(torch.uint8)
        else:
            target["masks"] = target["masks"].new_zeros((0, nh, nw))
        return image, target


class Augmented(torch.utils.data.Dataset):
    """``dataset`` with ``transforms`` drawing from a generator seeded by (seed, epoch,
    index): indexed by the ``(epoch, index)`` keys of :class:`EpochKeys`, so a sample's
    augmentation depends on nothing else (not the worker that renders it, nor the batches
    before it)."""

    def __init__(self, dataset, transforms: Optional[Callable], seed: int = 0) -> None:
        self.dataset, self.transforms, self.seed = dataset, transforms, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, target = self.dataset[index]
        if self.transforms is None:
            return image, target
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed % 2**63, epoch, index]).generate_state(1)[0]))
        return self.transforms(image, target, g)


class EpochKeys(torch.utils.data.Sampler):
    """``sampler``'s indices as ``(epoch, index)`` keys for :class:`Augmented`, the first
    ``skip`` of the next epoch left out (a resume mid-epoch)."""

    def __init__(self, sampler, skip: int = 0) -> None:
        self.sampler, self.skip, self.epoch = sampler, skip, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield self.epoch, index


# ---------------------------------------------------------------------------------------
# COCO format

def load_coco_json(ann_file: str):
    """pycocotools COCO from a file, with DataError on any problem (named, explained)."""
    if not os.path.isfile(ann_file):
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"annotation file {ann_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise DataError(f"annotation file {ann_file} is not COCO instances format: expected an "
                        "object with 'images', 'annotations' and 'categories' lists")
    data.setdefault("annotations", [])
    coco_module = require_pycocotools()[1]
    try:
        for img in data["images"]:
            int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"])
        for cat in data["categories"]:
            int(cat["id"]), str(cat["name"])
        for ann in data["annotations"]:
            int(ann["image_id"]), int(ann["category_id"])
            if "segmentation" not in ann or len(ann["bbox"]) != 4:
                raise KeyError("segmentation/bbox")
        coco = coco_module.COCO()
        coco.dataset = data
        coco.createIndex()
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"annotation file {ann_file} has a malformed entry ({e!r}): every "
                        "image needs id/file_name/height/width, every annotation "
                        "image_id/category_id/bbox/segmentation") from None
    return coco


def read_image(path: str) -> Tensor:
    """RGB float (3, H, W) in [0, 1]; DataError if the file is missing or not an image."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            array = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


class CocoDetection(torch.utils.data.Dataset):
    """An image folder + COCO instances JSON (polygon and RLE masks via pycocotools).

    Category ids are mapped to contiguous labels 1..K in id order (``label_to_cat_id``
    maps back). Crowd annotations are kept with ``iscrowd`` = 1 for evaluation and dropped
    from training targets when ``skip_crowd``.
    """

    def __init__(self, image_dir: str, ann_file: str, *, transforms: Optional[Callable] = None,
                 skip_crowd: bool = True) -> None:
        if not os.path.isdir(image_dir):
            raise DataError(f"image folder not found: {image_dir}")
        self.image_dir = image_dir
        self.coco = load_coco_json(ann_file)
        self.ids = sorted(self.coco.imgs)
        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(cat_ids)}
        self.categories = [{"id": self.cat_id_to_label[c], "name": self.coco.cats[c]["name"]}
                           for c in cat_ids]
        self.num_classes = len(cat_ids)
        self.transforms = transforms
        self.skip_crowd = skip_crowd

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = read_image(os.path.join(self.image_dir, info["file_name"]))
        h, w = image.shape[-2:]
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.skip_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        masks, labels, crowd = [], [], []
        for a in anns:
            try:
                m = self.coco.annToMask(a)
            except Exception as e:  # pycocotools raises assorted errors on bad segmentations
                raise DataError(f"annotation {a.get('id')} of image {info['file_name']} has an "
                                f"unreadable segmentation: {e!r}") from None
            if m.shape != (h, w):
                raise DataError(f"image {info['file_name']} is {w}x{h} but its annotations say "
                                f"{info['width']}x{info['height']}")
            if m.any():
                masks.append(torch.from_numpy(m))
                labels.append(self.cat_id_to_label[a["category_id"]])
                crowd.append(int(a.get("iscrowd", 0)))
        masks_t = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        target = make_target(masks_t, torch.tensor(labels, dtype=torch.int64), image_id,
                             torch.tensor(crowd, dtype=torch.int64))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def train_transforms(min_size=None, max_size: int = 1333) -> Compose:
    """The usual training augmentation: optional resize, then horizontal flip."""
    ts = [Resize(min_size, max_size)] if min_size is not None else []
    return Compose(ts + [RandomHorizontalFlip(0.5)])
