"""Data sets: the synthetic shapes set and COCO-format folders (polygons and RLE)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires_pycocotools
from maskrcnn import data
from maskrcnn.evaluation import coco_evaluate, coco_ground_truth, detections_to_coco


def test_synthetic_is_deterministic_and_seeded():
    a = data.SyntheticShapes(6, image_size=64, seed=11)
    b = data.SyntheticShapes(6, image_size=64, seed=11)
    c = data.SyntheticShapes(6, image_size=64, seed=12)
    for i in range(6):
        (ia, ta), (ib, tb), (ic, _) = a[i], b[i], c[i]
        assert torch.equal(ia, ib)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
        assert not torch.equal(ia, ic)
    # reading out of order gives the same image (depends on (seed, index) only)
    assert torch.equal(a[3][0], data.SyntheticShapes(6, image_size=64, seed=11)[3][0])
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_targets_are_consistent():
    ds = data.SyntheticShapes(40, image_size=96, seed=3)
    labels_seen, sizes = set(), []
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, 96, 96)
        assert t["masks"].dtype == torch.uint8 and t["labels"].dtype == torch.int64
        # masks are the visible parts: no pixel belongs to two instances
        assert n == 0 or int(t["masks"].sum(0).max()) <= 1
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(),
                                    xs.max().item() + 1, ys.max().item() + 1]
            sizes.append(float((box[2] - box[0]) * (box[3] - box[1])))
        labels_seen |= set(t["labels"].tolist())
    assert labels_seen == {1, 2, 3}
    assert max(sizes) > 4 * min(sizes)  # varied sizes


def _write_coco(tmp_path, *, corrupt_second=False):
    from pycocotools import mask as mask_util
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img_dir / "a.png")
    if corrupt_second:
        (img_dir / "b.png").write_bytes(b"\x89PNG not really")
    else:
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(img_dir / "b.png")
    rle_mask = np.zeros((30, 30), np.uint8)
    rle_mask[5:15, 10:25] = 1
    rle = mask_util.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    ann = {
        "images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 50},
                   {"id": 9, "file_name": "b.png", "height": 30, "width": 30}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}],
        "annotations": [
            # polygon: the rectangle x in [10, 30], y in [5, 20]
            {"id": 1, "image_id": 7, "category_id": 17, "iscrowd": 0, "area": 300,
             "bbox": [10, 5, 20, 15], "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]]},
            # compressed RLE
            {"id": 2, "image_id": 9, "category_id": 3, "iscrowd": 0, "area": 150,
             "bbox": [10, 5, 15, 10], "segmentation": rle},
        ],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(ann))
    return img_dir, ann_file, rle_mask


@requires_pycocotools
def test_coco_dataset_polygons_and_rle(tmp_path):
    img_dir, ann_file, rle_mask = _write_coco(tmp_path)
    ds = data.CocoDetection(str(img_dir), str(ann_file))
    assert len(ds) == 2 and ds.num_classes == 2
    assert ds.label_to_cat_id == {1: 3, 2: 17}
    image, t = ds[0]
    assert image.shape == (3, 40, 50)
    assert t["labels"].tolist() == [2] and int(t["image_id"]) == 7
    m = t["masks"][0]
    # polygon rasterization covers the rectangle's interior
    assert m[8:18, 12:28].all() and not m[:3].any() and not m[:, 33:].any()
    image, t = ds[1]
    assert t["labels"].tolist() == [1]
    assert torch.equal(t["masks"][0], torch.from_numpy(rle_mask))
    assert t["boxes"].tolist() == [[10.0, 5.0, 25.0, 15.0]]


def test_augmentations_keep_boxes_and_masks_aligned():
    image, target = data.SyntheticShapes(1, image_size=64, seed=1)[0]
    flipped_img, flipped = data.RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(flipped_img, image.flip(-1))
    torch.testing.assert_close(flipped["boxes"], data.masks_to_boxes(flipped["masks"]))
    resized_img, resized = data.Resize(96, 1000)(image, target)
    assert resized_img.shape[-2:] == (96, 96) and resized["masks"].shape[-2:] == (96, 96)
    torch.testing.assert_close(resized["boxes"], target["boxes"] * 1.5)
    torch.testing.assert_close(data.masks_to_boxes(resized["masks"]), resized["boxes"],
                               atol=1.0, rtol=0)


def test_augmented_flips_depend_only_on_seed_epoch_and_index():
    base = data.SyntheticShapes(24, image_size=32, seed=2)
    aug = data.Augmented(base, data.train_transforms(), seed=5)

    def flipped(epoch, index):
        image, _ = aug[(epoch, index)]
        plain, _ = base[index]
        assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
        return not torch.equal(image, plain)

    torch.manual_seed(0)
    first = [flipped(0, i) for i in range(24)]
    torch.manual_seed(1)                 # the global generator plays no part
    assert [flipped(0, i) for i in reversed(range(24))] == first[::-1]
    assert 0 < sum(first) < 24           # p = 0.5: both outcomes among 24 samples
    assert [flipped(1, i) for i in range(24)] != first          # another epoch, other flips
    other = data.Augmented(base, data.train_transforms(), seed=6)
    assert [not torch.equal(other[(0, i)][0], base[i][0]) for i in range(24)] != first
    assert data.Augmented(base, None)[(3, 4)][0].equal(base[4][0])   # no transforms


def test_epoch_keys_skip_the_first_indices_of_the_next_epoch_only():
    keys = data.EpochKeys(range(5), skip=3)
    assert len(keys) == 2
    keys.set_epoch(2)
    assert list(keys) == [(2, 3), (2, 4)]
    keys.set_epoch(3)
    assert len(keys) == 5 and list(keys) == [(3, i) for i in range(5)]


@requires_pycocotools
@pytest.mark.parametrize("problem", ["missing", "not_json", "not_coco", "bad_entry"])
def test_bad_annotation_files_raise_data_error(tmp_path, problem):
    img_dir, ann_file, _ = _write_coco(tmp_path)
    if problem == "missing":
        ann_file = tmp_path / "nope.json"
    elif problem == "not_json":
        ann_file.write_text('{"images": [')
    elif problem == "not_coco":
        ann_file.write_text('[1, 2, 3]')
    else:
        ann_file.write_text(json.dumps({"images": [{"id": 1}], "categories": [],
                                        "annotations": []}))
    with pytest.raises(data.DataError, match="annotation file"):
        data.CocoDetection(str(img_dir), str(ann_file))


@requires_pycocotools
def test_corrupt_image_raises_data_error(tmp_path):
    img_dir, ann_file, _ = _write_coco(tmp_path, corrupt_second=True)
    ds = data.CocoDetection(str(img_dir), str(ann_file))
    ds[0]
    with pytest.raises(data.DataError, match="b.png"):
        ds[1]


@requires_pycocotools
def test_coco_eval_of_ground_truth_is_perfect_and_of_noise_is_not():
    ds = data.SyntheticShapes(6, image_size=64, seed=2)
    gt = coco_ground_truth(ds)
    perfect = []
    for i in range(len(ds)):
        _, t = ds[i]
        out = {"boxes": t["boxes"], "labels": t["labels"],
               "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].bool()}
        perfect += detections_to_coco(out, int(t["image_id"]))
    metrics, table = coco_evaluate(gt, perfect)
    assert metrics["bbox"]["AP50"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert "Average Precision" in table
    # wrong labels: nothing matches
    wrong = [dict(r, category_id=r["category_id"] % 3 + 1) for r in perfect]
    metrics, _ = coco_evaluate(gt, wrong)
    assert metrics["segm"]["AP50"] < 0.05


def test_without_pycocotools_coco_data_and_evaluation_say_so(tmp_path, monkeypatch):
    """What needs pycocotools raises DataError naming it (the CLI's exit code 2); the
    synthetic set and the model never need it."""
    monkeypatch.setitem(sys.modules, "pycocotools", None)   # import pycocotools fails
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [], "categories": [], "annotations": []}))
    with pytest.raises(data.DataError, match="pycocotools"):
        data.CocoDetection(str(tmp_path), str(ann))
    ds = data.SyntheticShapes(2, image_size=32, seed=0)
    assert len(ds[0][1]["labels"]) > 0
    with pytest.raises(data.DataError, match="pycocotools"):
        coco_ground_truth(ds)
    with pytest.raises(data.DataError, match="pycocotools"):
        detections_to_coco({"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long),
                            "scores": torch.ones(1),
                            "masks": torch.ones(1, 1, 4, 4, dtype=torch.bool)}, 1)
