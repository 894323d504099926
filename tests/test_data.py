"""Data: the digits split (seeded, stratified, disjoint, complete), subsets, CIFAR-10/100 in torchvision's python
format and ImageFolder trees written here in the real formats, both loader backends, and the errors for missing
or unsafe data."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import compose

from src.batch import Batch
from src.data import build_dataset, build_loader, training_split
from src.data.datasets import stratified_partition, subset_positions
from src.errors import UserError

DIGITS_N = 1797


def _ds(overrides=()):
    cfg = compose("pretrain/pretrain", list(overrides))
    return cfg, build_dataset(cfg.dataset, cfg.paths)


def _sk_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64))


# ------------------------------------------------------------------------------------------------ digits


def test_digits_split_is_deterministic_disjoint_complete_and_stratified():
    _, labels = _sk_digits()
    fr = {"train": 0.4, "transfer": 0.3, "val": 0.1, "test": 0.2}
    a = stratified_partition(labels, fr, seed=0)
    b = stratified_partition(labels, fr, seed=0)
    c = stratified_partition(labels, fr, seed=1)
    assert list(a) == list(fr)
    for k in fr:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in fr), "another seed gives the same split"
    allpos = np.concatenate(list(a.values()))
    assert len(allpos) == DIGITS_N and len(np.unique(allpos)) == DIGITS_N  # disjoint and complete
    assert set(allpos.tolist()) == set(range(DIGITS_N))
    for k, f in fr.items():
        for cls in range(10):
            n_cls = int((labels == cls).sum())
            got = int((labels[a[k]] == cls).sum())
            assert abs(got - f * n_cls) < 1.0, (k, cls, got, f * n_cls)


def test_digits_dataset_matches_sklearn_images_at_the_split_positions():
    cfg, ds = _ds()
    images, labels = _sk_digits()
    parts = stratified_partition(labels, dict(cfg.dataset.splits), cfg.dataset.split_seed)
    assert set(ds.splits) == {"train", "transfer", "val", "test"}
    assert sum(len(s) for s in ds.splits.values()) == DIGITS_N
    info = ds.info
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, 8)
    assert info.classes == [str(i) for i in range(10)] and info.mean == [0.3] and info.std == [0.38]
    for name, s in ds.splits.items():
        pos = parts[name]
        assert s.images.dtype == torch.uint8 and s.images.shape == (len(pos), 1, 8, 8)
        torch.testing.assert_close(s.labels, torch.from_numpy(labels[pos]))
        assert torch.equal(s.images[:, 0], torch.from_numpy(images[pos]))
        assert torch.equal(s.ids, torch.arange(len(pos)))
        assert s.full_size == len(pos)


def test_digits_same_seed_same_split_other_seed_other_split():
    _, a = _ds()
    _, b = _ds()
    _, c = _ds(["dataset.split_seed=7"])
    for k in a.splits:
        assert torch.equal(a.splits[k].images, b.splits[k].images)
        assert torch.equal(a.splits[k].labels, b.splits[k].labels)
        assert len(a.splits[k]) == len(c.splits[k])  # same sizes (stratified, same fractions)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)


def test_digits_fractions_image_size_and_channels_are_configurable():
    _, ds = _ds(["dataset.splits.train=0.5", "dataset.splits.transfer=0.2", "dataset.image_size=16",
                 "dataset.channels=3", "dataset.mean=[0.3,0.3,0.3]", "dataset.std=[0.4,0.4,0.4]"])
    tr = ds.splits["train"]
    assert tr.images.shape[1:] == (3, 16, 16)
    assert abs(len(tr) - 0.5 * DIGITS_N) <= 10  # per-class rounding: within 1 image per class
    assert torch.equal(tr.images[:, 0], tr.images[:, 2])  # grey replicated into 3 channels


def test_digits_bad_fractions_are_user_errors():
    with pytest.raises(UserError, match="sum to"):
        _ds(["dataset.splits.train=0.6"])


def test_subset_fraction_and_per_class_are_seeded_and_per_class():
    _, ds = _ds()
    train = ds.splits["train"]
    from omegaconf import OmegaConf

    from src.schema import SubsetConfig

    sub = OmegaConf.structured(SubsetConfig(per_class=5, seed=3))
    s1, s2 = training_split(ds, "train", sub), training_split(ds, "train", sub)
    assert len(s1) == 50 and torch.bincount(s1.labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(s1.ids, s2.ids)
    s3 = training_split(ds, "train", OmegaConf.structured(SubsetConfig(per_class=5, seed=4)))
    assert not torch.equal(s1.ids, s3.ids)
    # ids are kept: a subset's samples are still keyed by their id in the full split
    assert torch.equal(s1.images, train.images[s1.ids])
    frac = subset_positions(train.labels, 0.25, None, 0)
    counts = torch.bincount(train.labels[frac], minlength=10)
    full = torch.bincount(train.labels, minlength=10)
    assert torch.all((counts.float() - 0.25 * full.float()).abs() <= 0.5 + 1e-6)
    assert training_split(ds, "train", OmegaConf.structured(SubsetConfig())) is train


# ------------------------------------------------------------------------------------------------- CIFAR


def _write_cifar10(root, n_per_batch=4, n_test=6, protocol=2, seed=0):
    """torchvision's python format: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)
    sub = root / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch).tolist()
        with open(sub / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
                         "filenames": [f"img_{i}_{j}.png" for j in range(n_per_batch)]}, f, protocol=protocol)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = rng.integers(0, 10, n_test).tolist()
    with open(sub / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": ty, "data": tx}, f, protocol=protocol)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(sub / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": n_per_batch, "label_names": names, "num_vis": 3072}, f,
                    protocol=protocol)
    return np.concatenate(train_x), np.array(train_y), tx, np.array(ty), names


