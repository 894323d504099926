"""One model namespace: every timm name plus our small nets (registered in timm), each wrapped so that it
normalises its own [0, 1] input and exposes features and logits uniformly."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserError, closest
from ..io_utils import load_state_dict
from . import nets  # noqa: F401  (registers our models in timm)
from .hub import check_timm_weights
from .protocol import ModelInputs, TransferModel
from .text import build_text_model, checkpoint_state, is_text_arch

log = logging.getLogger(__name__)


class Normalized(nn.Module):
    """`net` behind its own input normalisation: the image model of the `TransferModel` protocol (protocol.py).
    Inputs are raw images in [0, 1].

    - `forward(x)` -> logits; `features(x)` -> pooled pre-logits
    - `features_and_logits(x)` -> (penultimate features, logits) in one pass
    - `intermediates(x)` -> list of stage outputs (models that implement timm's `forward_intermediates`);
      `logits_and_intermediates(x)` -> (logits, stage outputs) in one pass
    - `classifier`, `reset_classifier(n)`, `freeze_backbone()` (linear probe), `pretrained_tag`
    - `normalize(x)` / `denormalize(z)` / `forward_normalized(z)`: the mean/std-normalised space the net sees
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = ""):
        super().__init__()
        self.net = net
        self.arch = arch
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes"))

    @property
    def num_features(self) -> int:
        return int(getattr(self.net, "num_features"))

    @property
    def classifier(self) -> nn.Module:
        return self.net.get_classifier()

    @property
    def pretrained_tag(self) -> str:
        return getattr(self.net, "pretrained_cfg", {}).get("tag") or ""

    @property
    def has_intermediates(self) -> bool:
        return hasattr(self.net, "forward_intermediates")

    def reset_classifier(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)

    def freeze_backbone(self) -> "Normalized":
        """Linear probe: the net in eval mode, every parameter frozen but the classifier's."""
        freeze(self.net)
        for p in self.classifier.parameters():
            p.requires_grad_(True)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """In the model's own dtype (that of its buffers): a bf16/fp16 batch (loader.dtype) runs through an fp32
        model without autocast, and under autocast the first layer casts as usual."""
        x = x.to(self.mean.dtype)
        return (x - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(self.normalize(x)), pre_logits=True)

    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.net.get_classifier()(f)

    def _need_intermediates(self) -> None:
        if not self.has_intermediates:
            raise UserError(f"model '{self.arch}' exposes no intermediate stages (forward_intermediates)")

    def intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        self._need_intermediates()
        return self.net.forward_intermediates(self.normalize(x), intermediates_only=True)

    def logits_and_intermediates(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._need_intermediates()
        final, inter = self.net.forward_intermediates(self.normalize(x))
        return self.net.forward_head(final), list(inter)


def _classifier_keys(net: nn.Module) -> List[str]:
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if head is None or not isinstance(head, nn.Module):
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in net.named_parameters() if id(p) in ids]


def load_weights(net: nn.Module, state: Dict[str, torch.Tensor], source: str, reinit_head: bool = True) -> str:
    """Load `state` into `net`; a classifier whose class count differs is re-initialised (and said so), or with
    `reinit_head=False` (a teacher: its head is its knowledge) refused as another label space. Any other mismatch
    is a different architecture: UserError naming the first bad key."""
    own = net.state_dict()
    head_keys = set(_classifier_keys(net))
    state_orig, state = state, dict(state)
    dropped = []
    for k in list(state):
        if k in head_keys and k in own and state[k].shape != own[k].shape:
            dropped.append(k)
            del state[k]
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        k = (bad_shape or missing or unexpected)[0]
        detail = (f"shape {tuple(state[k].shape)} vs {tuple(own[k].shape)}" if k in bad_shape else
                  "missing from the checkpoint" if k in missing else "not in the model")
        raise UserError(f"checkpoint {source} does not fit this architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(bad_shape)} mis-shaped keys; first: '{k}' {detail}): "
                        f"pick the model/arch the checkpoint was trained with")
    if dropped and not reinit_head:
        k = dropped[0]
        raise UserError(f"checkpoint {source} predicts another number of classes ('{k}' has shape "
                        f"{tuple(dict(state_orig)[k].shape)}, this dataset needs {tuple(own[k].shape)}): teacher "
                        f"and student must share the label space; use a checkpoint trained on this dataset")
    net.load_state_dict(state, strict=False)
    if dropped:
        msg = f"re-initialised the classifier ({', '.join(dropped)}): {source} has a different class count"
        log.warning(msg)
        return msg
    return ""


