"""FFCV backend: `.beton` files written by `scripts/write_ffcv.py`, read with FFCV's JIT-compiled pipelines.

File layout: ``<loader.ffcv_dir>/<dataset name>_<split name>.beton`` with three fields, in this order:
``image`` (RGBImageField; grayscale data is stored as 3 equal channels), ``label`` (IntField) and ``index``
(IntField, the split's sample ids). Subsets of a split (``dataset.subset``) read the beton of the full split and
select its rows by matching their ids against the ``index`` field.

Pipelines (all image work happens in FFCV's decoders and numba ops, on CPU threads):
- train, ``augment=rrc_flip``: RandomResizedCropRGBImageDecoder(image_size) [+ RandomHorizontalFlip]
- train, ``augment=crop_flip``: CenterCropRGBImageDecoder(image_size, ratio=1) + RandomTranslate(crop_padding)
  (random crop of the zero-padded image) [+ RandomHorizontalFlip]
- eval (or ``augment=none``): CenterCropRGBImageDecoder(image_size, ratio=crop_pct), i.e. the centre crop of
  ``crop_pct`` x the short side resized to image_size (= resize to image_size / crop_pct, centre crop)
then ToTensor -> ToDevice (when the device is not the CPU) -> ToTorchImage; the uint8 batch is turned into
float32 in [0, 1] on the device (no normalisation: models normalise themselves) and, for 1-channel datasets,
averaged back to one channel, then (``channels_last=True``) laid out channels_last. Batches are
`src.batch.Batch`es (inputs = the images, targets = the labels, ids = the ``index`` field).

Ordering: ``loader.ffcv_order`` = random | quasi_random | sequential for shuffled (train) loaders, seeded with
the loader's seed; evaluation loaders are sequential. With ``world_size > 1`` the loader is distributed: every
rank reads a disjoint share like torch's DistributedSampler (FFCV's own distributed orders take the rank from
torch.distributed and do not support quasi_random; we pass rank/world_size explicitly and use random instead of
quasi_random there).

Page checksums: write_ffcv.py records the sha256 of every ``page_size`` page of the file in a sidecar
``<file>.beton.sha256.json``; every loader start checks them per ``loader.verify`` (full = every page, sample =
SAMPLE_PAGES pages: the first, the last and others drawn with the loader's seed; none = nothing) and names the damaged file and page. A beton
without a sidecar (written by FFCV itself) is warned about once and used.

Resume: ``iter_epoch(epoch, start_batch)`` recomputes the epoch's sample order, a function of (seed, epoch) for
every ffcv_order (FFCV's QuasiRandom shuffles its page table in place, so we restore that table before each
draw), and starts FFCV's epoch iterator at batch ``start_batch``: skipped batches are neither read nor decoded.
FFCV's augmentations draw from numba's per-thread random state, which is not seeded: augmented pixels are not
bit-reproducible across runs (the sample order is).

`num_workers` is the number of FFCV decoding threads (0 = all cores). The first batch of every new loader costs
a numba JIT compilation (about 15 s on a laptop-class CPU).
"""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..batch import Batch
from ..errors import UserError, check

FIELDS = ("image", "label", "index")
ORDERS = ("random", "quasi_random", "sequential")
log = logging.getLogger(__name__)
# Every function FFCV's Compiler njit-compiles (per loader: its decoders, memory reader and pipeline stages; some
# are dropped at once, e.g. by a second collect_requirements). Collected mid-run (gc inside the next loader's
# compilation), such a dispatcher's finalizer fails on its own overloads table: "Exception ignored in: <finalize
# object ...> ... KeyError: (Array(uint8, ...), ...)" on stderr, several per run. Kept until exit, where numba's
# shutdown guard skips those finalizers. Costs each loader's machine code (kilobytes), never its batch buffers.
_COMPILED: list = []
_CAPPED: list = []  # loader.num_workers already reported as capped