def _write_cifar100(root, n_train=12, n_test=5, seed=1):
    rng = np.random.default_rng(seed)
    sub = root / "cifar-100-python"
    sub.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 100, n).tolist()
        with open(sub / name, "wb") as f:
            pickle.dump({"filenames": [f"{j}.png" for j in range(n)], "batch_label": name, "fine_labels": y,
                         "coarse_labels": [v // 5 for v in y], "data": x}, f, protocol=2)
        out += [x, np.array(y)]
    names = [f"class_{i:02d}" for i in range(100)]
    with open(sub / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}, f,
                    protocol=2)
    return (*out, names)


def _as_images(flat):
    return torch.from_numpy(flat.reshape(-1, 3, 32, 32))


def _check_loader_batches(loader, split, exact: bool, size):
    seen_ids = []
    for b in loader.iter_epoch(0):
        assert isinstance(b, Batch)
        x, y, idx = b.inputs, b.targets, b.ids
        assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1:] == (split.info.channels, size, size)
        assert y.dtype == torch.int64 and idx.dtype == torch.int64
        assert x.shape[0] == y.shape[0] == idx.shape[0] <= loader.batch_size
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        pos = idx  # ids == positions here (no subset)
        assert torch.equal(y, split.labels[pos])
        if exact:
            assert torch.equal((x * 255).round().to(torch.uint8), split.images[pos])
        seen_ids.append(idx)
    ids = torch.cat(seen_ids)
    return ids


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip_and_loaders(tmp_path, protocol):
    trx, try_, tex, tey, names = _write_cifar10(tmp_path / "cifar10", protocol=protocol)
    cfg, ds = _ds(["dataset=cifar10", f"paths.data={tmp_path}", "dataset.val_fraction=0"])
    assert set(ds.splits) == {"train", "test"}
    assert ds.info.classes == names and ds.info.num_classes == 10 and ds.info.image_size == 32
    tr, te = ds.split("train"), ds.split("test")
    assert torch.equal(tr.images, _as_images(trx)) and torch.equal(tr.labels, torch.from_numpy(try_))
    assert torch.equal(te.images, _as_images(tex)) and torch.equal(te.labels, torch.from_numpy(tey))
    for backend in ("tensor", "torch"):
        lcfg = compose("pretrain/pretrain", [f"loader={backend}", "loader.batch_size=8", "loader.eval_batch_size=4",
                                             "loader.num_workers=0", "loader.augment=crop_flip",
                                             "loader.crop_padding=2", "loader.flip=true"]).loader
        ev = build_loader(lcfg, te, train=False, device="cpu")
        ids = _check_loader_batches(ev, te, exact=True, size=32)
        assert torch.equal(ids, torch.arange(len(te)))  # evaluation: every sample once, in order
        trl = build_loader(lcfg, tr, train=True, seed=0, device="cpu")
        assert len(trl) == 3  # 20 images, batch 8, no drop_last
        ids = _check_loader_batches(trl, tr, exact=False, size=32)
        assert sorted(ids.tolist()) == list(range(len(tr)))  # a permutation of the epoch
        assert not torch.equal(ids, torch.arange(len(tr)))  # shuffled


def test_cifar10_val_holdout_partitions_train(tmp_path):
    trx, _, _, _, _ = _write_cifar10(tmp_path / "cifar10", n_per_batch=8)
    _, ds = _ds(["dataset=cifar10", f"paths.data={tmp_path}", "dataset.val_fraction=0.25"])
    tr, va = ds.split("train"), ds.split("val")
    assert len(tr) + len(va) == 40 and 6 <= len(va) <= 14
    rows = {bytes(r) for r in trx}
    got = [bytes(x.reshape(-1).numpy()) for x in torch.cat([tr.images, va.images])]
    assert set(got) == rows and len(got) == len(rows)  # disjoint, complete
    assert torch.equal(va.ids, torch.arange(len(va)))


def test_cifar100_round_trip(tmp_path):
    trx, try_, tex, tey, names = _write_cifar100(tmp_path / "cifar100")
    _, ds = _ds(["dataset=cifar100", f"paths.data={tmp_path}", "dataset.val_fraction=0"])
    assert ds.info.num_classes == 100 and ds.info.classes == names
    assert torch.equal(ds.split("train").images, _as_images(trx))
    assert torch.equal(ds.split("train").labels, torch.from_numpy(try_))
    assert torch.equal(ds.split("test").images, _as_images(tex))
    assert torch.equal(ds.split("test").labels, torch.from_numpy(tey))
    lcfg = compose("pretrain/pretrain", ["loader.batch_size=5"]).loader
    b = next(iter(build_loader(lcfg, ds.split("train"), train=True, device="cpu")))
    assert b.inputs.shape == (5, 3, 32, 32) and b.targets.shape == (5,) and b.ids.shape == (5,) and len(b) == 5


@pytest.mark.parametrize("name,expected", [("cifar10", "cifar10/cifar-10-batches-py/data_batch_1"),
                                           ("cifar100", "cifar100/cifar-100-python/train")])
def test_missing_cifar_names_the_expected_path(tmp_path, name, expected):
    with pytest.raises(UserError) as e:
        _ds([f"dataset={name}", f"paths.data={tmp_path}"])
    assert str(tmp_path / expected) in str(e.value)
    assert "nothing is downloaded" in str(e.value)


def test_cifar_root_override_is_used(tmp_path):
    _write_cifar10(tmp_path / "elsewhere")
    _, ds = _ds(["dataset=cifar10", f"paths.data={tmp_path / 'nothing'}", f"dataset.root={tmp_path / 'elsewhere'}",
                 "dataset.val_fraction=0"])
    assert len(ds.split("train")) == 20


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    _write_cifar10(tmp_path / "cifar10")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"labels": [0], "data": Evil()}, f, protocol=2)
    with pytest.raises(UserError, match="data_batch_3"):
        _ds(["dataset=cifar10", f"paths.data={tmp_path}"])
    assert not marker.exists()