def create_model(arch: str, info: ModelInputs, pretrained: bool = False, checkpoint: Optional[str] = None,
                 kwargs: Optional[dict] = None, reinit_head: bool = True, headless: bool = False) -> TransferModel:
    """The model `arch` for the data `info` describes (a `src.data.DatasetInfo`, a dataset config node, an
    `ImageInputs`: anything with num_classes, channels, mean, std, image_size and optionally `modality`, default
    'image'), built by the model class of its modality. `headless`: a feature extractor (AFT's foundation models):
    no classifier, and a weight file's head (or its absence: DINOv2's hub files have none) is not asked for."""
    modality = getattr(info, "modality", None) or "image"
    build = _BUILDERS.get(str(modality))
    if build is None:
        raise UserError(f"modality '{modality}' has no model class yet (create_model builds "
                        f"{', '.join(_BUILDERS)} models): use a dataset of one of those modalities")
    return build(arch, info, pretrained=pretrained, checkpoint=checkpoint, kwargs=kwargs, reinit_head=reinit_head,
                 headless=headless)


def timm_filter(net: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A raw timm-format state dict as timm itself prepares hub weights for `net`: the model module's
    `checkpoint_filter_fn` (a ViT's position table resampled to the built image size, e.g. DINOv2's 518 px table
    for 224 px; old layouts converted). Our own nets have none: `state` unchanged."""
    import sys

    fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(dict(state), net)
    except Exception as e:  # a filter that does not know this file: the shape check below names the mismatch
        log.warning("timm's checkpoint filter for %s did not apply (%s): loading the file as it is",
                    type(net).__name__, e)
        return state


def _drop_head(net: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A headless model's state: the file's classifier keys (timm's `pretrained_cfg['classifier']`) dropped."""
    heads = (getattr(net, "pretrained_cfg", {}) or {}).get("classifier") or "head"
    heads = [heads] if isinstance(heads, str) else list(heads)
    own = net.state_dict()
    return {k: v for k, v in state.items() if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}


def image_model(arch: str, info: ModelInputs, pretrained: bool = False, checkpoint: Optional[str] = None,
                kwargs: Optional[dict] = None, reinit_head: bool = True, headless: bool = False) -> Normalized:
    """Any timm name or one of ours, for `info.num_classes` classes of `info.channels`-channel images (`mlp` also
    takes `info.image_size`). `pretrained` takes timm's hub weights (GPU nodes with internet or a warm HF cache)
    and their mean/std; `checkpoint` loads a local weight file (safetensors or torch weights-only),
    re-initialising the head when the class count differs; otherwise the dataset's mean/std are used."""
    import timm

    num_classes, in_chans, mean, std, img_size = info.num_classes, info.channels, info.mean, info.std, info.image_size
    num_classes = 0 if headless else num_classes
    kwargs = dict(kwargs or {})
    if is_text_arch(arch):
        raise UserError(f"'{arch}' is a text model but the dataset is {getattr(info, 'modality', None) or 'image'}: "
                        f"use it with a text dataset (dataset=rotten_tomatoes or sms_spam), or an image model here")
    if not timm.is_model(arch):
        raise UserError(f"unknown model '{arch}'{closest(arch, timm.list_models() + nets.OUR_MODELS)}; any timm "
                        f"name or one of {', '.join(nets.OUR_MODELS)} works")
    check_kwargs(arch, kwargs)
    if arch == "mlp" and img_size:
        kwargs.setdefault("img_size", img_size)
    if pretrained:
        check_timm_weights(arch)  # offline and not cached: one line now, not after 30 s of hub retries
    net = _build_timm(arch, pretrained, num_classes, in_chans, kwargs, img_size)
    if pretrained:
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        if cfg.get("mean") is not None:
            mean, std = _fit_channels(cfg["mean"], in_chans), _fit_channels(cfg["std"], in_chans)
    model = Normalized(net, mean, std, arch)
    if checkpoint:
        state = load_state_dict(checkpoint)
        if any(k.startswith("net.") for k in state) and "mean" in state:
            # one of our Normalized checkpoints: take its statistics too
            model.mean.copy_(state.pop("mean").view_as(model.mean))
            model.std.copy_(state.pop("std").view_as(model.std))
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        else:
            state = timm_filter(net, state)
        if headless:
            state = _drop_head(net, state)
        load_weights(net, state, str(checkpoint), reinit_head=reinit_head)
    return model


def text_model(arch: str, info: ModelInputs, pretrained: bool = False, checkpoint: Optional[str] = None,
               kwargs: Optional[dict] = None, reinit_head: bool = True, headless: bool = False) -> nn.Module:
    """A text model (src/models/text.py: lstm, bilstm, bert_*, gpt2_*, hf:<name>) for `info.num_classes` classes
    with `info.tokenizer`; `checkpoint` loads a weight file (its folder's tokenizer/ with it), re-initialising the
    head when the class count differs (refused for a teacher, `reinit_head=False`)."""
    model = build_text_model(arch, info, checkpoint=checkpoint, kwargs=kwargs, headless=headless)
    if checkpoint:
        load_weights(model, checkpoint_state(model, str(checkpoint), headless), str(checkpoint), reinit_head)
    return model


def _native_size(arch: str) -> Optional[int]:
    import timm

    try:
        return int(timm.models.get_pretrained_cfg(arch).input_size[-1])
    except Exception:  # no pretrained config (ours, or a name without one)
        return None


def _build_timm(arch: str, pretrained: bool, num_classes: int, in_chans: int, kwargs: dict, img_size) -> nn.Module:
    """timm.create_model; a model built for another resolution than the data's (DINOv2's 518 px for 224 px images,
    given as `arch@file`, which carries no kwargs) is built for the data's `image_size` when it takes `img_size`
    (ViTs: a fixed position table; timm otherwise asserts inside the forward), with one log line; models that
    take no `img_size` (CNNs) are built as they are."""
    import timm

    native = _native_size(arch) if arch not in nets.OUR_MODELS else None
    if img_size and "img_size" not in kwargs and native and native != int(img_size):
        try:
            net = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                    img_size=int(img_size), **kwargs)
            log.info("built %s for %d px inputs (dataset.image_size; its default is %d px)", arch, img_size, native)
            return net
        except TypeError:
            pass  # no img_size argument: built at its own resolution below
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UserError(f"model '{arch}' does not accept kwargs {sorted(kwargs)}: {e}") from e