def _keep_compiled() -> None:
    """Wrap FFCV's Compiler.compile (once) so that every dispatcher it makes lands in _COMPILED."""
    from ffcv.pipeline.compiler import Compiler

    if getattr(Compiler, "_kt_keeps_compiled", False):
        return
    original = Compiler.compile.__func__

    def compile(cls, code, signature=None):
        out = original(cls, code, signature)
        _COMPILED.append(out)
        return out

    Compiler.compile = classmethod(compile)
    Compiler._kt_keeps_compiled = True


def _run_dataset_options(info) -> List[str]:
    """The overrides of this Hydra run that choose or change the dataset `info` describes (`paths.data=...`,
    `dataset=...`, `dataset.*=...`), so the write command rebuilds the same samples; `dataset=<name>
    dataset.num_classes=<K>` outside Hydra or for a dataset that is not the run's own (KDEP's downstreams)."""
    opts: List[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            own = hc.runtime.choices.get("dataset") == info.name
            for o in hc.overrides.task:
                key = o.lstrip("+~").split("=", 1)[0]
                if key == "paths.data" or (own and (key == "dataset" or key.startswith("dataset."))):
                    opts.append(o)
    except Exception:  # pragma: no cover - a hint must never fail the error it belongs to
        opts = []
    if not any(o.lstrip("+~").startswith("dataset=") for o in opts):
        opts.insert(0, f"dataset={info.name}")
    if not any(o.lstrip("+~").startswith("dataset.num_classes=") for o in opts):
        opts.append(f"dataset.num_classes={info.num_classes}")
    return opts


def write_command(info, split: str, folder) -> str:
    """The scripts/write_ffcv.py command that writes split `split` of the dataset `info` into `folder`, with this
    run's dataset options."""
    return (f"python scripts/write_ffcv.py {' '.join(_run_dataset_options(info))} --splits {split} "
            f"--out-dir {folder}")


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UserError(
            f"loader.backend=ffcv needs the ffcv package ({e}); install it with `make install` (root installs "
            f"libopencv-dev libturbojpeg0-dev with apt, then `pip install ffcv`) or use loader=tensor/torch") from e


def beton_path(ffcv_dir: Optional[str], dataset: str, split: str, source: str = "") -> Path:
    """<ffcv_dir>/<dataset>_<split>.beton; a generic ImageFolder is named by its folder too
    (`imagefolder-dtd_train.beton`), so several ImageFolder datasets (KDEP's downstreams) never share a file."""
    if not ffcv_dir:
        raise UserError("loader.ffcv_dir is not set: point it at the folder of .beton files written by "
                        "scripts/write_ffcv.py (e.g. loader.ffcv_dir=data/ffcv)")
    return Path(ffcv_dir) / f"{dataset}{'-' + source if source else ''}_{split}.beton"


def beton_damage(path) -> Optional[str]:
    """Why the .beton at `path` cannot be read completely, or None when its layout is whole. Cheap (the header,
    the field descriptors and the allocation table, which FFCV's Reader reads anyway; no sample data).

    FFCV's Reader does not check sizes: a zero-byte or header-short file fails inside numpy (IndexError,
    "negative dimensions"), and a file cut in its data pages or allocation table is accepted with fewer
    allocations, whose samples are then read from beyond the end of the file. A beton is laid out as
    header | field descriptors | metadata (one row per sample) | data pages | allocation table (to the end of the
    file, at header.alloc_table_ptr; one entry per stored image), so every cut leaves a checkable trace."""
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, TYPE_ID_HANDLER,
                            get_handlers, get_metadata_type)

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with os.fdopen(os.open(path, os.O_RDONLY), "rb") as f:
        head = f.read(HeaderType.itemsize)
        if len(head) < HeaderType.itemsize:
            return f"truncated: {size} bytes, shorter than FFCV's {HeaderType.itemsize}-byte header"
        header = np.frombuffer(head, dtype=HeaderType)[0]
        if int(header["version"]) != CURRENT_VERSION:
            return (f"not a .beton of FFCV's format version {CURRENT_VERSION} (its header says version "
                    f"{int(header['version'])})")
        n_fields, n = int(header["num_fields"]), int(header["num_samples"])
        desc_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
        if n_fields == 0 or size < desc_end:
            return f"truncated: {size} bytes, its {n_fields} field descriptors end at byte {desc_end}"
        descs = np.frombuffer(f.read(desc_end - HeaderType.itemsize), dtype=FieldDescType)
    types = [int(t) for t in descs["type_id"]]
    if any(t not in TYPE_ID_HANDLER or TYPE_ID_HANDLER[t] is None for t in types):
        return f"corrupt: unknown field type ids {types}"
    try:
        meta_size = n * get_metadata_type(get_handlers(descs)).itemsize
    except Exception as e:  # a garbled field descriptor
        return f"corrupt: unreadable field descriptors ({type(e).__name__})"
    table = int(header["alloc_table_ptr"])
    data_start = desc_end + meta_size
    if size < data_start:
        return f"truncated: {size} bytes, the metadata of its {n} samples ends at byte {data_start}"
    if table < data_start:
        return f"corrupt: its allocation table starts at byte {table}, inside the metadata"
    if size < table:
        return f"truncated: {size} bytes, its data pages end at byte {table}"
    if (size - table) % ALLOC_TABLE_TYPE.itemsize:
        return (f"truncated: {size} bytes, its allocation table (from byte {table}) holds a partial entry of "
                f"{(size - table) % ALLOC_TABLE_TYPE.itemsize} bytes")
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table)
    ids, end = alloc["sample_id"], alloc["ptr"] + alloc["size"]
    if len(alloc) and (int(ids.max()) >= n or int(alloc["ptr"].min()) < data_start or int(end.max()) > table):
        return "corrupt: its allocation table points outside the data pages"
    image_type = next(k for k, v in TYPE_ID_HANDLER.items() if v is not None and v.__name__ == "RGBImageField")
    if image_type in types:  # every stored image has one allocation: a cut table lacks the last samples'
        stored = np.zeros(n, dtype=bool)
        stored[ids.astype(np.int64)] = True
        if not stored.all():
            return (f"truncated: {size} bytes, its allocation table lists {int(stored.sum())} of {n} images "
                    f"(first missing: sample {int(np.flatnonzero(~stored)[0])})")
    return None