def test_truncated_cifar_batch_is_a_user_error(tmp_path):
    _write_cifar10(tmp_path / "cifar10")
    p = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="test_batch"):
        _ds(["dataset=cifar10", f"paths.data={tmp_path}"])


# ------------------------------------------------------------------------------------------- ImageFolder


def _write_imagefolder(root, classes=("cat", "dog"), n_train=3, n_val=2, size=16, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"img{j}.png")
                arrays[(split, c, j)] = a
            (d / "notes.txt").write_text("not an image")
    return arrays


IF_OVERRIDES = ["dataset=imagefolder", "dataset.num_classes=2", "dataset.image_size=16", "dataset.val_fraction=0"]


def test_imagefolder_round_trip_and_loaders(tmp_path):
    arrays = _write_imagefolder(tmp_path / "tiny")
    _, ds = _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'tiny'}", "dataset.crop_pct=1.0"])
    assert ds.info.classes == ["cat", "dog"] and ds.info.num_classes == 2
    tr, te = ds.split("train"), ds.split("test")
    assert len(tr) == 6 and len(te) == 4  # the .txt files are not images
    assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1] and te.labels.tolist() == [0, 0, 1, 1]
    assert tr.files[0].endswith("train/cat/img0.png")
    # materialised pixels equal the PNGs (same size: no resampling)
    m = tr.materialize()
    for i, (c, j) in enumerate([(c, j) for c in ("cat", "dog") for j in range(3)]):
        assert torch.equal(m.images[i], torch.from_numpy(arrays[("train", c, j)]).permute(2, 0, 1))
    for backend in ("tensor", "torch"):
        lcfg = compose("pretrain/pretrain", [f"loader={backend}", "loader.batch_size=4", "loader.eval_batch_size=3",
                                             "loader.num_workers=0", "loader.augment=crop_flip",
                                             "loader.flip=true"]).loader
        ev = build_loader(lcfg, te, train=False, device="cpu")
        seen = []
        for b in ev.iter_epoch(0):
            x, y, idx = b.inputs, b.targets, b.ids
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
            assert torch.equal(y, te.labels[idx])
            for xi, k in zip(x, idx.tolist()):
                c, j = ("cat", "dog")[int(te.labels[k])], k % 2
                ref = torch.from_numpy(arrays[("val", c, j)]).permute(2, 0, 1)
                assert torch.equal((xi * 255).round().to(torch.uint8), ref), (backend, k)
            seen.append(idx)
        assert torch.cat(seen).tolist() == [0, 1, 2, 3]
        trl = build_loader(lcfg, tr, train=True, seed=1, device="cpu")
        batches = list(trl.iter_epoch(0))
        assert [len(b) for b in batches] == [4, 2]
        ids = torch.cat([b.ids for b in batches])
        assert sorted(ids.tolist()) == list(range(6))
        for b in batches:
            x = b.inputs
            assert x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
            assert torch.equal(b.targets, tr.labels[b.ids])


