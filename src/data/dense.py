"""Segmentation and detection data: the embedded `digits_canvas` default, readers for the layouts users have
(VOC, COCO, Cityscapes, ADE20K) and the loader that yields their batches.

A dense split is a `Split` whose `targets` hold, per sample, a mask (segmentation: uint8 (H, W) class ids, 255 =
ignore) or boxes (detection: (K, 4) xyxy pixels + (K,) labels in 1..num_classes, 0 being the detectors'
background); its `labels` are all 0 (a `fraction` subset is then a plain seeded fraction).

`digits_canvas` (seeded, nothing downloaded): the real scikit-learn digits of one split (the same stratified
split as the `digits` dataset, so fine-tuning canvases come from `transfer` and evaluation canvases from `test`)
pasted on black square canvases, 1..max_objects digits each, at seeded random positions (no two overlapping) and
sizes (object_size px), ink over background. A pixel is the digit's ink when its resized value is above INK
(ink >= 40% of white): the mask there is the digit class + 1 (0 = background), and the box is the ink's tight
box (x2 / y2 exclusive pixel edges).

Batches (`DenseLoader`): `Batch(inputs=float images (N, C, S, S) in [0, 1], targets=masks (N, S, S) int64 |
list of {boxes (K, 4) float xyxy, labels (K,) int64}, ids)`, every image resized to S = dataset.image_size (the
crop size; boxes scaled with it). Training augmentation (loader.augment != none): segmentation = random scale
(0.5-2x) + crop (padding with 0 / ignore) + horizontal flip of image and mask together; detection = flip of
image and boxes. Evaluation batches are never augmented.
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import Batch
from ..errors import UserError, check, closest
from ..seeding import mix_seed
from .datasets import BUILDERS, IMG_EXTENSIONS, Dataset, DatasetInfo, Split, set_channels, stratified_partition
from .loaders import _OrderMixin, image_layout, resolve_device

log = logging.getLogger(__name__)

TASKS = ("classification", "segmentation", "detection")
DENSE_TASKS = ("segmentation", "detection")
IGNORE = 255
INK = 64  # of 255 (25% of white): a pasted digit's ink (mask pixels and its box)
SCALE_RANGE = (0.5, 2.0)  # segmentation training: random rescale before the crop (mmseg's ratio_range)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# Cityscapes labelIds -> the 19 train ids (cityscapesScripts' labels.py); every other id is ignored
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lut(mapping: Dict[int, int]) -> torch.Tensor:
    t = torch.full((256,), IGNORE, dtype=torch.uint8)
    for k, v in mapping.items():
        t[k] = v
    return t


# the value map a dataset's mask files go through when read (255 = ignore); identity when absent
MASK_LUTS = {"cityscapes": _lut(CITYSCAPES_TRAIN_IDS),
             "ade20k": _lut({0: IGNORE, **{v: v - 1 for v in range(1, 151)}})}


# ------------------------------------------------------------------------------------------- digits canvases
def _ink(digit: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 (h, w) digit resized to (size, size), uint8."""
    x = F.interpolate(digit[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8)


def _place(rng, canvas: int, size: int, taken: List[tuple], tries: int = 20) -> Optional[tuple]:
    """A free (y, x) for a size x size square on the canvas that overlaps none of `taken`, else None."""
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
        if all(y + size <= ty or ty + ts <= y or x + size <= tx or tx + ts <= x for ty, tx, ts in taken):
            return y, x
    return None


def paste_canvas(rng, digits: torch.Tensor, labels: torch.Tensor, canvas: int, max_objects: int,
                 object_size: Sequence[int]) -> tuple:
    """One canvas from uint8 digits (N, h, w): (image (S, S) uint8, mask (S, S) uint8, boxes (K, 4), labels (K,))."""
    img = torch.zeros(canvas, canvas, dtype=torch.uint8)
    mask = torch.zeros(canvas, canvas, dtype=torch.uint8)
    boxes, cls, taken = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        i, size = int(rng.integers(len(digits))), int(rng.integers(object_size[0], object_size[1] + 1))
        at = _place(rng, canvas, size, taken)
        if at is None:
            continue
        y, x = at
        d = _ink(digits[i], size)
        ink = d > INK
        if not ink.any():
            continue
        taken.append((y, x, size))
        img[y:y + size, x:x + size] = torch.maximum(img[y:y + size, x:x + size], d)
        mask[y:y + size, x:x + size][ink] = int(labels[i]) + 1
        ys, xs = torch.nonzero(ink, as_tuple=True)
        boxes.append([x + xs.min().item(), y + ys.min().item(), x + xs.max().item() + 1, y + ys.max().item() + 1])
        cls.append(int(labels[i]) + 1)
    return img, mask, torch.tensor(boxes, dtype=torch.float32).view(-1, 4), torch.tensor(cls, dtype=torch.long)


def canvas_split(name: str, digits: torch.Tensor, labels: torch.Tensor, cfg, info: DatasetInfo) -> Split:
    """`cfg.canvases` canvases (default: half the split's digits) from the digits of one split, seeded by
    (split_seed, split name)."""
    n = int(cfg.canvases) if cfg.get("canvases") else max(1, len(digits) // 2)
    rng = np.random.default_rng([int(cfg.split_seed), zlib.crc32(name.encode())])
    parts = [paste_canvas(rng, digits, labels, int(cfg.image_size), int(cfg.max_objects), list(cfg.object_size))
             for _ in range(n)]
    images = set_channels(torch.stack([p[0] for p in parts])[:, None], int(cfg.channels)).contiguous()
    split = Split(name=name, labels=torch.zeros(n, dtype=torch.long), ids=torch.arange(n), images=images,
                  info=info, full_size=n)
    split.targets = {"masks": torch.stack([p[1] for p in parts]), "boxes": [p[2] for p in parts],
                     "box_labels": [p[3] for p in parts]}
    return split


def check_canvas_cfg(cfg) -> None:
    lo, hi = (list(cfg.object_size) + [0, 0])[:2]
    check(len(cfg.object_size) == 2 and 1 <= lo <= hi <= cfg.image_size,
          f"dataset.object_size={list(cfg.object_size)} must be [min, max] px with 1 <= min <= max <= "
          f"dataset.image_size={cfg.image_size}: use e.g. [8, 14]")
    check(cfg.max_objects >= 1, f"dataset.max_objects={cfg.max_objects} must be >= 1: use e.g. 3")
    check(cfg.get("canvases") is None or cfg.canvases > 0, f"dataset.canvases={cfg.canvases} must be > 0 (or "
                                                            f"null: half the split's digits)")


def build_digits_canvas(cfg, paths=None) -> Dataset:
    """Every split of the `digits` dataset (same fractions and split_seed) as canvases (module docstring)."""
    from sklearn.datasets import load_digits

    check_canvas_cfg(cfg)
    d = load_digits()
    digits = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))
    labels = torch.from_numpy(d.target.astype(np.int64))
    info = dense_info(cfg, [str(c) for c in d.target_names])
    ds = Dataset(info)
    for name, pos in stratified_partition(d.target, dict(cfg.splits), cfg.split_seed).items():
        p = torch.from_numpy(pos)
        ds.splits[name] = canvas_split(name, digits[p], labels[p], cfg, info)
    return ds