def check_beton(path, rewrite: str) -> None:
    """UserError naming `path` and the fix (`rewrite`, a command) when the beton is unreadable, empty, truncated
    or corrupt; before FFCV opens it (FFCV would fail inside numpy, or read past the end of the file)."""
    try:
        why = beton_damage(path)
    except PermissionError as e:
        raise UserError(f"FFCV file {path} is not readable (permission denied): fix its permissions "
                        f"(chmod a+r {path}) or {rewrite}") from e
    except OSError as e:
        raise UserError(f"FFCV file {path} cannot be read ({e.strerror or type(e).__name__}): {rewrite}") from e
    if why is not None:
        raise UserError(f"FFCV file {path} is unusable, {why}: {rewrite}")


def rewrite_hint(info, split: str, folder) -> str:
    return f"rewrite it with `{write_command(info, split, folder)} --overwrite`, or use loader=tensor/torch"


def read_beton_columns(path: Path, rewrite: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, ids) of every row of a beton, read from its metadata table (no decoding, no JIT); a damaged file
    is a UserError (`rewrite`: the fix it names)."""
    from ffcv.reader import Reader

    check_beton(path, rewrite or "rewrite it with `python scripts/write_ffcv.py ... --overwrite`")
    reader = Reader(str(path))
    names = list(reader.field_names)
    if names[:3] != list(FIELDS):
        raise UserError(f"{path} has fields {names}, expected {list(FIELDS)}: rewrite it with scripts/write_ffcv.py")
    meta = reader.metadata
    labels = np.asarray(meta[meta.dtype.names[1]], dtype=np.int64)
    ids = np.asarray(meta[meta.dtype.names[2]], dtype=np.int64)
    return labels, ids


# ------------------------------------------------------------------------------------------- page checksums

VERIFY = ("full", "sample", "none")
SAMPLE_PAGES = 8  # pages hashed per loader start with loader.verify=sample
_UNSIGNED: set = set()  # betons already warned about (no sidecar): once per file and process


def checksum_path(path) -> Path:
    """The sidecar of a beton: `<file>.beton.sha256.json` next to it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256.json")