def test_imagefolder_resizes_and_uses_workers(tmp_path):
    _write_imagefolder(tmp_path / "tiny", size=20)
    _, ds = _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'tiny'}"])  # crop_pct 0.875: resize 18, crop 16
    lcfg = compose("pretrain/pretrain", ["loader=torch", "loader.num_workers=1", "loader.eval_batch_size=8"]).loader
    b = next(iter(build_loader(lcfg, ds.split("test"), train=False, device="cpu")))
    assert b.inputs.shape == (4, 3, 16, 16) and b.ids.tolist() == [0, 1, 2, 3]
    assert ds.split("train").materialize().images.shape == (6, 3, 16, 16)


def test_imagefolder_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(UserError) as e:
        _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'missing'}"])
    assert str(tmp_path / "missing" / "train") in str(e.value) and "<class>" in str(e.value)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'empty'}"])
    _write_imagefolder(tmp_path / "three", classes=("a", "b", "c"), n_train=1, n_val=1)
    with pytest.raises(UserError, match="num_classes=3"):
        _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'three'}"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagefolder_with_an_empty_class_folder_is_refused(tmp_path, split):
    """An empty class folder was accepted: a 3-way head trained on 2 classes. torchvision refuses it too."""
    import shutil

    _write_imagefolder(tmp_path / "if", classes=("cat", "dog", "emu"))
    for f in (tmp_path / "if" / split / "emu").iterdir():
        f.unlink() if f.suffix == ".png" else None
    with pytest.raises(UserError) as e:
        _ds(IF_OVERRIDES[:1] + ["dataset.num_classes=3"] + IF_OVERRIDES[2:] + [f"dataset.root={tmp_path / 'if'}"])
    msg = str(e.value)
    assert str(tmp_path / "if" / split / "emu") in msg and "hold no image" in msg and "num_classes=2" in msg
    assert "\n" not in msg
    shutil.rmtree(tmp_path / "if" / split / "emu")  # the fix it names (also in the other split) works
    shutil.rmtree(tmp_path / "if" / ("val" if split == "train" else "train") / "emu")
    assert _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'if'}"])[1].info.classes == ["cat", "dog"]


