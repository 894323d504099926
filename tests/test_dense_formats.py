"""The dense dataset readers on small files written here in each format (VOC, COCO, Cityscapes, ADE20K): what the
writer put in comes back out of the loader (images, class ids through each dataset's id map, boxes); a missing
folder is one line naming the layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.data import build_dataset
from src.data.dense import CITYSCAPES_TRAIN_IDS, DenseLoader, check_dense_split
from src.errors import UserError
from src.schema import DatasetConfig

SIZE = 16


def cfg(name, root, task, classes, channels=3):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {
        "name": name, "root": str(root), "task": task, "num_classes": classes, "image_size": SIZE,
        "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels})


def write_rgb(path: Path, value: int, size=(SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def write_mask(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:  # VOC's SegmentationClass: palette PNGs whose indices are the class ids
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def stripes(a: int, b: int) -> np.ndarray:
    m = np.full((SIZE, SIZE), a, dtype=np.uint8)
    m[:, SIZE // 2:] = b
    return m


def batch_of(ds, split, task):
    return next(iter(DenseLoader(ds.split(split), task, 8).iter_epoch(0)))


# ---------------------------------------------------------------------------------------------------- VOC
def write_voc(root: Path) -> None:
    for k, i in enumerate(("2007_000001", "2007_000002", "2007_000003")):
        write_rgb(root / "JPEGImages" / f"{i}.jpg", 40 * (k + 1))
        mask = stripes(0, k + 1)
        mask[0, :] = 255  # VOC's border: ignore
        write_mask(root / "SegmentationClass" / f"{i}.png", mask, palette=True)
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>2</ymin><xmax>{x1 + 5}</xmax><ymax>9</ymax></bndbox></object>"
                       for n, d, x1 in (("dog", 0, 1), ("person", 0, 8), ("cat", 1, 3)))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename>{objs}"
                                                       f"</annotation>")
    for sets in ("Segmentation", "Main"):
        (root / "ImageSets" / sets).mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / sets / "train.txt").write_text("2007_000001\n2007_000002\n")
        (root / "ImageSets" / sets / "val.txt").write_text("2007_000003\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("2007_000001  1\n")  # per-class list: skipped


def test_voc_segmentation_and_detection_read_back(tmp_path):
    write_voc(tmp_path)
    seg = build_dataset(cfg("voc", tmp_path, "segmentation", 21), None)
    assert sorted(seg.splits) == ["train", "val"] and len(seg.split("train")) == 2
    b = batch_of(seg, "train", "segmentation")
    for k in range(2):
        assert b.targets[k, 1:, 0].unique().tolist() == [0] and b.targets[k, 1:, -1].unique().tolist() == [k + 1]
        assert (b.targets[k, 0] == 255).all()
        assert abs(float(b.inputs[k].mean()) - 40 * (k + 1) / 255) < 0.02
    det = build_dataset(cfg("voc", tmp_path, "detection", 20), None)
    t = batch_of(det, "val", "detection").targets[0]
    # dog = 12, person = 15 (1-based over the 20 VOC classes); the difficult cat is left out; xmin 1 -> edge 0
    assert t["labels"].tolist() == [12, 15]
    assert t["boxes"].tolist() == [[0.0, 1.0, 6.0, 9.0], [7.0, 1.0, 13.0, 9.0]]
    with pytest.raises(UserError, match=r"JPEGImages not found: expected VOCdevkit/VOC2012"):
        build_dataset(cfg("voc", tmp_path / "nope", "segmentation", 21), None)


def test_out_of_range_mask_ids_are_one_line(tmp_path):
    write_voc(tmp_path)
    write_mask(tmp_path / "SegmentationClass" / "2007_000003.png", stripes(0, 30), palette=True)
    seg = build_dataset(cfg("voc", tmp_path, "segmentation", 21), None)
    with pytest.raises(UserError, match=r"2007_000003.png: mask holds class id 30 but the dataset has 21 classes"):
        check_dense_split(seg.split("val"), "segmentation")


# --------------------------------------------------------------------------------------------------- COCO
def write_coco(root: Path, annotations=True) -> None:
    images = [{"id": 7, "file_name": "a.jpg", "width": 32, "height": 16},
              {"id": 3, "file_name": "b.jpg", "width": 16, "height": 16}]
    anns = [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [4, 2, 8, 6], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [2, 2, 10, 12], "iscrowd": 0}]
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns if annotations else [], "categories": cats}))
    write_rgb(root / "val2017" / "a.jpg", 100, (32, 16))
    write_rgb(root / "val2017" / "b.jpg", 200)


def test_coco_reads_back_and_a_split_without_boxes_is_refused(tmp_path):
    write_coco(tmp_path)
    ds = build_dataset(cfg("coco", tmp_path, "detection", 2), None)
    assert list(ds.splits) == ["val2017"] and ds.info.classes == ["person", "dog"]
    t = batch_of(ds, "val2017", "detection").targets
    assert t[0]["labels"].tolist() == [1] and t[0]["boxes"].tolist() == [[2.0, 2.0, 12.0, 14.0]]  # image 3 first
    # image 7 (32 x 16) is resized to 16 x 16: x halves; the crowd box is left out; dog (id 18) -> 2
    assert t[1]["labels"].tolist() == [2] and t[1]["boxes"].tolist() == [[2.0, 2.0, 6.0, 8.0]]
    check_dense_split(ds.split("val2017"), "detection")
    write_coco(tmp_path / "empty", annotations=False)
    empty = build_dataset(cfg("coco", tmp_path / "empty", "detection", 2), None)
    with pytest.raises(UserError, match=r"split 'val2017' has 2 images but no boxes"):
        check_dense_split(empty.split("val2017"), "detection")
    with pytest.raises(UserError, match=r"annotations not found: expected annotations/instances_<split>.json"):
        build_dataset(cfg("coco", tmp_path / "nope", "detection", 2), None)


# --------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        write_rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 90)
        write_mask(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", stripes(26, 4))
    ds = build_dataset(cfg("cityscapes", tmp_path, "segmentation", 19), None)
    assert sorted(ds.splits) == ["train", "val"]
    y = batch_of(ds, "val", "segmentation").targets[0]
    # labelId 26 (car) -> train id 13; labelId 4 (static) -> ignore
    assert CITYSCAPES_TRAIN_IDS[26] == 13 and y[:, 0].unique().tolist() == [13] and y[:, -1].unique().tolist() == [255]
    with pytest.raises(UserError, match=r"dataset.num_classes=21 but cityscapes segmentation has 19 classes"):
        build_dataset(cfg("cityscapes", tmp_path, "segmentation", 21), None)


# ------------------------------------------------------------------------------------------------- ADE20K
def test_ade20k_reads_both_splits_and_shifts_ids(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for sub, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        write_rgb(base / "images" / sub / f"{stem}.jpg", 60)
        write_mask(base / "annotations" / sub / f"{stem}.png", stripes(0, 150))
    ds = build_dataset(cfg("ade20k", tmp_path, "segmentation", 150), None)
    assert sorted(ds.splits) == ["train", "val"]
    y = batch_of(ds, "train", "segmentation").targets[0]
    assert y[:, 0].unique().tolist() == [255] and y[:, -1].unique().tolist() == [149]  # 0 -> ignore, k -> k - 1
    with pytest.raises(UserError, match=r"holds neither training/ nor validation/"):
        (tmp_path / "x" / "images").mkdir(parents=True)
        build_dataset(cfg("ade20k", tmp_path / "x", "segmentation", 150), None)
    assert torch.is_tensor(y)