def page_hashes(path, page_size: int, pages=None) -> dict:
    """{page number: sha256 hex} of the file's `page_size`-byte pages (the last one may be short): FFCV aligns its
    data pages to the page size of the header, so file page k is data page k - (pages of header + metadata)."""
    path = Path(path)
    n = -(-path.stat().st_size // page_size)
    out = {}
    with open(path, "rb") as f:
        for k in (range(n) if pages is None else pages):
            f.seek(k * page_size)
            out[int(k)] = hashlib.sha256(f.read(page_size)).hexdigest()
    return out


def write_checksums(path) -> Path:
    """Record the sha256 of every page of the (complete) beton at `path` in its sidecar, written atomically."""
    from ..io_utils import write_json

    path = Path(path)
    page = _header_page_size(path)
    hashes = page_hashes(path, page)
    side = checksum_path(path)
    write_json(side, {"file": path.name, "size": path.stat().st_size, "page_size": page, "algorithm": "sha256",
                      "pages": [hashes[k] for k in range(len(hashes))]})
    return side


def _header_page_size(path) -> int:
    from ffcv.types import HeaderType

    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(HeaderType.itemsize), dtype=HeaderType)[0]["page_size"])


def _read_sidecar(path, fix: str) -> Optional[dict]:
    """The sidecar's record, None when there is none (FFCV's own or an older beton); a torn one is a UserError."""
    from ..io_utils import read_json_safe

    side = checksum_path(path)
    if not side.exists():
        return None
    rec = read_json_safe(side, "FFCV checksum file", fix)
    ok = isinstance(rec, dict) and isinstance(rec.get("pages"), list) and isinstance(rec.get("page_size"), int) \
        and rec["page_size"] > 0 and isinstance(rec.get("size"), int)
    check(ok, f"FFCV checksum file {side} is not a page checksum record: {fix}")
    return rec


def sample_pages(n_pages: int, seed: int, name: str, k: int = SAMPLE_PAGES) -> list:
    """The pages loader.verify=sample hashes: the first (header, field descriptors, metadata) and the last (the
    allocation table's) and k - 2 more drawn with (seed, file name); every page of a small file."""
    if n_pages <= k:
        return list(range(n_pages))
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    drawn = rng.choice(np.arange(1, n_pages - 1), size=k - 2, replace=False)
    return sorted({0, n_pages - 1, *(int(i) for i in drawn)})


def verify_beton(path, mode: str, seed: int, rewrite: str) -> int:
    """Check the beton's pages against its sidecar (`mode`: full = every page, sample = a seeded handful, none =
    nothing); the number of pages hashed. A page whose bytes changed (overwritten image data decodes to noise and
    passes every header check) is a UserError naming the file and the page; a beton without a sidecar is warned
    about once and used."""
    check(mode in VERIFY, f"loader.verify='{mode}' is unknown: use one of {', '.join(VERIFY)}")
    if mode == "none":
        return 0
    path = Path(path)
    rec = _read_sidecar(path, f"delete it and {rewrite}")
    if rec is None:
        if str(path) not in _UNSIGNED:
            _UNSIGNED.add(str(path))
            log.warning("FFCV file %s has no page checksums (%s; written by FFCV itself or an older "
                        "scripts/write_ffcv.py): its pages are not verified; %s to add them", path,
                        checksum_path(path).name, rewrite)
        return 0
    size, page, pages = path.stat().st_size, rec["page_size"], rec["pages"]
    if size != rec["size"] or len(pages) != -(-size // page):
        raise UserError(f"FFCV file {path} is {size} bytes but its checksums ({checksum_path(path).name}) describe "
                        f"{rec['size']} bytes: it was changed after it was written; {rewrite}")
    todo = range(len(pages)) if mode == "full" else sample_pages(len(pages), seed, path.name)
    for k, h in page_hashes(path, page, todo).items():
        if h != pages[k]:
            raise UserError(f"FFCV file {path}: page {k} (bytes {k * page}-{min(size, (k + 1) * page) - 1}) does "
                            f"not match its checksum: the file was damaged after it was written; {rewrite}")
    return len(todo)


# ------------------------------------------------------------------------------------------------- writing


class _SplitSource:
    """Indexed dataset for ffcv's DatasetWriter: (HWC uint8 RGB image, label, id) per row of a split."""

    def __init__(self, split):
        self.split = split
        self.labels = split.labels.numpy().astype(np.int64)
        self.ids = split.ids.numpy().astype(np.int64)
        self.hwc = None
        if split.images is not None:
            self.hwc = split.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) view

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.hwc is not None:
            img = self.hwc[i]
        else:
            from PIL import Image

            with Image.open(self.split.files[i]) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img), int(self.labels[i]), int(self.ids[i])


