"""A teacher whose meta.json says it was trained on another dataset than the run's (issue #25): it was used
without a word (same class count and channels, so every other check passed). Refused at resolve time with both
names for teachers; a student or an evaluated model is warned about; a feature role is not checked."""
from __future__ import annotations

import json
import logging

import pytest

from conftest import compose


@pytest.fixture(scope="module")
def zoo_entry(tmp_path_factory):
    """One real zoo entry (mlp_small, 1 epoch) trained and saved by main_pretrain's code, and the path overrides."""
    from src.experiments import pretrain

    base = tmp_path_factory.mktemp("teacher_ds")
    paths = [f"paths.checkpoints={base / 'ck'}", f"paths.cache={base / 'cache'}", f"paths.data={base / 'data'}"]
    cfg = compose("pretrain/pretrain", ["name=mlp_small", "zoo.models.mlp_small.epochs=1", "trainer.device=cpu",
                                        *paths])
    pretrain.run(cfg, run_dir=base / "zoo_run")
    folder = base / "ck" / "digits" / "mlp_small"
    assert json.loads((folder / "meta.json").read_text())["dataset"]["name"] == "digits"
    return folder, paths, base


def _ctx(paths, run_dir):
    from src.experiments.context import setup

    return setup(compose("transfer/transfer", [*paths, "trainer.device=cpu"]), run_dir, tracker=False)


def _relabel(folder, **dataset):
    """Edit the dataset the entry's meta.json claims; returns a function that restores the file."""
    p = folder / "meta.json"
    text = p.read_text()
    meta = json.loads(text)
    p.write_text(json.dumps({**meta, "dataset": {**meta["dataset"], **dataset}}))
    return lambda: p.write_text(text)


def test_teacher_trained_on_another_dataset_is_refused_with_both_names(zoo_entry, tmp_path, caplog):
    from src.errors import UserError
    from src.experiments.resolve import resolve_model
    from src.tracking import unlock_run_dir

    folder, paths, _ = zoo_entry
    ctx = _ctx(paths, tmp_path / "run")
    try:
        assert resolve_model("mlp_small", ctx, "teacher").model.num_classes == 10  # honest meta: used
        restore = _relabel(folder, name="cifar10")
        try:
            for spec, role in (("mlp_small", "teacher"), (str(folder), "teacher[1]"),  # zoo name, folder,
                               (f"mlp@{folder / 'model.safetensors'}", "teacher")):  # arch@ its weights file
                with pytest.raises(UserError) as e:
                    resolve_model(spec, ctx, role)
                msg = str(e.value)
                assert "\n" not in msg and f"{role} {folder} was trained on cifar10 (its meta.json)" in msg, msg
                assert "this run's dataset is digits" in msg and "main_pretrain.py dataset=digits" in msg
            with caplog.at_level(logging.WARNING, logger="kt"):
                assert resolve_model(str(folder), ctx, "student").model is not None  # fine-tuning: a warning
                assert resolve_model(str(folder), ctx, "features[0]").model is not None  # head dropped: silent
            warned = [r.getMessage() for r in caplog.records if "was trained on cifar10" in r.getMessage()]
            assert len(warned) == 1 and warned[0].startswith("student "), warned
        finally:
            restore()
    finally:
        unlock_run_dir(ctx.run_dir)


def test_an_image_folder_is_told_apart_by_its_root(zoo_entry, tmp_path):
    """Two ImageFolder datasets share the name `imagefolder`: the root's folder name tells them apart."""
    from src.errors import UserError
    from src.experiments.resolve import dataset_label, resolve_model
    from src.tracking import unlock_run_dir

    assert dataset_label({"name": "imagefolder", "root": "/data/dtd"}) == "imagefolder-dtd"
    assert dataset_label({"name": "cifar10", "root": "/data/cifar"}) == "cifar10"
    folder, paths, _ = zoo_entry
    restore = _relabel(folder, name="imagefolder", root="/data/pets")
    ctx = _ctx(paths, tmp_path / "run")
    try:
        with pytest.raises(UserError, match=r"was trained on imagefolder-pets \(its meta.json\) but this run's "
                                            r"dataset is digits"):
            resolve_model(str(folder), ctx, "teacher")
    finally:
        restore()
        unlock_run_dir(ctx.run_dir)
