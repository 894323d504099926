"""Typed schemas of the config groups, registered in Hydra's ConfigStore.

Each group's YAML files start with ``defaults: [_schema, _self_]`` so that Hydra validates them against the
dataclass below: ``optimizer.lr=abc`` or an unknown key fails at composition, before any data is touched.
Groups whose content is open by nature (``method`` with its ``_target_`` kwargs, ``model`` kwargs) are not
typed beyond their common keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PathsConfig:
    data: str = "data"
    checkpoints: str = "checkpoints"
    cache: str = "cache"


@dataclass
class SubsetConfig:
    fraction: Optional[float] = None  # keep this fraction of each class (seeded)
    per_class: Optional[int] = None  # or this many images per class
    seed: int = 0


@dataclass
class TextConfig:
    """A text dataset's tokenizer (src/data/text.py): WordPiece trained on its train split."""
    vocab_size: int = 8000
    min_frequency: int = 2  # a word piece seen fewer times in the train split is not in the vocabulary
    lowercase: bool = True


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: Optional[str] = None  # on-disk location (cifar/imagefolder); digits ships with scikit-learn
    num_classes: int = 10
    image_size: int = 8
    channels: int = 1
    mean: List[float] = field(default_factory=lambda: [0.5])
    std: List[float] = field(default_factory=lambda: [0.5])
    crop_pct: float = 1.0  # eval resize = image_size / crop_pct, then centre crop (imagefolder)
    # digits: stratified, seeded split of the 1,797 images into named parts (fractions sum to 1)
    splits: Dict[str, float] = field(default_factory=dict)
    split_seed: int = 0
    # cifar / imagefolder: fraction of train held out as `val` (seeded, stratified); 0 = no val split
    val_fraction: float = 0.0
    train_dir: str = "train"
    val_dir: str = "val"
    # which named split plays which role
    pretrain_split: str = "train"
    transfer_split: str = "transfer"
    val_split: str = "val"
    test_split: str = "test"
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    text: Optional[TextConfig] = None  # text datasets (rotten_tomatoes, sms_spam): their tokenizer
    # dense tasks (src/data/dense.py): what the targets are, and the digits canvases' construction
    task: str = "classification"  # classification | segmentation | detection
    canvases: Optional[int] = None  # digits_canvas: canvases per split (None: half the split's digits)
    max_objects: int = 3  # digits_canvas: 1..max_objects digits pasted per canvas
    object_size: List[int] = field(default_factory=lambda: [8, 14])  # digits_canvas: pasted digit side, px


@dataclass
class LoaderConfig:
    backend: str = "tensor"  # tensor | torch | ffcv
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = False
    augment: str = "crop_flip"  # none | crop_flip | rrc_flip
    crop_padding: int = 1
    flip: bool = True
    device: str = "auto"  # where batches are delivered: auto = cuda if available else cpu
    dtype: str = "float32"  # dtype of the delivered images in [0, 1]: float32 | bfloat16 | float16
    pin_memory: bool = True
    ffcv_dir: Optional[str] = None  # folder with <dataset>_<split>.beton files (ffcv backend)
    ffcv_order: str = "quasi_random"  # random | quasi_random | sequential
    ffcv_os_cache: bool = True
    verify: str = "sample"  # ffcv page checksums checked at every start: full | sample | none


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scale_lr: bool = False  # lr * batch_size / 256 (the Fantastic Gains convention)


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # none | step | cosine
    warmup_epochs: float = 0.0
    step_size: float = 30.0  # epochs between x gamma decays (step)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class TrainerConfig:
    epochs: float = 10.0
    max_steps: Optional[int] = None  # overrides epochs when set
    eval_every: int = 1  # evaluate every N epochs (eval_every_steps wins when set)
    eval_every_steps: Optional[int] = None
    ckpt_every_steps: Optional[int] = None  # default: at every evaluation
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the trained model
    compile_frozen: bool = False  # torch.compile the frozen teacher / student-teacher
    grad_clip: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    progress: str = "auto"  # auto (only on a terminal) | on | off
    resume: bool = True  # resume from the run dir's checkpoint when there is one
    keep_checkpoints: int = 1


@dataclass
class ModelConfig:
    arch: str = "resnet20"  # any timm name or one of ours (mlp, lenet, resnet8/20/56, wrn_16_1/16_2/40_2)
    pretrained: bool = False  # timm hub weights (and their mean/std)
    checkpoint: Optional[str] = None  # local weight file; the head is re-initialised if the class count differs
    kwargs: Dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = None


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "knowledge-transfer"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    name: Optional[str] = None
    notes: Optional[str] = None


_GROUPS = {
    "paths": PathsConfig,
    "dataset": DatasetConfig,
    "loader": LoaderConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "trainer": TrainerConfig,
    "wandb": WandbConfig,
    "model": ModelConfig,
}


def typed(schema, *nodes):
    """A typed node of `schema` with `nodes` (configs, dicts or None) merged on top: wrong types and unknown keys
    fail here, as at composition (for configs a family builds itself, e.g. a zoo recipe or a baseline's trainer)."""
    from omegaconf import OmegaConf

    plain = [OmegaConf.to_container(n, resolve=True) if OmegaConf.is_config(n) else n for n in nodes]
    return OmegaConf.merge(OmegaConf.structured(schema), *[n for n in plain if n is not None])


def register_configs() -> None:
    cs = ConfigStore.instance()
    for group, node in _GROUPS.items():
        cs.store(group=group, name="_schema", node=node)


register_configs()


def _register_resolvers() -> None:
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("kt_pid"):
        # under torchrun every rank is a child of the same agent: its pid names one run dir for all ranks.
        # Cached like Hydra's `now`: Hydra copies the launching process's resolver cache into every job's config,
        # so a submitit job (another process, and again after a requeue) resolves the same sweep dir.
        OmegaConf.register_new_resolver(
            "kt_pid", lambda: str(os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()), use_cache=True)


_register_resolvers()


def as_dict(node) -> dict:
    """A plain dict from a config node, a dict or None."""
    if node is None:
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
