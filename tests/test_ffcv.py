"""FFCV backend: betons written by scripts/write_ffcv.py from digits and from a tiny ImageFolder, read back through
build_loader(loader=ffcv) and compared with the tensor loader.

FFCV compiles every new loader's pipeline with numba on its first batch (seconds each on 2 cores), so the loaders
are built once per module (fixtures below) and shared by the tests; loader.num_workers=1 keeps numba from compiling
parallel variants, which is several times slower to compile.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose, deny_os_open, load_script

# Unoptimised numba code compiles ~25% faster; these tests decode a few hundred tiny images, so speed is moot.
# Set before ffcv imports numba (only FFCV uses numba in this suite).
os.environ.setdefault("NUMBA_OPT", "0")
pytest.importorskip("ffcv")  # safety net only: `make install` installs ffcv, CI runs these tests

# numba's dispatcher finalizer raises a harmless KeyError when FFCV's per-loader compiled pipelines are garbage
# collected ("Exception ignored in: <finalize object ...>"); pytest would turn it into a warning per loader.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from src.data import build_dataset, build_loader  # noqa: E402
from src.batch import Batch  # noqa: E402
from src.data.ffcv_loader import FFCVLoader  # noqa: E402
from src.errors import UserError  # noqa: E402

IMG_SIZE = 16  # tiny ImageFolder: image_size; every image has short side 16, so crops need no resize


def _write_ffcv_main():
    return load_script("write_ffcv").main


def _collect(loader, epoch=0, start_batch=0):
    xs, ys, ids = [], [], []
    for b in loader.iter_epoch(epoch, start_batch):
        assert isinstance(b, Batch) and len(b) == b.inputs.shape[0]
        xs.append(b.inputs)
        ys.append(b.targets)
        ids.append(b.ids)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def _make_image_folder(root):
    """3 classes, smooth colour gradients (JPEG-friendly), sizes 16x16, 20x16 (landscape) and 16x24 (portrait)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(16, 16), (20, 16), (16, 24)]  # (w, h)
    for sub, n in (("train", 6), ("val", 3)):
        for c in range(3):
            d = root / sub / f"class{c}"
            d.mkdir(parents=True)
            for k in range(n):
                w, h = sizes[k % 3]
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                base = rng.uniform(40, 200, size=3)
                img = np.stack([base[0] + 3 * xx, base[1] + 2 * yy, base[2] + (xx + yy)], axis=-1)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"img{k}.png")


@pytest.fixture(scope="module")
def ffcv_env(tmp_path_factory):
    """Betons for digits (test split, raw pixels) and a tiny ImageFolder (train/test, JPEG), written with the
    command-line tool; returns the composed configs and datasets."""
    base = tmp_path_factory.mktemp("ffcv")
    out = base / "betons"
    write = _write_ffcv_main()

    common = [f"paths.data={base / 'data'}", f"paths.cache={base / 'cache'}",
              f"paths.checkpoints={base / 'ckpt'}"]
    loader = ["loader=ffcv", f"loader.ffcv_dir={out}", "loader.num_workers=1", "loader.device=cpu",
              "loader.eval_batch_size=128", "loader.batch_size=64"]
    small = ["--out-dir", str(out), "--num-workers", "1", "--page-size-mib", "2"]
    assert write([*common, "--splits", "test", *small]) == 0
    digits_cfg = compose("pretrain/pretrain", [*common, *loader, "loader.augment=crop_flip",
                                               "loader.crop_padding=2"])

    _make_image_folder(base / "folder")
    folder = ["dataset=imagefolder", f"dataset.root={base / 'folder'}", "dataset.num_classes=3",
              f"dataset.image_size={IMG_SIZE}", "dataset.crop_pct=1.0", "dataset.val_fraction=0"]
    assert write([*common, *folder, *small, "--write-mode", "jpg", "--jpeg-quality", "90", "--max-res", "64"]) == 0
    folder_cfg = compose("pretrain/pretrain", [*common, *folder, *loader, "loader.augment=rrc_flip",
                                               "loader.batch_size=8"])
    yield {
        "out": out,
        "digits_cfg": digits_cfg,
        "digits": build_dataset(digits_cfg.dataset, digits_cfg.paths),
        "folder_cfg": folder_cfg,
        "folder": build_dataset(folder_cfg.dataset, folder_cfg.paths),
    }
    gc.collect()  # free the compiled pipelines here, under this module's warning filter (see pytestmark)