def write_beton(split, path, write_mode: str = "raw", max_resolution: Optional[int] = None,
                jpeg_quality: int = 90, compress_probability: float = 0.5, smart_threshold: Optional[int] = None,
                num_workers: int = 1, chunksize: int = 100, seed: int = 0, page_size_mib: int = 8) -> Path:
    """Write one split (in-memory or file-backed) to `path` with fields image, label, index. Written to a temporary
    file first, then renamed, so an interrupted write never leaves a truncated beton behind; then the sha256 of
    every page goes to the sidecar `<file>.sha256.json` (`verify_beton` checks them when a loader opens the file).

    Every writer process fills its own pages of `page_size_mib` (FFCV's default 8 MiB; a power of two >= 2 that
    holds the largest stored image), so a tiny dataset still takes about num_workers x page size on disk."""
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    check(write_mode in ("raw", "jpg", "proportion", "smart"),
          f"write_mode='{write_mode}' is unknown: use raw, jpg, proportion or smart")
    check(0 <= compress_probability <= 1, f"compress_probability={compress_probability} is outside [0, 1]")
    check(1 <= jpeg_quality <= 100, f"jpeg_quality={jpeg_quality} is outside [1, 100]")
    check(len(split) > 0, f"split '{split.name}' is empty: nothing to write")
    check(page_size_mib >= 2 and page_size_mib & (page_size_mib - 1) == 0,
          f"page_size_mib={page_size_mib} must be a power of two >= 2 (FFCV's default is 8)")
    from ..io_utils import atomic_path

    path = Path(path)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability, smart_threshold=smart_threshold),
        "label": IntField(),
        "index": IntField(),
    }
    np.random.seed(seed)  # write_mode=proportion draws with np.random (in forked workers: same seed each)
    with atomic_path(path) as tmp:  # a temp file carrying this process's tag: a killed write's is removed later
        writer = DatasetWriter(str(tmp), fields, page_size=int(page_size_mib) << 20,
                               num_workers=max(1, int(num_workers)))
        writer.from_indexed_dataset(_SplitSource(split), chunksize=chunksize)
        checksum_path(path).unlink(missing_ok=True)  # the old file's checksums never describe the new one
    write_checksums(path)  # after the beton is complete: a crash before it leaves a beton without checksums
    return path


# ------------------------------------------------------------------------------------------------- reading


def decoding_threads(asked: int) -> int:
    """FFCV's decoding threads for loader.num_workers=`asked` (0 = all): numba refuses more threads than it
    started (NUMBA_NUM_THREADS, the cores), so the config's 8 on a 2-core machine was a ValueError traceback;
    it is capped there, with one log line."""
    from numba import config

    most = int(config.NUMBA_NUM_THREADS)
    if asked <= 0:
        return most
    if asked > most and not _CAPPED:
        _CAPPED.append(asked)  # said once per process
        log.info("loader.num_workers=%d: FFCV decodes with %d threads, all that numba has here "
                 "(NUMBA_NUM_THREADS)", asked, most)
    return min(asked, most)