def test_missing_imagenet_names_the_expected_path(tmp_path):
    with pytest.raises(UserError) as e:
        _ds(["dataset=imagenet", f"paths.data={tmp_path}"])
    assert str(tmp_path / "imagenet" / "train") in str(e.value)


# -------------------------------------------------------------------------------------------- loaders


def test_tensor_loader_order_is_seeded_per_epoch_and_resumable():
    _, ds = _ds()
    lcfg = compose("pretrain/pretrain", ["loader.batch_size=100", "loader.drop_last=true"]).loader
    tr = ds.split("train")
    a = build_loader(lcfg, tr, train=True, seed=5, device="cpu")
    b = build_loader(lcfg, tr, train=True, seed=5, device="cpu")
    assert len(a) == len(tr) // 100
    e0 = list(a.iter_epoch(0))
    e0b = list(b.iter_epoch(0))
    for b1, b2 in zip(e0, e0b):
        assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.ids, b2.ids)  # same order and augmentation
    e1 = list(a.iter_epoch(1))
    assert not torch.equal(e0[0].ids, e1[0].ids)  # a fresh order every epoch
    tail = list(a.iter_epoch(1, start_batch=2))  # resume inside an epoch
    assert len(tail) == len(e1) - 2
    for b1, b2 in zip(e1[2:], tail):
        assert torch.equal(b1.ids, b2.ids) and torch.equal(b1.inputs, b2.inputs)
    assert all(len(b) == 100 and b.inputs.shape[0] == 100 for b in e0)  # drop_last


def test_loader_bad_settings_are_user_errors():
    _, ds = _ds()
    with pytest.raises(UserError, match="augment"):
        build_loader(compose("pretrain/pretrain", ["loader.augment=cutout"]).loader, ds.split("train"), train=True)
    with pytest.raises(UserError, match="backend"):
        build_loader(compose("pretrain/pretrain", ["loader.backend=jax"]).loader, ds.split("train"), train=True)
    with pytest.raises(UserError, match="batch_size"):
        build_loader(compose("pretrain/pretrain", ["loader.batch_size=5000", "loader.drop_last=true"]).loader,
                     ds.split("train"), train=True)


def test_crop_flip_is_a_zero_padded_shift_with_optional_mirror():
    from src.data.loaders import random_crop_flip

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 6, 6) + 0.5  # no zeros inside the images
    out = random_crop_flip(x, padding=2, flip=True, g=g)
    assert out.shape == x.shape
    kinds = set()
    for i in range(len(x)):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = None
        for flip in (False, True):
            for oy in range(5):
                for ox in range(5):
                    crop = padded[:, oy:oy + 6, ox:ox + 6]
                    if torch.equal(crop.flip(2) if flip else crop, out[i]):
                        found = (flip, oy, ox)
        assert found is not None, f"sample {i} is not a padded crop (+ mirror) of its input"
        kinds.add(found)
    assert len(kinds) > 10 and {k[0] for k in kinds} == {False, True}  # varied offsets, both orientations


def _uint8_split(n=48, c=3, size=8, seed=0):
    from src.data.datasets import DatasetInfo, Split

    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo("synthetic", 4, ["a", "b", "c", "d"], c, size, [0.5] * c, [0.25] * c)
    return Split(name="train", labels=torch.randint(0, 4, (n,), generator=g), ids=torch.arange(n) + 1000,
                 images=torch.randint(1, 256, (n, c, size, size), dtype=torch.uint8, generator=g), info=info,
                 full_size=n)


