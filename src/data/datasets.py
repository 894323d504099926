"""Datasets as named splits. Images are uint8 tensors (N, C, H, W) in memory, or files read on demand.

Every dataset knows its classes, image shape and mean/std (`DatasetInfo`). Nothing is ever downloaded: a missing
file raises a UserError naming the expected path and layout.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, check, closest

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    classes: List[str]
    channels: int
    image_size: int
    mean: List[float]
    std: List[float]
    crop_pct: float = 1.0
    modality: str = "image"  # what the inputs are (image | text): methods refuse the ones they cannot handle
    source: str = ""  # what the data is when the name does not say it (an ImageFolder's folder name: .beton names)
    tokenizer: str = ""  # text: the folder of the dataset's tokenizer (trained on its train split, src/data/text.py)
    task: str = "classification"  # what the targets are: classification | segmentation | detection (dense.py)


@dataclass
class Split:
    """One named split. `ids` are stable sample ids within the split (kept by subsets), used as cache keys."""

    name: str
    labels: torch.Tensor  # int64 (N,)
    ids: torch.Tensor  # int64 (N,)
    images: Optional[torch.Tensor] = None  # uint8 (N, C, H, W) for in-memory data
    files: Optional[List[str]] = None  # image paths for file-backed data
    info: Optional[DatasetInfo] = None
    full_size: int = 0  # size of the split before subsetting (memory banks, caches)
    texts: Optional[List[str]] = None  # raw texts of a text dataset (its models tokenise for themselves)
    # dense tasks (dense.py): per-sample targets by name, each a tensor or a list indexed like the samples
    # (masks (N, H, W) uint8 or mask files; boxes / box_labels: one tensor per image); labels are then all 0
    targets: Optional[Dict[str, object]] = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def select(self, positions: torch.Tensor) -> "Split":
        positions = torch.as_tensor(positions, dtype=torch.long)
        return Split(
            name=self.name,
            labels=self.labels[positions],
            ids=self.ids[positions],
            images=None if self.images is None else self.images[positions],
            files=None if self.files is None else [self.files[i] for i in positions.tolist()],
            info=self.info,
            full_size=self.full_size,
            texts=None if self.texts is None else [self.texts[i] for i in positions.tolist()],
            targets=None if self.targets is None else {
                k: v[positions] if torch.is_tensor(v) else [v[i] for i in positions.tolist()]
                for k, v in self.targets.items()},
        )

    def materialize(self, size: Optional[int] = None) -> "Split":
        """A copy with `images` decoded into memory (file-backed splits; small ImageFolders)."""
        if self.images is not None or self.texts is not None:  # in memory already (texts are never images)
            return self
        size = size or self.info.image_size
        imgs = torch.empty((len(self), self.info.channels, size, size), dtype=torch.uint8)
        for i, f in enumerate(self.files):
            imgs[i] = load_image(f, self.info.channels, size)
        out = self.select(torch.arange(len(self)))
        out.images, out.files = imgs, None
        return out


@dataclass
class Dataset:
    info: DatasetInfo
    splits: Dict[str, Split] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise UserError(
                f"dataset '{self.info.name}' has no split '{name}'{closest(name, self.splits)}; "
                f"its splits are {sorted(self.splits)}")
        return self.splits[name]


# ----------------------------------------------------------------------------------------------- helpers


def stratified_partition(labels: np.ndarray, fractions: Dict[str, float], seed: int) -> Dict[str, np.ndarray]:
    """Split positions into named parts with the given fractions, per class, seeded. Every class is spread over
    the parts in the same proportions (largest-remainder rounding per class)."""
    check(len(fractions) > 0, "dataset.splits is empty: give fractions, e.g. dataset.splits={train:0.8,test:0.2}")
    for k, v in fractions.items():
        check(0 < float(v) <= 1, f"dataset.splits.{k}={v} is outside (0, 1]: use a fraction such as 0.2")
    total = sum(float(v) for v in fractions.values())
    check(abs(total - 1.0) < 1e-6, f"dataset.splits fractions sum to {total:.4f}, not 1: rescale them")
    rng = np.random.default_rng(seed)
    names = list(fractions)
    out: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(len(pos))]
        raw = np.array([fractions[n] * len(pos) for n in names])
        counts = np.floor(raw).astype(int)
        for j in np.argsort(-(raw - counts))[: len(pos) - counts.sum()]:
            counts[j] += 1
        start = 0
        for n, k in zip(names, counts):
            out[n].append(pos[start:start + k])
            start += k
    return {n: np.sort(np.concatenate(v)) for n, v in out.items()}


def subset_positions(labels: torch.Tensor, fraction: Optional[float], per_class: Optional[int],
                     seed: int) -> torch.Tensor:
    """Positions of a seeded per-class subset: a fraction of each class or a number of images per class."""
    if fraction is None and per_class is None:
        return torch.arange(labels.numel())
    if fraction is not None:
        check(0 < fraction <= 1, f"dataset.subset.fraction={fraction} is outside (0, 1]: use e.g. 0.1")
    if per_class is not None:
        check(per_class > 0, f"dataset.subset.per_class={per_class} must be > 0: use e.g. 128")
    g = np.random.default_rng(seed)
    lab = labels.numpy()
    keep = []
    for c in np.unique(lab):
        pos = np.flatnonzero(lab == c)
        pos = pos[g.permutation(len(pos))]
        k = per_class if per_class is not None else max(1, int(round(fraction * len(pos))))
        keep.append(pos[:k])
    keep = np.sort(np.concatenate(keep))
    check(len(keep) > 0, "the subset is empty: raise dataset.subset.fraction or dataset.subset.per_class")
    return torch.from_numpy(keep)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)
    raise UserError(f"cannot convert {c}-channel images to dataset.channels={channels}: use 1 or {c}")


def load_image(path: str, channels: int, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _make_split(name, labels, images=None, files=None, info=None) -> Split:
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = labels.numel()
    return Split(name=name, labels=labels, ids=torch.arange(n), images=images, files=files, info=info,
                 full_size=n)


def _holdout_val(ds: Dataset, fraction: float, seed: int) -> None:
    if fraction <= 0:
        return
    train = ds.splits["train"]
    parts = stratified_partition(train.labels.numpy(), {"train": 1 - fraction, "val": fraction}, seed)
    for name in ("train", "val"):
        s = train.select(torch.from_numpy(parts[name]))
        s.name, s.ids, s.full_size = name, torch.arange(len(s)), len(s)
        ds.splits[name] = s


# ----------------------------------------------------------------------------------------------- builders


def build_digits(cfg) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    images = set_channels(resize_uint8(images, cfg.image_size), cfg.channels)
    labels = d.target.astype(np.int64)
    info = _info(cfg, [str(c) for c in d.target_names])
    ds = Dataset(info)
    for name, pos in stratified_partition(labels, dict(cfg.splits), cfg.split_seed).items():
        p = torch.from_numpy(pos)
        ds.splits[name] = _make_split(name, labels[pos], images=images[p].contiguous(), info=info)
    return ds


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python-format batches are pickles; allow only what they contain (numpy arrays, builtins)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
                # protocol >= 5 pickles (re-saved with a recent numpy) rebuild arrays from a buffer
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch file")


def _read_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def build_cifar(cfg, paths) -> Dataset:
    n100 = cfg.name == "cifar100"
    root = Path(cfg.root or os.path.join(paths.data, cfg.name))
    sub = root / ("cifar-100-python" if n100 else "cifar-10-batches-py")
    layout = ("cifar-100-python/{train,test,meta}" if n100 else
              "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}")
    train_files = [sub / "train"] if n100 else [sub / f"data_batch_{i}" for i in range(1, 6)]
    test_files = [sub / "test"] if n100 else [sub / "test_batch"]
    missing = [str(p) for p in train_files + test_files if not p.is_file()]
    if missing:
        raise UserError(
            f"{cfg.name} not found: missing {missing[0]}; expected torchvision's python format {root}/{layout} "
            f"(set paths.data or dataset.root; nothing is downloaded)")
    key = "fine_labels" if n100 else "labels"

    def read(files):
        xs, ys = [], []
        for p in files:
            try:
                b = _read_cifar_batch(p)
                xs.append(np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(b[key], dtype=np.int64))
            except Exception as e:  # truncated / wrong file
                raise UserError(f"cannot read CIFAR batch {p}: {e}; re-extract the original archive") from e
        return torch.from_numpy(np.concatenate(xs)), np.concatenate(ys)

    meta_path = sub / ("meta" if n100 else "batches.meta")
    classes = [str(i) for i in range(cfg.num_classes)]
    if meta_path.is_file():
        meta = _read_cifar_batch(meta_path)
        classes = list(meta.get("fine_label_names" if n100 else "label_names", classes))
    info = _info(cfg, classes)
    ds = Dataset(info)
    for name, files in (("train", train_files), ("test", test_files)):
        x, y = read(files)
        x = set_channels(resize_uint8(x, cfg.image_size), cfg.channels)
        ds.splits[name] = _make_split(name, y, images=x, info=info)
    _holdout_val(ds, cfg.val_fraction, cfg.split_seed)
    return ds


def scan_image_folder(folder: Path):
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for root, _, fnames in sorted(os.walk(folder / name)):
            for fn in sorted(fnames):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(root, fn))
                    labels.append(c)
    return classes, files, labels


_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"BM": "bmp", b"GIF8": "gif",
          b"II*\x00": "tiff", b"MM\x00*": "tiff", b"RIFF": "webp", b"P5": "pnm", b"P6": "pnm", b"P2": "pnm",
          b"P3": "pnm"}
_END = {"jpeg": b"\xff\xd9", "png": b"IEND"}  # what a complete file holds near its end
_TAIL = 4096  # bytes searched for the end marker (some writers append a little metadata after it)


def image_file_problem(path: str) -> Optional[str]:
    """Why an image file cannot be decoded, from a cheap look at its first and last bytes (no decoding): 'empty',
    'not an image' (no known header), 'truncated' (a JPEG without its end marker, a PNG without IEND); None when
    it looks whole. Unknown headers are asked of PIL (it reads only the header)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
    if kind is None:
        try:
            from PIL import Image

            with Image.open(path):
                return None
        except Exception:
            return f"not an image ({size} bytes, no image header)"
    end = _END.get(kind)
    if end is not None and end not in tail:
        return f"truncated ({kind} without its end marker, {size} bytes)"
    return None