def dense_info(cfg, objects: Sequence[str]) -> DatasetInfo:
    """The DatasetInfo of a dense dataset with object classes `objects`: segmentation classes are background +
    objects when the data has a background class (digits, VOC), else the objects (Cityscapes, ADE20K)."""
    task = str(cfg.get("task") or "classification")
    check(task in DENSE_TASKS, f"dataset '{cfg.name}' is a segmentation / detection dataset but dataset.task="
                               f"{task}: set the downstream entry's task: segmentation or detection")
    classes = list(objects)
    if task == "segmentation" and cfg.name in ("digits_canvas", "voc"):
        classes = ["background"] + classes
    check(cfg.num_classes == len(classes),
          f"dataset.num_classes={cfg.num_classes} but {cfg.name} {task} has {len(classes)} classes"
          f"{' (background included)' if classes[0] == 'background' else ''}: set dataset.num_classes="
          f"{len(classes)}")
    check(len(cfg.mean) == cfg.channels and len(cfg.std) == cfg.channels,
          f"dataset.mean/std have {len(cfg.mean)}/{len(cfg.std)} values for dataset.channels={cfg.channels}: "
          f"give one per channel")
    return DatasetInfo(name=cfg.name, num_classes=len(classes), classes=classes, channels=cfg.channels,
                       image_size=cfg.image_size, mean=list(cfg.mean), std=list(cfg.std), task=task)