def test_crop_store_gather_equals_per_batch_crop_and_slices_by_hand():
    """The loader's one-gather crop (padded + mirrored store) == the per-batch pad/gather/mirror == slices."""
    from src.data.loaders import CropStore, crop_flip

    imgs = _uint8_split(n=30, size=6).images
    g = torch.Generator().manual_seed(3)
    p = 2
    pos = torch.randperm(30, generator=g)[:17]
    oy, ox = torch.randint(0, 2 * p + 1, (17,), generator=g), torch.randint(0, 2 * p + 1, (17,), generator=g)
    mirror = torch.rand(17, generator=g) < 0.5
    for flip in (True, False):
        m = mirror if flip else None
        store = CropStore(imgs, p, flip).crops(pos, oy, ox, m)
        batch = crop_flip(imgs[pos], p, oy, ox, m)
        assert store.dtype == torch.uint8 and store.shape == (17, 3, 6, 6)
        for i in range(17):
            padded = torch.nn.functional.pad(imgs[pos[i]], (p, p, p, p))
            crop = padded[:, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6]
            want = crop.flip(2) if flip and mirror[i] else crop
            assert torch.equal(store[i], want) and torch.equal(batch[i], want), (i, flip)


@pytest.mark.parametrize("augment", ["crop_flip", "rrc_flip"])
def test_tensor_loader_augmentation_is_per_position_so_resume_and_ranks_reproduce_one_epoch(augment):
    """One generator per epoch, one draw per epoch position: resuming at batch 2 gives the same batches, and two
    ranks with half the batch together deliver exactly the samples and pixels of the single-process batch."""
    from src.data.loaders import TensorLoader

    split = _uint8_split()
    kw = dict(shuffle=True, drop_last=True, augment=augment, crop_padding=2, flip=True, seed=4, device="cpu")
    one = TensorLoader(split, 8, **kw)
    ranks = [TensorLoader(split, 4, rank=r, world_size=2, **kw) for r in range(2)]
    full = list(one.iter_epoch(3))
    assert len(full) == 6 and all(b.inputs.dtype == torch.float32 and 0 <= b.inputs.min() and b.inputs.max() <= 1
                                  for b in full)
    for b1, b2 in zip(full[2:], one.iter_epoch(3, start_batch=2)):
        assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.ids, b2.ids) and torch.equal(b1.targets, b2.targets)
    for b, ba, bb in zip(full, *(r.iter_epoch(3) for r in ranks)):
        both_ids, both_x = torch.cat([ba.ids, bb.ids]), torch.cat([ba.inputs, bb.inputs])
        assert sorted(both_ids.tolist()) == sorted(b.ids.tolist())
        for j, i in enumerate(b.ids.tolist()):
            assert torch.equal(both_x[both_ids.tolist().index(i)], b.inputs[j])
    assert not torch.equal(full[0].inputs, next(iter(one.iter_epoch(4))).inputs)  # another epoch, other draws