def _stat_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _checked_record(folder: Path, cache) -> Optional[Path]:
    """Where the (size, mtime) of every image of `folder` that passed the check is kept between runs:
    `<paths.cache>/image_checks/<sha of the folder's path>.json` (None without a cache)."""
    if not cache:
        return None
    import hashlib

    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(cache) / "image_checks" / f"{Path(folder).name}-{key}.json"


def check_image_files(files: Sequence[str], folder: Path, workers: int = 16, cache=None) -> int:
    """Every image of a split is looked at once when the split is built (its first 16 and last 4096 bytes, in
    threads: the reads wait on the disk), so a bad file is named now, not when a batch happens to draw it hours in.
    With `cache` (paths.cache) the files that passed are recorded by (size, mtime), and a later run looks again
    only at the files that are new or changed since (ImageNet: 1.28M stat calls instead of 1.28M opens and reads).
    KT_CHECK_IMAGES=0 skips it. Returns the number of files looked at."""
    from concurrent.futures import ThreadPoolExecutor

    if os.environ.get("KT_CHECK_IMAGES", "1") == "0":  # e.g. a verified copy on a slow network file system
        return 0
    record_path = _checked_record(folder, cache)
    record = {}
    if record_path is not None and record_path.is_file():
        try:
            import json

            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}  # a torn record: look at every file again
    prefix = str(folder) + os.sep
    rel = [f[len(prefix):] if f.startswith(prefix) else f for f in files]  # the record's keys: half the size
    n = max(1, min(workers, len(files)))
    with ThreadPoolExecutor(max_workers=n) as ex:
        stats = list(ex.map(_stat_key, files, chunksize=256))
        todo = [f for f, r, st in zip(files, rel, stats) if st is None or record.get(r) != st]
        problems = [(f, p) for f, p in zip(todo, ex.map(image_file_problem, todo, chunksize=256)) if p]
    if problems:
        shown = "; ".join(f"{f}: {p}" for f, p in problems[:5])
        raise UserError(f"{len(problems)} image file(s) under {folder} cannot be decoded ({shown}"
                        f"{'; ...' if len(problems) > 5 else ''}): replace or delete them (a deleted file leaves "
                        f"its class folder; keep at least one image per class)")
    if record_path is not None and todo:
        from ..io_utils import write_json

        try:
            write_json(record_path, {r: st for r, st in zip(rel, stats) if st is not None})
        except (OSError, UserError):
            pass  # a read-only or full cache: the next run looks at every file again, nothing is lost
    return len(todo)