# --------------------------------------------------------------------------------------------- file readers
def _need(path: Path, layout: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} not found: expected {layout} (set the downstream entry's dataset.root)")
    return path


def _file_split(name: str, files: List[str], info: DatasetInfo, **targets) -> Split:
    check(len(files) > 0, f"dataset '{info.name}' split '{name}' has no images: check dataset.root")
    n = len(files)
    return Split(name=name, labels=torch.zeros(n, dtype=torch.long), ids=torch.arange(n), files=files, info=info,
                 full_size=n, targets=dict(targets))


def _list_ids(path: Path) -> List[str]:
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def read_voc_xml(path: Path, names: Sequence[str]) -> tuple:
    """(boxes (K, 4) xyxy, labels (K,) in 1..20) of one VOC Annotations file; `difficult` objects are left out
    (the VOC metric ignores them). VOC's 1-based pixel coordinates become 0-based edges (xmin - 1)."""
    root = ET.parse(path).getroot()
    boxes, labels = [], []
    for obj in root.iter("object"):
        cls = obj.findtext("name", "").strip()
        check(cls in names, f"{path}: object class '{cls}' is not a VOC class{closest(cls, names)}")
        if obj.findtext("difficult", "0").strip() == "1":
            continue
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(names.index(cls) + 1)
    return torch.tensor(boxes, dtype=torch.float32).view(-1, 4), torch.tensor(labels, dtype=torch.long)


def build_voc(cfg, paths=None) -> Dataset:
    """VOC2012 (or 2007) at dataset.root = VOCdevkit/VOC2012: JPEGImages/<id>.jpg; segmentation:
    SegmentationClass/<id>.png (palette PNG: class index, 255 = border/ignore) listed in
    ImageSets/Segmentation/<split>.txt; detection: Annotations/<id>.xml listed in ImageSets/Main/<split>.txt."""
    root = Path(str(cfg.root))
    layout = "VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/, Annotations/, ImageSets/{Main,Segmentation}/"
    _need(root / "JPEGImages", layout)
    info = dense_info(cfg, VOC_CLASSES)
    ds = Dataset(info)
    sets = _need(root / "ImageSets" / ("Segmentation" if info.task == "segmentation" else "Main"), layout)
    for lst in sorted(sets.glob("*.txt")):
        if "_" in lst.stem:  # Main/<class>_<split>.txt: per-class lists
            continue
        ids = _list_ids(lst)
        files = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids]
        if info.task == "segmentation":
            ds.splits[lst.stem] = _file_split(lst.stem, files, info, masks=[
                str(_need(root / "SegmentationClass" / f"{i}.png", layout)) for i in ids])
        else:
            parsed = [read_voc_xml(_need(root / "Annotations" / f"{i}.xml", layout), VOC_CLASSES) for i in ids]
            ds.splits[lst.stem] = _file_split(lst.stem, files, info, boxes=[p[0] for p in parsed],
                                              box_labels=[p[1] for p in parsed])
    check(bool(ds.splits), f"{sets} holds no <split>.txt lists: expected {layout}")
    return ds


def read_coco(path: Path, images: Path) -> tuple:
    """(files, boxes, labels, category names) of one instances_<split>.json: boxes xywh -> xyxy, crowd boxes
    left out, category ids mapped to 1..K in id order."""
    d = json.loads(path.read_text())
    cats = sorted(d.get("categories", []), key=lambda c: c["id"])
    index = {c["id"]: k + 1 for k, c in enumerate(cats)}
    per: Dict[int, list] = {im["id"]: [] for im in d.get("images", [])}
    for a in d.get("annotations", []):
        if not a.get("iscrowd", 0) and a["image_id"] in per:
            x, y, w, h = a["bbox"]
            per[a["image_id"]].append(([x, y, x + w, y + h], index[a["category_id"]]))
    imgs = sorted(d.get("images", []), key=lambda im: im["id"])
    boxes = [torch.tensor([b for b, _ in per[im["id"]]], dtype=torch.float32).view(-1, 4) for im in imgs]
    labels = [torch.tensor([c for _, c in per[im["id"]]], dtype=torch.long) for im in imgs]
    return [str(images / im["file_name"]) for im in imgs], boxes, labels, [c["name"] for c in cats]