# modality -> model class builder (a text model class adds its entry here)
_BUILDERS = {"image": image_model, "text": text_model}


def check_kwargs(arch: str, kwargs: dict, key: str = "kwargs") -> None:
    """Our small nets take `**_` (timm passes its own extras): a kwarg none of them names would be silently
    ignored, so it is refused here (timm's own classes raise TypeError, turned into one line by create_model)."""
    import inspect

    cls = _OUR_CLASSES().get(arch)
    if cls is None or not kwargs:
        return
    params = [n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "num_classes", "in_chans", "depth", "widen") and p.kind == p.POSITIONAL_OR_KEYWORD]
    bad = sorted(k for k in kwargs if k not in params)
    if bad:
        raise UserError(f"model '{arch}' has no argument {bad[0]}{closest(bad[0], params)} ({key}.{bad[0]}): "
                        f"remove it; '{arch}' takes {', '.join(params) or 'no kwargs'}")


def _OUR_CLASSES():  # noqa: N802
    return {"mlp": nets.MLP, "lenet": nets.LeNet, "resnet8": nets.CifarResNet, "resnet20": nets.CifarResNet,
            "resnet56": nets.CifarResNet, "wrn_16_1": nets.WideResNet, "wrn_16_2": nets.WideResNet,
            "wrn_40_2": nets.WideResNet}


def _fit_channels(v, c):
    v = list(v)
    if len(v) == c:
        return v
    return [sum(v) / len(v)] * c


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