def build_imagefolder(cfg, paths) -> Dataset:
    if cfg.name == "imagefolder" and not cfg.root:
        raise UserError("dataset=imagefolder needs dataset.root=<dir with train/ and val/ class folders> and "
                        "dataset.num_classes=<number of classes>")
    root = Path(cfg.root or os.path.join(paths.data, cfg.name))
    layout = f"{root}/{{{cfg.train_dir},{cfg.val_dir}}}/<class>/<image>.jpg"
    info, ds = None, None
    for name, sub in (("train", cfg.train_dir), ("test", cfg.val_dir)):
        folder = root / sub
        if not folder.is_dir():
            raise UserError(f"{cfg.name}: folder {folder} not found; expected the ImageFolder layout {layout} "
                            f"(set paths.data or dataset.root)")
        classes, files, labels = scan_image_folder(folder)
        if not files:
            raise UserError(f"{cfg.name}: no images ({', '.join(IMG_EXTENSIONS[:3])}, ...) under {folder}; "
                            f"expected {layout}")
        check_image_files(files, folder, cache=getattr(paths, "cache", None))
        present = set(labels)  # once: per class it was K x N work (ImageNet: 1000 x 1.28M at every start)
        empty = [c for i, c in enumerate(classes) if i not in present]
        if empty:  # a K-way head trained on K-1 classes (torchvision's ImageFolder refuses it too)
            raise UserError(f"{cfg.name}: {len(empty)} class folder(s) of {folder} hold no image "
                            f"({', '.join(str(folder / c) for c in empty[:3])}{', ...' if len(empty) > 3 else ''}): "
                            f"add their images, or remove the empty folders from both splits and set "
                            f"dataset.num_classes={len(classes) - len(empty)}")
        if info is None:
            check(len(classes) == cfg.num_classes,
                  f"{cfg.name}: {folder} has {len(classes)} class folders but dataset.num_classes="
                  f"{cfg.num_classes}: set dataset.num_classes={len(classes)}")
            info = _info(cfg, classes)
            ds = Dataset(info)
        elif classes != info.classes:
            raise UserError(f"{cfg.name}: class folders of {folder} differ from those of {root / cfg.train_dir}; "
                            f"both splits need the same class folders")
        ds.splits[name] = _make_split(name, labels, files=files, info=info)
    _holdout_val(ds, cfg.val_fraction, cfg.split_seed)
    return ds