def test_resized_crop_flip_equals_grid_sample_and_a_full_box_is_the_identity():
    from src.data.loaders import resized_crop_flip, rrc_parameters, to_unit

    x = _uint8_split(n=16, size=12).images
    g = torch.Generator().manual_seed(1)
    sw, sh, cx, cy = rrc_parameters(16, g, "cpu")
    mirror = torch.rand(16, generator=g) < 0.5
    out = resized_crop_flip(x, 10, sw, sh, cx, cy, mirror)
    theta = torch.zeros(16, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = torch.where(mirror, -sw, sw), cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = torch.nn.functional.affine_grid(theta, (16, 3, 10, 10), align_corners=False)
    ref = torch.nn.functional.grid_sample(to_unit(x), grid, mode="bilinear", padding_mode="reflection",
                                          align_corners=False)
    assert out.shape == (16, 3, 10, 10) and torch.allclose(out, ref, atol=1e-5)
    one, zero = torch.ones(16), torch.zeros(16)
    ident = resized_crop_flip(x, 12, one, one, zero, zero, mirror)
    want = torch.where(mirror.view(-1, 1, 1, 1), to_unit(x).flip(3), to_unit(x))
    assert torch.allclose(ident, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_unit_is_x_over_255_rounded_once(dtype):
    from src.data.loaders import to_unit

    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_unit(x, dtype), (x.double() / 255.0).to(dtype))


def test_bad_image_files_are_named_when_the_split_is_built(tmp_path, monkeypatch):
    """0-byte, truncated and non-image files gave PIL tracebacks (the truncated one naming no file), with
    loader=torch only when a batch happened to draw the file. The split's build names each one."""
    _write_imagefolder(tmp_path / "if", classes=("cat", "dog"), n_train=3, n_val=2, size=32)
    train = tmp_path / "if" / "train"
    (train / "cat" / "empty.png").write_bytes(b"")
    good = (train / "dog" / "img0.png").read_bytes()
    (train / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    (train / "dog" / "text.jpg").write_text("this is not a picture")
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(train / "cat" / "whole.jpg", quality=90)
    jpg = (train / "cat" / "whole.jpg").read_bytes()
    (train / "cat" / "cut.jpg").write_bytes(jpg[:-300])
    with pytest.raises(UserError) as e:
        _ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'if'}"])
    msg = str(e.value)
    assert msg.startswith(f"4 image file(s) under {train} cannot be decoded (") and "\n" not in msg
    for name, why in (("cat/empty.png", "empty (0 bytes)"), ("dog/cut.png", "truncated (png"),
                      ("dog/text.jpg", "not an image"), ("cat/cut.jpg", "truncated (jpeg")):
        assert f"{train / name}: {why}" in msg, (name, msg)
    assert "whole.jpg" not in msg and "img0.png" not in msg
    monkeypatch.setenv("KT_CHECK_IMAGES", "0")  # the documented way out for a verified copy
    assert len(_ds(IF_OVERRIDES + [f"dataset.root={tmp_path / 'if'}"])[1].split("train")) == 11


def test_images_that_passed_the_check_are_not_read_again_by_a_later_run(tmp_path, monkeypatch):
    """The check reads every image's head and tail; a second run with the same paths.cache reads only the files
    that are new or changed since (by size and mtime), and a file damaged in between is still named."""
    from src.data import datasets as dsm

    _write_imagefolder(tmp_path / "if", classes=("cat", "dog"), n_train=3, n_val=2, size=16)
    looked = []
    real = dsm.image_file_problem
    monkeypatch.setattr(dsm, "image_file_problem", lambda f: looked.append(f) or real(f))
    over = IF_OVERRIDES + [f"dataset.root={tmp_path / 'if'}", f"paths.cache={tmp_path / 'cache'}"]
    _ds(over)
    assert len(looked) == 10  # 6 train + 4 val images
    assert len(list((tmp_path / "cache" / "image_checks").glob("*.json"))) == 2  # one record per folder
    looked.clear()
    _ds(over)
    assert looked == []
    cut = tmp_path / "if" / "train" / "dog" / "img1.png"
    cut.write_bytes(cut.read_bytes()[:20])  # damaged after it was checked: another size
    new = tmp_path / "if" / "train" / "cat" / "img9.png"
    new.write_bytes((tmp_path / "if" / "train" / "cat" / "img0.png").read_bytes())
    with pytest.raises(UserError, match=r"1 image file\(s\) under .* cannot be decoded .*img1.png: truncated"):
        _ds(over)
    assert sorted(looked) == sorted([str(cut), str(new)])
    cut.unlink()  # the run that failed recorded nothing: the new file is looked at again, the others not
    looked.clear()
    assert len(_ds(over)[1].split("train")) == 6 and looked == [str(new)]


# ------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("backend", ["tensor", "torch"])
@pytest.mark.parametrize("train", [False, True])
def test_every_backend_yields_batches_whose_ids_are_the_splits(backend, train):
    """Batch(inputs, targets, ids): every sample of the split once per epoch, each row's target its label."""
    from omegaconf import OmegaConf

    _, ds = _ds()
    split = training_split(ds, "train", OmegaConf.create({"fraction": 0.2, "per_class": None, "seed": 0}))
    assert not torch.equal(split.ids, torch.arange(len(split)))  # a subset: ids are not positions
    lcfg = compose("pretrain/pretrain", [f"loader={backend}", "loader.batch_size=32", "loader.eval_batch_size=50",
                                         "loader.num_workers=0", "loader.drop_last=false"]).loader
    loader = build_loader(lcfg, split, train=train, seed=2, device="cpu")
    batches = list(loader.iter_epoch(0))
    assert batches and all(isinstance(b, Batch) for b in batches)
    ids = torch.cat([b.ids for b in batches])
    assert sorted(ids.tolist()) == sorted(split.ids.tolist())
    by_id = dict(zip(split.ids.tolist(), split.labels.tolist()))
    for b in batches:
        assert b.ids.dtype == torch.int64 and len(b) == b.inputs.shape[0] == b.targets.shape[0] and b.is_image
        assert b.targets.tolist() == [by_id[i] for i in b.ids.tolist()]
    with pytest.raises(TypeError):  # opened by name only: no tuple unpacking of a Batch
        x, y, idx = batches[0]


@pytest.mark.parametrize("backend", ["tensor", "torch"])
@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_loader_delivers_channels_last_images_when_asked(backend, augment):
    lcfg = compose("pretrain/pretrain", [f"loader={backend}", "loader.batch_size=16", "loader.num_workers=0",
                                         f"loader.augment={augment}", "loader.crop_padding=2"]).loader
    split = _uint8_split()  # 3 channels: channels_last differs from the default layout (not so for 1 channel)
    plain = next(build_loader(lcfg, split, train=True, seed=1, device="cpu").iter_epoch(0))
    cl = next(build_loader(lcfg, split, train=True, seed=1, device="cpu", channels_last=True).iter_epoch(0))
    assert cl.inputs.is_contiguous(memory_format=torch.channels_last) and cl.inputs.stride(1) == 1
    assert plain.inputs.is_contiguous() and plain.inputs.stride(3) == 1
    if augment == "none" or backend == "tensor":  # torchvision's random ops are not seeded per loader
        assert torch.equal(cl.inputs, plain.inputs) and torch.equal(cl.ids, plain.ids)


def test_batch_to_moves_nested_tensors_and_len_counts_samples():
    ids = torch.arange(3)
    b = Batch({"input_ids": torch.ones(3, 5, dtype=torch.long), "mask": [torch.zeros(3, 5)]},
              [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([1])}] * 3, ids, {"phase": 2, "t": torch.ones(1)})
    moved = b.to("meta")
    assert moved is not b and len(moved) == 3 and moved.extra["phase"] == 2
    assert moved.inputs["input_ids"].device.type == "meta" and moved.inputs["mask"][0].device.type == "meta"
    assert all(t["boxes"].device.type == "meta" for t in moved.targets) and moved.ids.device.type == "meta"
    assert moved.extra["t"].device.type == "meta" and b.ids.device.type == "cpu"  # the original is unchanged
    assert not b.is_image and Batch(torch.rand(2, 1, 4, 4)).is_image and len(Batch(torch.rand(2, 1, 4, 4))) == 2
    assert not Batch(torch.randint(0, 9, (2, 1, 4, 4))).is_image  # uint8 / int images are not float images
    assert len(Batch({"input_ids": torch.ones(4, 7)})) == 4 and len(Batch([torch.rand(3, 5, 5)] * 6)) == 6