def build_coco(cfg, paths=None) -> Dataset:
    """COCO detection at dataset.root: annotations/instances_<split>.json, images in <split>/ (e.g. train2017,
    val2017); one split per json file."""
    root = Path(str(cfg.root))
    layout = "annotations/instances_<split>.json and <split>/<file_name> images (COCO 2017 layout)"
    jsons = sorted(_need(root / "annotations", layout).glob("instances_*.json"))
    check(bool(jsons), f"{root / 'annotations'} holds no instances_<split>.json: expected {layout}")
    task = str(cfg.get("task") or "")
    check(task == "detection", f"dataset coco is read for detection here, not dataset.task={task}: set the "
                               f"downstream entry's task: detection")
    ds = None
    for j in jsons:
        split = j.stem[len("instances_"):]
        files, boxes, labels, names = read_coco(j, root / split)
        if ds is None:
            ds = Dataset(dense_info(cfg, names))
        ds.splits[split] = _file_split(split, files, ds.info, boxes=boxes, box_labels=labels)
    return ds


def build_cityscapes(cfg, paths=None) -> Dataset:
    """Cityscapes at dataset.root: leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/
    *_gtFine_labelIds.png (labelIds mapped to the 19 train ids when read; others = 255)."""
    root = Path(str(cfg.root))
    layout = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"
    info = dense_info(cfg, [str(i) for i in range(19)])
    ds = Dataset(info)
    for sdir in sorted(p for p in _need(root / "leftImg8bit", layout).iterdir() if p.is_dir()):
        files = sorted(str(f) for f in sdir.glob("*/*_leftImg8bit.png"))
        masks = [str(_need(root / "gtFine" / sdir.name / Path(f).parent.name /
                           Path(f).name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"), layout)) for f in files]
        if files:
            ds.splits[sdir.name] = _file_split(sdir.name, files, info, masks=masks)
    check(bool(ds.splits), f"{root / 'leftImg8bit'} holds no images: expected {layout}")
    return ds


ADE_SPLITS = {"train": "training", "val": "validation"}


def build_ade20k(cfg, paths=None) -> Dataset:
    """ADE20K (SceneParsing, 150 classes) at dataset.root = the folder holding ADEChallengeData2016/ (or that
    folder): images/{training,validation}/*.jpg, annotations/.../*.png (0 = other -> ignore, k -> k - 1); splits
    train and val."""
    root = Path(str(cfg.root))
    root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    layout = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"
    info = dense_info(cfg, [str(i) for i in range(150)])
    ds = Dataset(info)
    for split, sub in ADE_SPLITS.items():
        folder = root / "images" / sub
        if not folder.is_dir():
            continue
        files = sorted(str(f) for f in folder.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        masks = [str(_need(root / "annotations" / sub / (Path(f).stem + ".png"), layout)) for f in files]
        ds.splits[split] = _file_split(split, files, info, masks=masks)
    check(bool(ds.splits), f"{root / 'images'} holds neither training/ nor validation/: expected {layout}")
    return ds


DENSE_BUILDERS = {"digits_canvas": build_digits_canvas, "voc": build_voc, "coco": build_coco,
                  "cityscapes": build_cityscapes, "ade20k": build_ade20k}
BUILDERS.update(DENSE_BUILDERS)  # build_dataset knows them once src.data is imported (its __init__ imports this)


# ------------------------------------------------------------------------------------------ target checks
def check_mask(mask: torch.Tensor, num_classes: int, where: str) -> None:
    """A mask's class ids are in [0, num_classes) or 255 (ignore): one line naming the file / sample."""
    bad = mask[(mask != IGNORE) & (mask.long() >= num_classes)]
    check(bad.numel() == 0, f"{where}: mask holds class id {int(bad.max()) if bad.numel() else 0} but the "
                            f"dataset has {num_classes} classes (ids 0..{num_classes - 1}, 255 = ignore): fix "
                            f"dataset.num_classes or the mask files")


def check_dense_split(split: Split, task: str, probe: int = 8) -> None:
    """Before any training: a detection split holds boxes (an empty one cannot be learnt or scored); the first
    `probe` masks of a segmentation split have ids in range."""
    t = split.targets or {}
    name = f"dataset '{split.info.name}' split '{split.name}'"
    if task == "detection":
        check("boxes" in t, f"{name} has no boxes: a detection downstream needs a detection dataset (boxes and "
                            f"labels per image)")
        total = sum(int(b.shape[0]) for b in t["boxes"])
        check(total > 0, f"{name} has {len(split)} images but no boxes: give a detection dataset with "
                         f"annotations (or fix dataset.root)")
        n = split.info.num_classes
        for lab in t["box_labels"]:
            check(lab.numel() == 0 or int(lab.min()) >= 1 and int(lab.max()) <= n,
                  f"{name}: a box label {lab.tolist()} is outside 1..{n}: fix dataset.num_classes")
    else:
        check("masks" in t, f"{name} has no masks: a segmentation downstream needs a segmentation dataset")
        for i in range(min(probe, len(split))):
            check_mask(read_mask(split, i), split.info.num_classes, _where(split, i))


def _where(split: Split, i: int) -> str:
    m = split.targets["masks"]
    return m[i] if isinstance(m, list) else f"dataset '{split.info.name}' split '{split.name}' sample {i}"


# ------------------------------------------------------------------------------------------------- reading
def read_mask(split: Split, i: int) -> torch.Tensor:
    """Sample i's mask, uint8 (H, W), through the dataset's value map (Cityscapes / ADE20K ids)."""
    m = split.targets["masks"]
    if torch.is_tensor(m):
        return m[i]
    from PIL import Image

    with Image.open(m[i]) as im:  # a palette PNG (VOC) reads as its indices; 'L' as values
        arr = torch.from_numpy(np.array(im if im.mode in ("P", "L") else im.convert("L"), dtype=np.uint8))
    lut = MASK_LUTS.get(split.info.name)
    return lut[arr.long()] if lut is not None else arr


def read_image(split: Split, i: int) -> torch.Tensor:
    """Sample i's image, uint8 (C, H, W) at its own size."""
    if split.images is not None:
        return split.images[i]
    from PIL import Image

    with Image.open(split.files[i]) as im:
        arr = np.asarray(im.convert("L" if split.info.channels == 1 else "RGB"), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _resize(x: torch.Tensor, size: tuple, nearest: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x[None].float(), size=size, mode="nearest" if nearest else "bilinear",
                      align_corners=None if nearest else False)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


def scale_crop(img: torch.Tensor, mask: torch.Tensor, size: int, s: float, u: float, v: float):
    """Image (C, S, S) and mask (S, S) rescaled by `s`, then cropped at relative offset (u, v) back to S x S
    (padded with 0 / ignore when smaller): the same geometry for both."""
    n = max(1, int(round(size * s)))
    img, mask = _resize(img, (n, n), False), _resize(mask[None], (n, n), True)[0]
    if n < size:
        pad = size - n
        img = F.pad(img, (0, pad, 0, pad), value=0)
        mask = F.pad(mask, (0, pad, 0, pad), value=IGNORE)
        return img, mask
    y, x = int(u * (n - size)), int(v * (n - size))
    return img[:, y:y + size, x:x + size], mask[y:y + size, x:x + size]


class DenseLoader(_OrderMixin):
    """Batches of a dense split (module docstring) with the tensor loader's order semantics (seeded shuffle per
    epoch, resume inside an epoch, rank shards); augmentation parameters are drawn per epoch position from
    (seed, epoch), so a resumed epoch sees the same ones."""

    def __init__(self, split: Split, task: str, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 augment: bool = False, seed: int = 0, device="cpu", rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        check(task in DENSE_TASKS, f"task={task} is not a dense task: use one of {list(DENSE_TASKS)}")
        self.split, self.task, self.size = split, task, int(split.info.image_size)
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), int(batch_size), shuffle, drop_last
        self.augment, self.seed, self.rank, self.world_size = bool(augment), seed, rank, world_size
        self.device = resolve_device(device) if device in (None, "auto") else torch.device(device)
        self.channels_last = bool(channels_last)

    @property
    def augmented(self) -> bool:
        return self.augment

    def epoch_parameters(self, epoch: int) -> Dict[str, torch.Tensor]:
        n = self._positions()
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 13))
        lo, hi = SCALE_RANGE
        p = {"scale": lo + (hi - lo) * torch.rand(n, generator=g), "u": torch.rand(n, generator=g),
             "v": torch.rand(n, generator=g), "flip": torch.rand(n, generator=g) < 0.5}
        return {k: self.shard(v) for k, v in p.items()}

    def sample(self, i: int, aug: Optional[dict]) -> tuple:
        """(image uint8 (C, S, S), mask (S, S) | {boxes, labels}) of sample i, augmented with `aug` if given."""
        img = read_image(self.split, i)
        h, w = img.shape[-2:]
        img = _resize(img, (self.size, self.size), False)
        if self.task == "segmentation":
            mask = _resize(read_mask(self.split, i)[None], (self.size, self.size), True)[0]
            check_mask(mask, self.split.info.num_classes, _where(self.split, i))
            if aug is not None:
                img, mask = scale_crop(img, mask, self.size, *(float(aug[k]) for k in ("scale", "u", "v")))
                if aug["flip"]:
                    img, mask = img.flip(-1), mask.flip(-1)
            return img, mask
        t = self.split.targets
        boxes = t["boxes"][i] * torch.tensor([self.size / w, self.size / h] * 2)
        if aug is not None and aug["flip"]:
            img = img.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        return img, {"boxes": boxes, "labels": t["box_labels"][i]}

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        params = self.epoch_parameters(epoch) if self.augment else {}
        bs = self.batch_size
        for b, pos in self.batch_positions(epoch, start_batch):
            items = [self.sample(int(i), {k: v[b * bs + j] for k, v in params.items()} if params else None)
                     for j, i in enumerate(pos.tolist())]
            x = torch.stack([it[0] for it in items]).to(self.device).float().div_(255)
            if self.task == "segmentation":
                y = torch.stack([it[1] for it in items]).long().to(self.device)
            else:
                y = [{k: v.to(self.device) for k, v in it[1].items()} for it in items]
            yield Batch(image_layout(x, self.channels_last), y, self.split.ids[pos].to(self.device))

    def __iter__(self):
        return self.iter_epoch(0)


def build_dense_loader(cfg, split: Split, task: str, train: bool, seed: int = 0, device="cpu", rank: int = 0,
                       world_size: int = 1, channels_last: bool = False) -> DenseLoader:
    """A DenseLoader from a loader config node (batch sizes, shuffle, drop_last; augment != none turns the
    task's training augmentation on)."""
    check(len(split) > 0, f"split '{split.name}' is empty: check dataset.splits / the downstream subset")
    bs = int(cfg.batch_size if train else cfg.eval_batch_size)
    if train:
        check(bs * world_size <= len(split), f"loader.batch_size={bs} is larger than the {len(split)} samples of "
                                             f"split '{split.name}': lower finetune.loader.batch_size")
    drop_last = bool(cfg.drop_last) and train
    if train and not drop_last and (len(split) // world_size) % bs == 1:
        # a last training batch of one sample: the heads' BatchNorm (DeepLabV3's ASPP pooling, 1x1 features) cannot
        # normalise one value per channel and fails mid-epoch; torchvision's references drop it the same way
        log.info("%s: the last training batch of each epoch (1 of %d samples) is dropped: BatchNorm needs 2",
                 split.name, len(split))
        drop_last = True
    return DenseLoader(split, task, bs, shuffle=bool(cfg.shuffle) and train, drop_last=drop_last,
                       augment=train and cfg.augment != "none", seed=seed, device=device, rank=rank,
                       world_size=world_size, channels_last=channels_last)