def _info(cfg, classes: Sequence[str]) -> DatasetInfo:
    check(cfg.num_classes == len(classes),
          f"dataset.num_classes={cfg.num_classes} but {cfg.name} has {len(classes)} classes: set "
          f"dataset.num_classes={len(classes)}")
    check(len(cfg.mean) == cfg.channels and len(cfg.std) == cfg.channels,
          f"dataset.mean/std have {len(cfg.mean)}/{len(cfg.std)} values for dataset.channels={cfg.channels}: "
          f"give one per channel")
    return DatasetInfo(name=cfg.name, num_classes=len(classes), classes=list(classes), channels=cfg.channels,
                       image_size=cfg.image_size, mean=list(cfg.mean), std=list(cfg.std), crop_pct=cfg.crop_pct,
                       source=data_source(cfg))


def data_source(cfg) -> str:
    """'' for a dataset its name identifies (digits, cifar10, imagenet); for the generic `imagefolder`, the name of
    its root folder (dtd, caltech256): two ImageFolder datasets must not share .beton files."""
    if cfg.name != "imagefolder" or not cfg.get("root"):
        return ""
    return Path(str(cfg.root)).resolve().name or "root"


BUILDERS = {
    "digits": lambda cfg, paths: build_digits(cfg),
    "cifar10": build_cifar,
    "cifar100": build_cifar,
    "imagefolder": build_imagefolder,
    "imagenet": build_imagefolder,
}  # + the text datasets (src/data/text.py) and the dense-task datasets (src/data/dense.py: digits_canvas, voc, ...)


def build_dataset(cfg, paths) -> Dataset:
    """Build every split of `cfg` (a dataset config node). The subset (fraction / per_class) is applied by the
    experiments to the split they train on, see `training_split`."""
    if cfg.name not in BUILDERS:
        raise UserError(f"unknown dataset '{cfg.name}'{closest(cfg.name, BUILDERS)}; "
                        f"known: {', '.join(sorted(BUILDERS))}")
    check(cfg.image_size > 0, f"dataset.image_size={cfg.image_size} must be > 0")
    check(cfg.channels in (1, 3), f"dataset.channels={cfg.channels} must be 1 or 3")
    return BUILDERS[cfg.name](cfg, paths)


def training_split(ds: Dataset, name: str, subset_cfg) -> Split:
    """The named split with the configured seeded subset applied (e.g. the 10% ImageNet subset)."""
    split = ds.split(name)
    pos = subset_positions(split.labels, subset_cfg.fraction, subset_cfg.per_class, subset_cfg.seed)
    return split if len(pos) == len(split) else split.select(pos)