def test_batch_passes_through_ddp_forward():
    """DistributedDataParallel hands a Batch to the wrapped module as it is (one gloo process)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.utils import _recursive_to
    from torch.nn.parallel import DistributedDataParallel as DDP

    b = Batch(torch.rand(4, 3), torch.tensor([0, 1, 0, 1]), torch.arange(4), {"phase": 1})
    assert _recursive_to(b, torch.device("cpu"), False)[0] is b

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, batch):
            assert isinstance(batch, Batch) and batch.extra["phase"] == 1
            return torch.nn.functional.cross_entropy(self.fc(batch.inputs), batch.targets)

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        DDP(Probe())(b).backward()
    finally:
        dist.destroy_process_group()


def test_noise_batches_are_batches_of_one_z_per_pseudo_batch():
    from src.data import NoiseBatches

    nb = NoiseBatches(4, 10, 3, seed=1)
    batches = list(nb.iter_epoch(5, 1))
    assert [b.extra for b in batches] == [{"phase": 1, "pseudo_batch": 5}, {"phase": 2, "pseudo_batch": 5}]
    assert all(isinstance(b, Batch) and b.ids is None and b.targets is None and len(b) == 4 for b in batches)
    assert torch.equal(batches[0].inputs, nb.z(5)) and batches[0].inputs is batches[1].inputs
