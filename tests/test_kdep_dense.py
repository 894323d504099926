"""KDEP's dense downstreams end to end (kdep/dense.yaml, shortened): one run distils once and fine-tunes each init
on digits classification, segmentation and detection, one stage each; the summary has every task's metrics; a
rerun skips the finished stages; bad downstream entries are refused before stage 1, in one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from src.errors import UserError
from src.experiments import kdep
from src.models import save_checkpoint
from src.models.factory import create_model
from src.models.protocol import ImageInputs

DIGITS = {"name": "digits", "num_classes": 10, "image_size": 8, "channels": 1, "mean": [0.3], "std": [0.38]}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A wrn_16_2 checkpoint (random weights: the mechanics only) so no zoo model has to be trained."""
    d = tmp_path_factory.mktemp("kdep_dense_teacher") / "wrn"
    torch.manual_seed(0)
    save_checkpoint(create_model("wrn_16_2", ImageInputs(10, 1, [0.3], [0.38], 8)), d,
                    {"name": "wrn_rand", "kwargs": {}, "dataset": DIGITS})
    return d


def _cfg(kt_paths, teacher_dir, *extra):
    return compose("kdep/dense", [*kt_paths, f"teacher={teacher_dir}", "baselines=[scratch]",
                                  "trainer.max_steps=6", "trainer.eval_every_steps=6",
                                  "finetune.trainer.max_steps=3", "trainer.progress=off", *extra])


@pytest.fixture(scope="module")
def dense_run(kt_paths, teacher_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kdep_dense_run")
    return kdep.run(_cfg(kt_paths, teacher_dir), run_dir=run_dir), run_dir


def test_one_run_fine_tunes_every_task_and_reports_its_metrics(dense_run, capsys):
    s, run_dir = dense_run
    assert s["stages_trained"] == ["distill"] + [f"finetune_{n}_{i}" for n in ("digits", "digits_20pct", "digits_seg",
                                                                                       "digits_det")
                                                 for i in ("kdep", "scratch")]
    seg, det = s["downstream"]["digits_seg"], s["downstream"]["digits_det"]
    assert (seg["task"], seg["metric"], det["task"], det["metric"]) == ("segmentation", "miou", "detection", "map")
    for key in ("digits_seg/kdep/miou", "digits_seg/scratch/miou", "digits_seg/kdep/pixel_acc",
                "digits_det/kdep/map", "digits_det/kdep/ap50", "digits_det/scratch/map", "digits/kdep"):
        assert 0 <= s[key] <= 100, key
    assert seg["kdep"] == s["digits_seg/kdep/miou"] and det["kdep"] == s["digits_det/kdep/map"]
    assert seg["delta_vs_scratch"] == pytest.approx(seg["kdep"] - seg["scratch"])
    assert det["delta_vs_scratch"] == pytest.approx(det["kdep"] - det["scratch"])
    assert "task" not in s["downstream"]["digits"]  # classification rows keep their keys
    row = json.loads((run_dir / "stages" / "finetune_digits_det_kdep" / "row.json").read_text())
    assert row["steps"] == 3 and row["train_size"] == 120 and row["eval_size"] == 120
    kdep.print_table(s, run_dir)
    out = capsys.readouterr().out
    assert "digits_seg mIoU %" in out and "digits_det mAP %" in out and "digits_det AP50 %" in out


def test_rerun_skips_the_finished_dense_stages(dense_run, kt_paths, teacher_dir):
    s, run_dir = dense_run
    (run_dir / "stages" / "finetune_digits_seg_scratch" / "row.json").unlink()
    again = kdep.run(_cfg(kt_paths, teacher_dir), run_dir=run_dir)
    assert again["stages_trained"] == ["finetune_digits_seg_scratch"]
    assert again["digits_det/kdep/map"] == s["digits_det/kdep/map"]
    assert again["digits_seg/scratch/miou"] == pytest.approx(s["digits_seg/scratch/miou"])


@pytest.mark.parametrize("entry, msg", [
    ("{name:x,task:segmentaton,train_split:transfer,eval_split:test}",
     r"downstream x: task=segmentaton is unknown \(closest: segmentation"),
    ("{name:x,task:detection,train_split:transfer,eval_split:test}",
     r"downstream x: task=detection needs a segmentation / detection dataset, got dataset.name=None"),
    ("{name:x,task:detection,detector:yolo,train_split:transfer,eval_split:test,dataset:{name:digits_canvas}}",
     r"downstream x: detector=yolo is unknown"),
])
def test_bad_downstream_entries_are_refused_by_validate(kt_paths, teacher_dir, entry, msg):
    with pytest.raises(UserError, match=msg):
        kdep.validate(_cfg(kt_paths, teacher_dir, f"downstream=[{entry}]"))


def test_a_backbone_the_detector_cannot_take_is_refused_before_stage_1(kt_paths, teacher_dir, tmp_path):
    with pytest.raises(UserError, match=r"detector=faster_rcnn with stages=5 needs 5 stage outputs but model "
                                        r"'resnet8' has 3"):
        kdep.run(_cfg(kt_paths, teacher_dir, "downstream.3.stages=5"), run_dir=tmp_path)
    assert not (tmp_path / "stages" / "distill").exists()
    with pytest.raises(UserError, match=r"dataset.num_classes=11 but digits_canvas detection has 10 classes"):
        kdep.run(_cfg(kt_paths, teacher_dir, "downstream.3.dataset.num_classes=11"), run_dir=tmp_path)


# ------------------------------------------------------------------------------------------ the GPU presets
PRESETS = {"voc_seg": ("segmentation", "voc", 21, 473, 50),
           "cityscapes_seg": ("segmentation", "cityscapes", 19, 713, 200),
           "ade20k_seg": ("segmentation", "ade20k", 150, 473, 100),
           "coco_det": ("detection", "coco", 80, 800, 12), "voc_det": ("detection", "voc", 20, 800, 18)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_presets_compose_over_the_imagenet_setting(preset, tmp_path, monkeypatch):
    import subprocess
    import sys

    import src.models.hub as hub
    from conftest import ROOT

    # the presets name hub weights (resnet50.tv_in1k): validate as on a GPU node that reaches the hub;
    # tests/test_hub.py checks the offline answer
    monkeypatch.setattr(hub, "offline", lambda: False)
    task, name, classes, size, epochs = PRESETS[preset]
    cfg = compose(f"kdep/{preset}", [f"paths.data={tmp_path}"])
    kdep.validate(cfg)  # every key of the entry is known and typed
    (d,) = cfg.downstream
    dc = kdep.downstream_dataset_cfg(d)
    assert (d.task, dc.name, dc.num_classes, dc.image_size, dc.task) == (task, name, classes, size, task)
    assert str(dc.root).startswith(str(tmp_path))
    assert kdep.finetune_cfg(cfg, "trainer", d).epochs == epochs
    assert kdep.finetune_cfg(cfg, "loader", d).batch_size == 16
    assert cfg.teacher == "resnet50.tv_in1k" and cfg.student.arch == "resnet18" and cfg.trainer.epochs == 90
    if preset != "coco_det":  # the command line composes the same (`--cfg job`): one subprocess is enough
        return
    out = subprocess.run([sys.executable, "main_kdep.py", "--config-name", f"kdep/{preset}.yaml", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"task: {task}" in out.stdout and f"num_classes: {classes}" in out.stdout
