"""One grammar for naming a model in a config.

A model is named in one of six ways, tried in this order (the first that matches wins):

- ``node``      a model config node ``{arch, pretrained, checkpoint, kwargs, name}`` (a dict or DictConfig);
- ``zoo``       a key of ``cfg.zoo.models`` (so a zoo entry may shadow a timm name);
- ``hf``        ``hf:<hub name or folder>``, or an existing folder holding a transformers ``config.json`` (and no
                meta.json): a text model of real HF weights, read from the folder or the HF cache (src/models/text.py);
- ``path``      an existing checkpoint folder or file written by this suite (so a folder whose name holds ``@`` is
                a path, not ``arch@file``);
- ``arch_file`` ``arch@weights_file``, split on the first ``@``;
- ``timm``      anything else: a timm model name, whose pretrained hub weights are loaded.

``ModelSpec.parse`` only classifies (no timm import, no file read other than ``Path.exists``);
``ModelSpec.check`` is the cheap validation before any loading (it imports timm, which is slow, lazily).
Loading stays with the caller (``src.experiments.resolve.resolve_model``), which needs the dataset and the zoo folder.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple

KINDS = ("zoo", "path", "arch_file", "timm", "node", "hf")
NODE_KEYS = ("arch", "pretrained", "checkpoint", "kwargs", "name")


def _plain(node) -> dict:
    """A plain dict from a dict or an OmegaConf node (interpolations resolved)."""
    if type(node).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _node(spec) -> dict:
    """The five fields of a model node, normalised: arch/checkpoint/name str or None, pretrained bool, kwargs dict."""
    d = _plain(spec)
    opt = lambda k: None if d.get(k) is None else str(d[k])  # noqa: E731
    kw = d.get("kwargs")
    return {"arch": opt("arch"), "pretrained": bool(d.get("pretrained", False)), "checkpoint": opt("checkpoint"),
            "kwargs": _plain(kw) if kw is not None else {}, "name": opt("name")}


def _hf_folder(p: Path) -> bool:
    """A folder saved by transformers (config.json) that is not a checkpoint of this suite (meta.json)."""
    return p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").is_file()


def _entry_arch(entry) -> Optional[str]:
    if entry is None:
        return None
    arch = entry.get("arch") if hasattr(entry, "get") else getattr(entry, "arch", None)
    return None if arch is None else str(arch)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    - ``kind``: one of ``KINDS``;
    - ``text``: the spec as given, as a string (a node: ``str`` of the node);
    - ``arch``: the architecture when known without loading anything: the zoo entry's ``arch``, the part of
      ``arch@file`` before the ``@``, the timm name, the node's ``arch``; None for a checkpoint path (its arch is in
      its meta.json, known after loading);
    - ``path``: the checkpoint folder/file (kind ``path``) or the weights file (kind ``arch_file``), else None (a
      node's checkpoint is ``node["checkpoint"]``);
    - ``node``: for kind ``node``, the dict ``{arch, pretrained, checkpoint, kwargs, name}``, else None.
    """
    kind: str
    text: str
    arch: Optional[str] = None
    path: Optional[str] = None
    node: Optional[dict] = field(default=None, hash=False)
    # the zoo's names seen by parse(): the default for check()'s suggestions
    zoo_names: Tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ModelSpec.kind={self.kind!r} is not one of {', '.join(KINDS)}")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, spec: Any, zoo: Optional[Mapping] = None) -> "ModelSpec":
        """Classify `spec` (see the module docstring for the order). `zoo` is the zoo's models mapping (name ->
        entry with `arch`, e.g. ``cfg.zoo.models``), or None when no zoo is configured."""
        if isinstance(spec, ModelSpec):
            return spec
        names = tuple(str(k) for k in zoo.keys()) if zoo else ()
        if isinstance(spec, Mapping):  # dict and DictConfig
            node = _node(spec)
            return cls("node", str(spec), node["arch"], None, node, names)
        text = str(spec)
        if text in names:
            return cls("zoo", text, _entry_arch(zoo[text]), None, None, names)
        if text.startswith("hf:"):
            return cls("hf", text, text, None, None, names)
        if text and _hf_folder(Path(text)):
            return cls("hf", text, f"hf:{text}", text, None, names)
        if text and Path(text).exists():  # '' would be '.', the working directory: not a checkpoint
            return cls("path", text, None, text, None, names)
        if "@" in text:
            arch, path = text.split("@", 1)
            return cls("arch_file", text, arch, path, None, names)
        return cls("timm", text, text, None, None, names)

    # ------------------------------------------------------------------ checks
    def check(self, role: str = "model", zoo_names: Iterable[str] = ()) -> None:
        """UserError unless the spec can be resolved (without loading or training anything): the architecture of
        ``arch@file`` and a timm name must be timm names (ours are registered there), the weights file must exist,
        a node's kwargs must be ones its arch takes. `role` is the config key named in the message (e.g.
        ``teacher``, ``features[1]``); `zoo_names` (default: the zoo given to parse) are listed in the message for
        an unknown name."""
        if self.kind in ("zoo", "path", "hf"):  # hf: whether the cache holds it is known when it loads (one line)
            return
        from .hub import check_timm_weights

        if self.kind == "node":
            if self.arch is not None:
                from .factory import check_kwargs

                check_kwargs(self.arch, self.node["kwargs"], f"{role}.kwargs")
                if self.node.get("pretrained") and not self.node.get("checkpoint"):
                    check_timm_weights(self.arch, role)  # offline hub weights: known now, not after stage 1
            return
        import timm

        from ..errors import UserError, closest

        if self.kind == "arch_file":
            if not timm.is_model(self.arch):
                from . import nets

                raise UserError(f"unknown architecture '{self.arch}' in {role}={self.text}"
                                f"{closest(self.arch, timm.list_models() + list(nets.OUR_MODELS))}: use "
                                f"arch@weights_file with a timm name or one of ours")
            if not Path(self.path).is_file():
                raise UserError(f"weights file {self.path} (from {role}={self.text}) does not exist: check the path")
            return
        if timm.is_model(self.text):
            check_timm_weights(self.text, role)  # e.g. KDEP's `supervised`, first loaded after the distillation
            return
        names = [str(n) for n in zoo_names] or list(self.zoo_names)
        raise UserError(f"unknown {role} '{self.text}'{closest(self.text, names + timm.list_models())}: use a zoo "
                        f"name ({', '.join(names) or 'none configured'}), a timm model name, a checkpoint folder "
                        f"or arch@weights_file")

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        """The display name: a node's `name` or else its `arch`; otherwise the text as given. (A checkpoint path's
        display name comes from its meta.json after loading: the caller's job.)"""
        if self.kind == "node":
            return self.node["name"] or self.arch or self.text
        return self.text

    @property
    def is_fresh_arch(self) -> bool:
        """True for a bare timm/arch name: the zero-shot family builds such a student randomly initialised."""
        return self.kind == "timm"