def _sharded_order_class():
    from ffcv.traversal_order.base import TraversalOrder
    from torch.utils.data import DistributedSampler

    class ShardedOrder(TraversalOrder):
        """FFCV's distributed Random/Sequential order with an explicit rank and world size (FFCV's own read them
        from torch.distributed)."""

        def __init__(self, loader, shuffle: bool, seed: int, rank: int, world_size: int):
            super().__init__(loader)
            self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size

        def sample_order(self, epoch: int):
            s = DistributedSampler(self.indices, num_replicas=self.world_size, rank=self.rank,
                                   shuffle=self.shuffle, seed=self.seed, drop_last=False)
            s.set_epoch(epoch)
            return self.indices[np.array(list(s), dtype=np.int64)]

    return ShardedOrder


class FFCVLoader:
    """Batches (inputs, targets, ids) from `<ffcv_dir>/<dataset>_<split>.beton`; same interface as TensorLoader."""

    def __init__(self, cfg, split, train: bool, batch_size: int, shuffle: bool, drop_last: bool,
                 augment: str = "none", crop_padding: int = 0, flip: bool = False, seed: int = 0, device="cpu",
                 rank: int = 0, world_size: int = 1, dtype=torch.float32, channels_last: bool = False):
        _import_ffcv()
        _keep_compiled()
        from ffcv.loader import Loader

        info = split.info
        check(info is not None, f"split '{split.name}' has no DatasetInfo: build it with src.data.build_dataset")
        self.path = beton_path(cfg.ffcv_dir, info.name, split.name, info.source)
        if not self.path.is_file():
            raise UserError(
                f"FFCV file {self.path} not found; write it with `{write_command(info, split.name, self.path.parent)}`"
                f", or use loader=tensor/torch")
        order_name = str(cfg.ffcv_order)
        if order_name not in ORDERS:
            raise UserError(f"loader.ffcv_order='{order_name}' is unknown: use {', '.join(ORDERS)}")
        check(augment in ("none", "crop_flip", "rrc_flip"),
              f"loader.augment='{augment}' is unknown: use none, crop_flip or rrc_flip")

        self.split_name, self.n, self.batch_size = split.name, len(split), int(batch_size)
        self.shuffle, self.drop_last, self.seed = bool(shuffle), bool(drop_last), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device, self.dtype = torch.device(device), dtype
        self.channels_last = bool(channels_last)
        self.augment = augment if train else "none"
        self.channels, self.image_size = info.channels, info.image_size

        # rows of the beton that hold this split's samples (the split may be a subset of the written split)
        rewrite = rewrite_hint(info, split.name, self.path.parent)
        labels, ids = read_beton_columns(self.path, rewrite)
        self.indices = self._rows_for(split, labels, ids)
        # the page checksums of write_ffcv.py: header checks pass on a beton whose image pages were overwritten
        self.verified_pages = verify_beton(self.path, str(cfg.get("verify", "sample")), self.seed, rewrite)

        image, scalar = self._pipelines(info, int(crop_padding), bool(flip))
        order = self._order(order_name)
        self.order_name = order.name.lower()
        self._loader = Loader(
            str(self.path), batch_size=self.batch_size, num_workers=decoding_threads(int(cfg.num_workers)),
            os_cache=bool(cfg.ffcv_os_cache), order=order, distributed=False, seed=self.seed,
            indices=self.indices, pipelines={"image": image, "label": scalar(), "index": scalar()},
            drop_last=self.drop_last)
        self._qr_pages = None
        to = self._loader.traversal_order
        if hasattr(to, "page_to_samples_array"):
            # QuasiRandom shuffles its page table in place, so its order depends on how often it was drawn before
            # (Loader.__init__ already drew once). Restore a pristine table before every draw: the order of an
            # epoch is then a function of (seed, epoch), which exact resume needs.
            to.prepare_data_structures()
            self._qr_pages = to.page_to_samples_array.copy()
        if self.world_size > 1:
            self._loader.distributed = True
            self._loader.traversal_order = _sharded_order_class()(
                self._loader, self.shuffle, self.seed, self.rank, self.world_size)
            self._loader.first_traversal_order = self._loader.traversal_order.sample_order(0)

    def _pipelines(self, info, crop_padding: int, flip: bool):
        """FFCV decoders + transforms: the image pipeline of this loader's augmentation (a random-resized crop, a
        padded random translate, or the eval centre crop), then a factory of the label / index pipelines."""
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, \
            ToTorchImage

        size = (info.image_size, info.image_size)
        if self.augment == "rrc_flip":
            image = [RandomResizedCropRGBImageDecoder(size)]
        elif self.augment == "crop_flip":
            image = [CenterCropRGBImageDecoder(size, ratio=1.0)]
            if crop_padding > 0:
                image.append(RandomTranslate(padding=crop_padding))
        else:
            image = [CenterCropRGBImageDecoder(size, ratio=float(info.crop_pct))]
        if self.augment != "none" and flip:
            image.append(RandomHorizontalFlip())
        on_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        image += [ToTensor(), *on_device, ToTorchImage(channels_last=True)]
        return image, lambda: [IntDecoder(), ToTensor(), Squeeze(), *on_device]

    def _order(self, order_name: str):
        from ffcv.loader import OrderOption

        if not self.shuffle or order_name == "sequential":
            return OrderOption.SEQUENTIAL
        if order_name == "quasi_random" and self.world_size == 1:
            return OrderOption.QUASI_RANDOM
        return OrderOption.RANDOM

    def _rows_for(self, split, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        want = split.ids.numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], want)
        pos = np.clip(pos, 0, len(ids) - 1)
        rows = order[pos]
        found = ids[rows] == want
        hint = (f"the beton was written from a different split or dataset config: rewrite it with "
                f"`{write_command(split.info, split.name, self.path.parent)} --overwrite`")
        if not found.all():
            missing = want[~found]
            raise UserError(f"{self.path} lacks {len(missing)} of the {len(want)} sample ids of split "
                            f"'{split.name}' (e.g. id {int(missing[0])}); {hint}")
        bad = labels[rows] != split.labels.numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{self.path}: sample id {int(want[i])} has label {int(labels[rows[i]])} in the beton "
                            f"but {int(split.labels[i])} in the dataset; {hint}")
        return rows.astype(np.uint64) if len(rows) else rows

    # interface shared with TensorLoader / TorchLoader ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def num_samples(self) -> int:
        return self.n

    @property
    def augmented(self) -> bool:
        return self.augment != "none"

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._qr_pages is not None:
            self._loader.traversal_order.page_to_samples_array[...] = self._qr_pages
        return np.asarray(self._loader.traversal_order.sample_order(int(epoch)))

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        from ffcv.loader.epoch_iterator import EpochIterator

        ld = self._loader
        nb = len(self)
        if start_batch >= nb:
            return
        # What Loader.__iter__ does, with an explicit epoch and the skipped batches cut from the order.
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_num_threads(ld.num_workers)
        order = self._epoch_order(epoch)[start_batch * self.batch_size:nb * self.batch_size]
        ld.next_epoch = int(epoch) + 1
        if ld.code is None:
            ld.generate_code()
        it = EpochIterator(ld, order)
        done = False
        try:
            for img, y, idx in it:
                # FFCV reuses its output buffers a few batches later: copy everything out.
                x = img.to(self.dtype, memory_format=torch.contiguous_format)
                if self.channels == 1 and x.shape[1] != 1:
                    x = x.mean(1, keepdim=True)
                x = x.div_(255.0)
                if self.channels_last:  # the memory format of the trainer's models (trainer.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                yield Batch(x, y.reshape(-1).to(torch.long).clone(), idx.reshape(-1).to(torch.long).clone())
            done = True  # the iterator closed itself
        finally:
            if not done:  # abandoned mid-epoch: stop FFCV's producer thread
                it.close()

    def __iter__(self):
        return self.iter_epoch(0)

