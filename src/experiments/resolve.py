"""Model resolution: a zoo name (trained on demand through `Context.train_missing`), a checkpoint folder/file
written by this suite, `arch@weights_file`, a timm name (its pretrained hub weights) or a model config node."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..io_utils import content_hash
from ..models import create_model, load_checkpoint, read_meta, zoo_dir
from ..models.spec import ModelSpec
from ..models.hub import check_timm_weights
from .context import Context, ModelRef, RunSettings
from .preflight import spec_in_zoo, zoo_entries

log = logging.getLogger("kt")


def zoo_folder(s: RunSettings, dataset_name: str, name: str) -> Path:
    """Checkpoint folder of zoo entry `name`; draw k > 0 of the zoo (zoo.seed=k) lives under zoo_seed<k>/."""
    k = s.zoo_seed
    return zoo_dir(s.paths.checkpoints, dataset_name if k == 0 else f"{dataset_name}/zoo_seed{k}", name)


def hash_index(s: RunSettings) -> Path:
    """Where content hashes of weight files are remembered across runs (by path, size and mtime)."""
    return Path(s.paths.cache) / "content_hashes.json"


def resolve_model(spec, ctx: Context, role: str = "model") -> ModelRef:
    """A model from a zoo name, a checkpoint folder/file written by this suite, `arch@weights_file`, a timm name
    (pretrained hub weights), or a model config node {arch, pretrained, checkpoint, kwargs, name}: one branch per
    kind of `ModelSpec` (src/models/spec.py)."""
    zoo = ctx.settings.zoo
    s = spec_in_zoo(spec, zoo)
    if s.kind != "node":
        s.check(role, zoo_entries(zoo))  # unknown names and missing weight files fail here, before any loading
    return {"node": _from_node, "zoo": _from_zoo, "arch_file": _from_arch_file, "path": _from_path,
            "timm": _from_timm, "hf": _from_hf}[s.kind](s, ctx, role)


def feature_role(role: str) -> bool:
    """A model whose pooled features are all that is used (AFT's `features[i]`): built without a head."""
    return role.startswith("features")


def _new(ctx: Context, arch: str, role: str = "model", **kw):
    """create_model for the run's data; a feature role gets a headless model, and hub weights that cannot be had
    (offline, no HF cache) are one line naming the local-file forms."""
    if kw.get("pretrained"):
        check_timm_weights(arch, role)  # offline and not in the HF cache: this line at once, no hub retries
    try:
        return create_model(arch, ctx.info, headless=feature_role(role), **kw)
    except UserError:
        raise
    except Exception as e:
        if not kw.get("pretrained"):
            raise
        raise UserError(f"could not load pretrained weights for timm model '{arch}' ({role}; {type(e).__name__}): "
                        f"offline, give the weights as a local file ('{arch}@/path/to/weights.safetensors', or "
                        f"checkpoint: /path/to/file with pretrained: false in the model node) or pre-fill the HF "
                        f"cache") from e


def _from_node(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    n = s.node
    if n["checkpoint"]:
        check_file_trained_on(Path(n["checkpoint"]), ctx, role)
    m = _new(ctx, n["arch"], role, pretrained=n["pretrained"], checkpoint=n["checkpoint"], kwargs=n["kwargs"])
    key = None
    if n["checkpoint"]:
        key = f"{n['arch']}-{content_hash(n['checkpoint'], hash_index(ctx.settings))}"
    elif n["pretrained"]:
        key = f"timm-{n['arch']}"
    return ModelRef(s.name, m, key, {})


def _from_zoo(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    settings, info, name = ctx.settings, ctx.info, s.text
    folder = zoo_folder(settings, info.name, name)
    if read_meta(folder) is None:
        if not settings.zoo.get("train_missing", False) or ctx.train_missing is None:
            raise UserError(f"zoo model '{name}' has no checkpoint in {folder}: train it with "
                            f"`python main_pretrain.py name={name}` or set zoo.train_missing=true")
        log.info("zoo model '%s' is missing: training it now (zoo.train_missing=true)", name)
        ctx.train_missing(name, ctx)
    model, meta = load_checkpoint(folder, info.num_classes, info.channels, hash_index(settings), info.modality)
    check_trained_on(meta, folder, ctx, role)
    return ModelRef(name, model, meta["hash"], meta)


def _from_arch_file(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    check_file_trained_on(Path(s.path), ctx, role)
    m = _new(ctx, s.arch, role, checkpoint=s.path, reinit_head=not role.startswith("teacher"))
    return ModelRef(s.text, m, f"{s.arch}-{content_hash(s.path, hash_index(ctx.settings))}",
                    {"arch": s.arch, "checkpoint": s.path})


def _from_path(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    model, meta = load_checkpoint(Path(s.path), ctx.info.num_classes, ctx.info.channels, hash_index(ctx.settings),
                                  ctx.info.modality)
    check_trained_on(meta, Path(s.path), ctx, role)
    return ModelRef(meta.get("name", Path(s.path).name), model, meta["hash"], meta)


def check_file_trained_on(path: Path, ctx: Context, role: str) -> None:
    """`arch@<zoo folder>/model.safetensors` (or a node's checkpoint there): the folder's meta.json, when there
    is a readable one, says what the weights were trained on."""
    try:
        meta = read_meta(path.parent) if (path.parent / "meta.json").is_file() else None
    except UserError:
        return  # a torn meta.json next to a plain weights file: the file is what was asked for
    if meta is not None:
        check_trained_on(meta, path.parent, ctx, role)


def dataset_label(d) -> str:
    """A dataset's name as runs tell them apart: `cifar10`, or `imagefolder-dtd` for a generic ImageFolder."""
    from omegaconf import OmegaConf

    from ..data.datasets import data_source

    src = data_source(OmegaConf.create(dict(d)))
    return f"{d.get('name')}{'-' + src if src else ''}"


def check_trained_on(meta: dict, folder: Path, ctx: Context, role: str) -> None:
    """A checkpoint whose meta.json says it was trained on another dataset than the run's: a teacher (its
    predictions are the targets) or a judge is refused with both names; a student or an evaluated model is warned
    about (fine-tuning from other data, or evaluating under a shift of the same label space, are legitimate); a
    feature role drops the head, so features learnt elsewhere are the point. A meta without a dataset: no check."""
    trained = meta.get("dataset") or {}
    if not trained.get("name") or feature_role(role):
        return
    here = f"{ctx.info.name}{'-' + ctx.info.source if ctx.info.source else ''}"
    there = dataset_label(trained)
    if there == here:
        return
    if role.startswith("teacher") or role == "judge":
        raise UserError(f"{role} {folder} was trained on {there} (its meta.json) but this run's dataset is {here}: "
                        f"give a {role.split('[')[0]} trained on {here} (e.g. `python main_pretrain.py "
                        f"dataset={ctx.info.name} name=<zoo name>`), or run on {there}")
    log.warning("%s %s was trained on %s (its meta.json) but this run's dataset is %s: used as given", role, folder,
                there, here)


def _from_timm(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    """A timm name: its pretrained hub weights (offline, only what the HF cache holds)."""
    name = s.text
    m = _new(ctx, name, role, pretrained=True)
    tag = m.pretrained_tag
    return ModelRef(name, m, f"timm-{name}-{tag}", {"arch": name})


def _from_hf(s: ModelSpec, ctx: Context, role: str) -> ModelRef:
    """`hf:<hub name or folder>` (or a transformers folder): a text model of real weights from the folder or the HF
    cache, with a fresh head; cached outputs are keyed by the weights' content hash."""
    from ..models.text import hf_source

    src = Path(hf_source(s.arch[3:]))
    weights = next((src / f for f in ("model.safetensors", "pytorch_model.bin") if (src / f).is_file()), None)
    tag = content_hash(weights, hash_index(ctx.settings)) if weights is not None else src.name
    m = _new(ctx, s.arch, role)
    return ModelRef(s.text, m, f"hf-{src.name}-{tag}", {"arch": s.arch})