@pytest.fixture(scope="module")
def digits_eval(ffcv_env):
    split = ffcv_env["digits"].split("test")
    loader = build_loader(ffcv_env["digits_cfg"].loader, split, train=False)
    return split, loader, _collect(loader)


def test_writer_files_and_help(ffcv_env, capsys):
    names = sorted(p.name for p in ffcv_env["out"].glob("*.beton"))
    assert names == ["digits_test.beton", "imagefolder-folder_test.beton", "imagefolder-folder_train.beton"]
    with pytest.raises(SystemExit) as e:
        _write_ffcv_main()(["--help"])
    assert e.value.code == 0
    assert "--compress-probability" in capsys.readouterr().out


def test_digits_eval_exact(ffcv_env, digits_eval):
    """Raw storage: pixels, labels and ids are exactly those of the tensor loader; 1 channel comes back."""
    split, loader, (x, y, idx) = digits_eval
    assert isinstance(loader, FFCVLoader) and not loader.augmented
    assert loader.num_samples == len(split) == 359 and len(loader) == 3  # 128 + 128 + 103, never dropped
    assert x.shape == (len(split), 1, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    cfg = ffcv_env["digits_cfg"]
    ref = build_loader(compose("pretrain/pretrain", ["loader=tensor", "loader.device=cpu"]).loader, split,
                       train=False)
    rx, ry, ridx = _collect(ref)
    assert torch.equal(idx, ridx) and torch.equal(y, ry)
    assert torch.equal(x, rx)
    assert cfg.loader.backend == "ffcv"


def test_digits_eval_in_bfloat16(ffcv_env, digits_eval):
    """loader.dtype: the same images, delivered in bf16."""
    split, _, (x, y, idx) = digits_eval
    cfg = OmegaConf.merge(ffcv_env["digits_cfg"].loader, {"dtype": "bfloat16"})
    bx, by, bidx = _collect(build_loader(cfg, split, train=False))
    assert bx.dtype == torch.bfloat16 and torch.equal(by, y) and torch.equal(bidx, idx)
    assert torch.allclose(bx.float(), x, atol=4e-3)  # bf16 keeps 8 bits: k/255 within 2^-9


def test_resume_skips_batches(digits_eval):
    split, loader, (x, y, idx) = digits_eval
    tx, ty, tidx = _collect(loader, epoch=0, start_batch=1)
    assert torch.equal(tidx, idx[128:]) and torch.equal(tx, x[128:])
    assert list(loader.iter_epoch(0, start_batch=len(loader))) == []


def test_subset_maps_ids_to_rows(ffcv_env, digits_eval):
    """A subset (shuffled positions, as dataset.subset or a caller may give) reads the right beton rows."""
    split, _, (x, y, idx) = digits_eval
    pos = torch.from_numpy(np.random.default_rng(1).permutation(len(split))[:50])
    sub = split.select(pos)
    loader = build_loader(ffcv_env["digits_cfg"].loader, sub, train=False)
    assert loader.num_samples == 50 and len(loader) == 1
    sx, sy, sidx = _collect(loader)
    # eval order follows the beton rows: compare per sample id
    by_id = {int(i): k for k, i in enumerate(idx)}
    rows = torch.tensor([by_id[int(i)] for i in sidx])
    assert sorted(sidx.tolist()) == sorted(sub.ids.tolist())
    assert torch.equal(sx, x[rows]) and torch.equal(sy, y[rows])
    assert torch.equal(sy, split.labels[torch.as_tensor([int((split.ids == i).nonzero()) for i in sidx])])


def test_digits_train_crop_flip(ffcv_env):
    """Shuffled, augmented (padding 2 + flip) batches: shapes, range, every id once per epoch, seeded order."""
    split = ffcv_env["digits"].split("test")
    loader = build_loader(ffcv_env["digits_cfg"].loader, split, train=True, seed=3)
    assert loader.augmented and loader.order_name == "quasi_random"
    assert len(loader) == 6  # ceil(359 / 64), drop_last=false
    shapes = []
    ids = []
    for b in loader.iter_epoch(0):
        x, y, i = b.inputs, b.targets, b.ids
        shapes.append(tuple(x.shape))
        ids.append(i)
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert y.dtype == torch.int64 and torch.equal(y, split.labels[i])  # ids are positions in this split
    assert shapes == [(64, 1, 8, 8)] * 5 + [(39, 1, 8, 8)]
    ids = torch.cat(ids)
    assert sorted(ids.tolist()) == split.ids.tolist()
    assert not torch.equal(ids, split.ids)  # shuffled
    again = torch.cat([b.ids for b in loader.iter_epoch(0)])
    other = torch.cat([b.ids for b in loader.iter_epoch(1)])
    assert torch.equal(ids, again) and not torch.equal(ids, other)  # order = f(seed, epoch)


def test_distributed_shards_are_disjoint(ffcv_env):
    """world_size=2: each rank reads half of every epoch's order, together all samples (no pipeline run)."""
    split = ffcv_env["digits"].split("test")
    cfg = ffcv_env["digits_cfg"].loader
    shards = [build_loader(cfg, split, train=True, seed=0, rank=r, world_size=2) for r in (0, 1)]
    orders = [set(s._epoch_order(0).tolist()) for s in shards]
    assert len(orders[0]) == 180 and len(orders[1]) >= 179 and orders[0] | orders[1] == set(range(len(split)))
    assert all(s.order_name == "random" for s in shards) and len(shards[0]) == 3  # ceil(180 / 64)


def test_imagefolder_eval_jpeg_tolerance(ffcv_env):
    """JPEG-stored PNGs of three shapes: centre crops match the tensor loader's within JPEG error."""
    split = ffcv_env["folder"].split("test")
    loader = build_loader(ffcv_env["folder_cfg"].loader, split, train=False)
    x, y, idx = _collect(loader)
    assert x.shape == (9, 3, IMG_SIZE, IMG_SIZE) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    ref = build_loader(compose("pretrain/pretrain", ["loader=tensor", "loader.device=cpu"]).loader, split,
                       train=False)
    rx, ry, ridx = _collect(ref)
    assert torch.equal(idx, ridx) and torch.equal(y, ry)
    err = (x - rx).abs()
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.2, (float(err.mean()), float(err.max()))


def test_imagefolder_train_rrc_flip(ffcv_env):
    split = ffcv_env["folder"].split("train")
    loader = build_loader(ffcv_env["folder_cfg"].loader, split, train=True, seed=0)
    assert loader.augmented and len(loader) == 3  # 18 images, batch 8
    got = [(tuple(b.inputs.shape), b.inputs.dtype, float(b.inputs.min()) >= 0 and float(b.inputs.max()) <= 1)
           for b in loader.iter_epoch(0)]
    assert got == [((8, 3, IMG_SIZE, IMG_SIZE), torch.float32, True)] * 2 + \
        [((2, 3, IMG_SIZE, IMG_SIZE), torch.float32, True)]


def test_missing_beton_and_dir_are_user_errors(ffcv_env, tmp_path):
    split = ffcv_env["digits"].split("val")  # no beton was written for it
    cfg = ffcv_env["digits_cfg"].loader
    with pytest.raises(UserError) as e:
        build_loader(cfg, split, train=False)
    msg = str(e.value)
    assert str(ffcv_env["out"] / "digits_val.beton") in msg and "scripts/write_ffcv.py" in msg
    cfg2 = compose("pretrain/pretrain", ["loader=ffcv", "loader.ffcv_dir=null"]).loader
    with pytest.raises(UserError, match="ffcv_dir"):
        build_loader(cfg2, split, train=False)


def test_the_write_command_carries_the_runs_dataset_options(ffcv_env, tmp_path):
    """Inside a Hydra run the missing-beton error's command names the run's paths.data= and dataset options and the
    class count, so pasting it writes the samples the run reads (not the default dataset's)."""
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    data = tmp_path / "elsewhere"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        run = hcompose("pretrain/pretrain", [f"paths.data={data}", "dataset.split_seed=3"], return_hydra_config=True)
    HydraConfig.instance().set_config(run)
    try:
        with pytest.raises(UserError) as e:
            build_loader(ffcv_env["digits_cfg"].loader, ffcv_env["digits"].split("val"), train=False)
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    cmd = str(e.value).split("write it with `", 1)[1].split("`", 1)[0]
    assert cmd.startswith("python scripts/write_ffcv.py dataset=digits ")
    assert f"paths.data={data}" in cmd and "dataset.split_seed=3" in cmd and "dataset.num_classes=10" in cmd
    assert cmd.endswith(f"--splits val --out-dir {ffcv_env['out']}")


def test_stale_beton_is_a_user_error(ffcv_env):
    """A split whose ids are not in the beton (written from another split/config) is named, not misread."""
    split = ffcv_env["digits"].split("test")
    other = split.select(torch.arange(10))
    other.ids = other.ids + 10_000
    with pytest.raises(UserError, match="lacks 10 of the 10 sample ids"):
        build_loader(ffcv_env["digits_cfg"].loader, other, train=False)


# ------------------------------------------------------------------------------ damaged .beton files (one line)


def _beton_layout(path):
    """(end of the field descriptors, end of the metadata, start of the allocation table, file size)."""
    from ffcv.types import FieldDescType, HeaderType

    data = path.read_bytes()
    h = np.frombuffer(data[:HeaderType.itemsize], dtype=HeaderType)[0]
    desc_end = HeaderType.itemsize + int(h["num_fields"]) * FieldDescType.itemsize
    meta_end = desc_end + int(h["num_samples"]) * 32  # image (16 bytes aligned) + label + index
    return desc_end, meta_end, int(h["alloc_table_ptr"]), len(data)


def _damaged_loader(ffcv_env, tmp_path, content: bytes):
    (tmp_path / "digits_test.beton").write_bytes(content)
    cfg = OmegaConf.merge(ffcv_env["digits_cfg"].loader, {"ffcv_dir": str(tmp_path)})
    return lambda: build_loader(cfg, ffcv_env["digits"].split("test"), train=False)


# every place a cut can fall, by the part of the layout it cuts (the good file is 359 samples)
CUTS = {
    "empty": (lambda L: 0, "it is empty (0 bytes)"),
    "mid-header": (lambda L: 10, "shorter than FFCV's 24-byte header"),
    "mid-field-descriptors": (lambda L: L[0] - 1, "field descriptors end at byte"),
    "mid-metadata": (lambda L: L[1] - 5, "the metadata of its 359 samples ends at byte"),
    "mid-data-pages": (lambda L: (L[1] + L[2]) // 2, "its data pages end at byte"),
    "no-allocation-table": (lambda L: L[2], "lists 0 of 359 images"),
    "mid-allocation-entry": (lambda L: L[2] + 24 * 100 + 7, "holds a partial entry of 7 bytes"),
    "whole-entries-missing": (lambda L: L[3] - 24, "lists 358 of 359 images (first missing: sample 358)"),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_or_empty_beton_is_one_user_error(ffcv_env, tmp_path, cut):
    """FFCV's Reader fails inside numpy on the first five cuts (IndexError, "negative dimensions") and accepts the
    last three (fewer allocations: the missing images would be read past the end of the file). Each is caught
    from the header and the allocation table before FFCV opens the file, and named with the command that
    rewrites it."""
    from ffcv.reader import Reader

    good = ffcv_env["out"] / "digits_test.beton"
    at, why = CUTS[cut]
    content = good.read_bytes()[:at(_beton_layout(good))]
    build = _damaged_loader(ffcv_env, tmp_path, content)
    with pytest.raises(UserError) as e:
        build()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "digits_test.beton") in msg and why in msg, msg
    assert f"python scripts/write_ffcv.py dataset=digits dataset.num_classes=10 --splits test --out-dir {tmp_path} --overwrite" in msg
    if cut in ("no-allocation-table", "whole-entries-missing"):  # what FFCV alone would have done: no error
        assert len(Reader(str(tmp_path / "digits_test.beton")).metadata) == 359


def test_the_rewrite_command_of_the_message_repairs_the_beton(ffcv_env, tmp_path):
    """The command the message names, run as given (plus this test's paths and small pages), rewrites the file;
    a damaged file is rewritten even without --overwrite, a whole one is kept."""
    import re
    import shlex

    from src.data.ffcv_loader import beton_damage, read_beton_columns

    good = ffcv_env["out"] / "digits_test.beton"
    build = _damaged_loader(ffcv_env, tmp_path, good.read_bytes()[:-24])
    with pytest.raises(UserError) as e:
        build()
    command = shlex.split(re.search(r"`python scripts/write_ffcv.py ([^`]*)`", str(e.value)).group(1))
    base = tmp_path.parent / "ffcv_base"
    extra = [f"paths.data={base / 'data'}", "--num-workers", "1", "--page-size-mib", "2"]
    assert _write_ffcv_main()([*command, *extra]) == 0
    beton = tmp_path / "digits_test.beton"
    assert beton_damage(beton) is None
    for a, b in zip(read_beton_columns(beton), read_beton_columns(good)):
        assert np.array_equal(a, b)
    assert len(build()) == 3  # opens now (no batch drawn: that would JIT-compile another pipeline)

    beton.write_bytes(b"")  # damaged, no --overwrite: rewritten
    assert _write_ffcv_main()([*[c for c in command if c != "--overwrite"], *extra]) == 0
    assert beton_damage(beton) is None
    stamp = beton.stat().st_mtime_ns  # whole, no --overwrite: kept
    assert _write_ffcv_main()([*[c for c in command if c != "--overwrite"], *extra]) == 0
    assert beton.stat().st_mtime_ns == stamp


def test_unreadable_beton_is_one_user_error(ffcv_env, tmp_path, monkeypatch):
    """chmod 000 (root reads through it, so os.open is made to refuse as it would for anyone else)."""
    build = _damaged_loader(ffcv_env, tmp_path, (ffcv_env["out"] / "digits_test.beton").read_bytes())
    deny_os_open(monkeypatch, tmp_path / "digits_test.beton")
    with pytest.raises(UserError, match=r"digits_test.beton is not readable \(permission denied\): fix its "
                                        r"permissions \(chmod a\+r .*--overwrite"):
        build()


def test_batches_carry_the_splits_ids_and_come_channels_last_when_asked(ffcv_env):
    """Every FFCV batch is a Batch whose ids are the split's (each once per epoch, targets their labels); with
    channels_last=True the images come in channels_last memory format, the same pixels."""
    split = ffcv_env["folder"].split("test")
    plain = build_loader(ffcv_env["folder_cfg"].loader, split, train=False)
    cl = build_loader(ffcv_env["folder_cfg"].loader, split, train=False, channels_last=True)
    by_id = dict(zip(split.ids.tolist(), split.labels.tolist()))
    for a, b in zip(plain.iter_epoch(0), cl.iter_epoch(0)):
        assert isinstance(b, Batch) and b.is_image and b.targets.tolist() == [by_id[i] for i in b.ids.tolist()]
        assert b.inputs.is_contiguous(memory_format=torch.channels_last) and b.inputs.stride(1) == 1
        assert a.inputs.is_contiguous() and torch.equal(a.inputs, b.inputs) and torch.equal(a.ids, b.ids)
    assert sorted(_collect(cl)[2].tolist()) == sorted(split.ids.tolist())
