"""Dense tasks' building blocks: the digits canvases (masks and boxes agree with the pasted ink), the dense loader's
augmentation (image and targets move together), mIoU / COCO AP on hand-computed cases, and the backbones built
from a student (they carry its weights; a backbone a head cannot take is refused in one line)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from src.data import build_dataset
from src.data.dense import INK, DenseLoader, check_dense_split, paste_canvas, scale_crop
from src.errors import UserError
from src.metrics.dense import BoxMAP, MeanIoU, confusion, iou_from_confusion
from src.models.dense import build_detector, build_segmenter, carries_weights
from src.models.factory import create_model
from src.models.protocol import ImageInputs
from src.schema import DatasetConfig

SPLITS = {"train": 0.4, "transfer": 0.3, "val": 0.1, "test": 0.2}


def canvas_cfg(task, **kw):
    base = {"name": "digits_canvas", "num_classes": 11 if task == "segmentation" else 10, "image_size": 32,
            "task": task, "splits": SPLITS, "canvases": 60}
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {**base, **kw})


@pytest.fixture(scope="module")
def seg_ds():
    return build_dataset(canvas_cfg("segmentation"), None)


# ------------------------------------------------------------------------------------------------ canvases
def test_canvas_masks_and_boxes_match_the_pasted_ink(seg_ds):
    s = seg_ds.split("transfer")
    assert s.images.shape == (60, 1, 32, 32) and s.targets["masks"].shape == (60, 32, 32)
    for img, mask, boxes, labels in zip(s.images, s.targets["masks"], s.targets["boxes"], s.targets["box_labels"]):
        assert 1 <= len(labels) <= 3 and int(labels.min()) >= 1 and int(labels.max()) <= 10
        assert torch.equal(mask > 0, img[0] > INK)  # the mask is exactly the ink
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            inside = mask[y1:y2, x1:x2]
            assert (inside == c).any() and set(inside.unique().tolist()) <= {0, c}  # no overlap
            ys, xs = torch.nonzero(inside == c, as_tuple=True)  # the box is the ink's tight box
            assert (ys.min(), xs.min(), ys.max(), xs.max()) == (0, 0, y2 - y1 - 1, x2 - x1 - 1)
            covered[y1:y2, x1:x2] = True
        assert not (mask[~covered] > 0).any()  # no ink outside the boxes


def test_canvases_are_seeded_and_come_from_their_own_split(seg_ds):
    again = build_dataset(canvas_cfg("segmentation"), None)
    for name in ("transfer", "test"):
        assert torch.equal(seg_ds.split(name).images, again.split(name).images)
    other = build_dataset(canvas_cfg("segmentation", split_seed=1), None)
    assert not torch.equal(other.split("transfer").images, seg_ds.split("transfer").images)
    # canvases paste only digits of their split: one digit image of `test` is never on a `transfer` canvas
    rng = __import__("numpy").random.default_rng(0)
    digits = torch.zeros(1, 8, 8, dtype=torch.uint8)
    digits[0, 2:6, 2:6] = 255
    img, mask, boxes, labels = paste_canvas(rng, digits, torch.tensor([7]), 32, 3, [8, 8])
    assert set(labels.tolist()) == {8} and int((mask == 8).sum()) > 0
    assert (boxes[:, 2] - boxes[:, 0]).min() >= 3


def test_class_count_and_canvas_settings_are_checked():
    with pytest.raises(UserError, match=r"dataset.num_classes=10 but digits_canvas segmentation has 11 classes "
                                        r"\(background included\)"):
        build_dataset(canvas_cfg("segmentation", num_classes=10), None)
    with pytest.raises(UserError, match=r"dataset.object_size=\[8, 40\]"):
        build_dataset(canvas_cfg("detection", object_size=[8, 40]), None)


# -------------------------------------------------------------------------------------------------- loader
def test_segmentation_augmentation_moves_image_and_mask_together(seg_ds):
    s = seg_ds.split("transfer")
    img, mask = s.images[0], s.targets["masks"][0]
    same = scale_crop(img, mask, 32, 1.0, 0.3, 0.7)
    assert torch.equal(same[0], img) and torch.equal(same[1], mask)
    small = scale_crop(img, mask, 32, 0.5, 0.0, 0.0)  # padded: image 0, mask ignore
    assert (small[1][16:, :] == 255).all() and (small[0][:, 16:, :] == 0).all()
    loader = DenseLoader(s, "segmentation", 20, shuffle=True, augment=True, seed=3)
    agree = []
    for b in loader.iter_epoch(0):
        assert b.inputs.shape == (len(b), 1, 32, 32) and b.targets.dtype == torch.int64
        ink, valid = b.inputs[:, 0] > INK / 255, b.targets != 255
        agree.append(((b.targets > 0) == ink)[valid].float().mean())
    assert float(torch.stack(agree).mean()) > 0.95  # the mask is still (nearly) the ink after scale/crop/flip
    plain = next(iter(DenseLoader(s, "segmentation", 60).iter_epoch(0)))
    assert torch.equal(plain.inputs, s.images.float() / 255) and torch.equal(plain.targets,
                                                                           s.targets["masks"].long())
    assert torch.equal(next(iter(loader.iter_epoch(0))).inputs, next(iter(loader.iter_epoch(0))).inputs)


def test_detection_flip_moves_the_boxes():
    ds = build_dataset(canvas_cfg("detection"), None)
    s = ds.split("transfer")
    loader = DenseLoader(s, "detection", 60, augment=True, seed=0)
    b = next(iter(loader.iter_epoch(0)))
    flipped = loader.epoch_parameters(0)["flip"]
    assert 0 < int(flipped.sum()) < 60
    for i in range(60):
        boxes, x = b.targets[i]["boxes"].long(), b.inputs[i, 0]
        expect = s.images[i, 0].flip(-1) if flipped[i] else s.images[i, 0]
        assert torch.equal(x, expect.float() / 255)
        for x1, y1, x2, y2 in boxes.tolist():  # each box still frames ink on its edges
            crop = x[y1:y2, x1:x2] > INK / 255
            assert crop[:, 0].any() and crop[:, -1].any() and crop[0].any() and crop[-1].any()


def test_a_last_training_batch_of_one_is_dropped_as_batchnorm_needs_two(seg_ds):
    """DeepLabV3's ASPP pooling BatchNorm fails on a batch of 1 (found by the VOC rehearsal: 3 images, batch 2);
    a real split of N = 1 mod batch ended an epoch that way. Training drops that batch; evaluation keeps it."""
    from src.data.dense import build_dense_loader

    lc = OmegaConf.create({"batch_size": 2, "eval_batch_size": 2, "shuffle": True, "drop_last": False,
                           "augment": "none"})
    split = seg_ds.split("train").select(torch.arange(5))
    sizes = lambda train: [len(b.inputs) for b in build_dense_loader(lc, split, "segmentation", train).iter_epoch(0)]
    assert sizes(True) == [2, 2] and sizes(False) == [2, 2, 1]
    assert [len(b.inputs) for b in build_dense_loader(lc, seg_ds.split("train").select(torch.arange(4)),
                                                      "segmentation", True).iter_epoch(0)] == [2, 2]
    from src.models.dense import build_segmenter

    model = build_segmenter(create_model("resnet8", ImageInputs(10, 1, [0.3], [0.38])), 11, "deeplabv3",
                            channels=1).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 1, 32, 32))  # what the dropped batch would have done


def test_detection_split_without_boxes_and_out_of_range_masks_are_refused(seg_ds):
    ds = build_dataset(canvas_cfg("detection"), None)
    s = ds.split("test")
    s.targets["boxes"] = [b[:0] for b in s.targets["boxes"]]
    with pytest.raises(UserError, match=r"split 'test' has 60 images but no boxes"):
        check_dense_split(s, "detection")
    m = seg_ds.split("val")
    m.targets["masks"] = m.targets["masks"].clone()
    m.targets["masks"][0, 0, 0] = 30
    with pytest.raises(UserError, match=r"mask holds class id 30 but the dataset has 11 classes"):
        check_dense_split(m, "segmentation")


# ------------------------------------------------------------------------------------------------- metrics
def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = confusion(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    r = iou_from_confusion(conf)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: 2/(2+1) ; class 2: 1/(1+1)
    assert r["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert r["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3) and r["pixel_acc"] == pytest.approx(400 / 6)
    m = MeanIoU(4)  # class 3 never occurs: left out of the mean; logits are argmax-ed
    m.update(torch.nn.functional.one_hot(pred.clamp(max=3), 4).permute(2, 0, 1)[None].float(), target[None])
    assert m.compute()["miou"] == pytest.approx(r["miou"]) and m.compute()["iou"][3] != m.compute()["iou"][3]


def test_box_map_by_hand():
    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}]
    m = BoxMAP()  # IoU 0.62: a match at thresholds .50, .55, .60 of the ten -> AP 30, AP50 100
    m.update([{"boxes": torch.tensor([[0.0, 0, 10, 6.2]]), "scores": torch.tensor([0.9]),
               "labels": torch.tensor([1])}], gt)
    r = m.compute()
    assert r["map"] == pytest.approx(30.0, abs=1e-4) and r["ap50"] == pytest.approx(100.0)
    m = BoxMAP()  # two objects, one found: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points
    m.update([{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]),
               "labels": torch.tensor([1])}],
             [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]), "labels": torch.tensor([1, 1])}])
    assert m.compute()["map"] == pytest.approx(100 * 51 / 101, abs=1e-3)


# -------------------------------------------------------------------------------------------------- models
def _student(arch="resnet8"):
    torch.manual_seed(0)
    return create_model(arch, ImageInputs(10, 1, [0.3], [0.38], 8))


@pytest.mark.parametrize("kind", ["fcn", "deeplabv3", "faster_rcnn", "retinanet", "fcos"])
def test_dense_models_carry_the_student_weights(kind):
    student = _student()
    if kind in ("fcn", "deeplabv3"):
        model, prefix = build_segmenter(student, 11, kind, 1, 32), "backbone.student."
        model.eval()
        assert model(torch.rand(2, 1, 32, 32))["out"].shape == (2, 11, 32, 32)
    else:
        model, prefix = build_detector(student, 10, kind, 2, 1, 32, fpn_width=32), "backbone.body.student."
        model.train()
        losses = model([torch.rand(1, 32, 32)], [{"boxes": torch.tensor([[2.0, 2, 14, 14]]),
                                                   "labels": torch.tensor([3])}])
        assert all(torch.isfinite(v) for v in losses.values())
    sd = model.state_dict()
    for k, v in student.state_dict().items():
        if not k.startswith("net.fc"):
            assert torch.equal(sd[prefix + k], v), k
    with torch.no_grad():  # a backbone that lost a weight is refused
        next(model.parameters()).add_(1.0)
    with pytest.raises(UserError, match="does not hold the student's weight"):
        carries_weights(model, _student(), prefix)


def test_backbones_a_head_cannot_take_are_refused():
    with pytest.raises(UserError, match="detector=faster_rcnn with stages=4 needs 4 stage outputs but model "
                                        "'resnet8' has 3"):
        build_detector(_student(), 10, "faster_rcnn", 4, 1, 32)
    mlp = create_model("mlp", ImageInputs(10, 1, [0.3], [0.38], 8))
    with pytest.raises(UserError, match="exposes no intermediate stages"):
        build_segmenter(mlp, 11, "fcn", 1, 8)
    with pytest.raises(UserError, match="detector=yolo is unknown"):
        build_detector(_student(), 10, "yolo")
