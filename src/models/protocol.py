"""One model protocol (../shared/DESIGN.md, "Modalities and tasks"): what every model of the suite offers and all a
caller may use, so that nobody reaches into a wrapper's network. `factory.Normalized` (an image model behind its own
input normalisation) implements it; a text model (tokenising for itself) will implement the same members.

- inputs are raw: images in [0, 1] (later: text); the model prepares them itself (`normalize`);
- features are pooled pre-logits, so flips, fidelity, CKA, KL+DP and AFT need no modality-specific code;
- `normalize` / `denormalize` / `forward_normalized` expose the model's own input space (an image model's
  mean/std-normalised pixels), where input-gradient methods (transition curves) take their steps.

`ModelInputs` is what `create_model` reads from a dataset's description (`src.data.DatasetInfo`, a dataset config
node, `ImageInputs`): duck-typed, since models import nothing from data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class TransferModel(Protocol):
    """A classifier as the experiments see it: logits, features and stage outputs from raw inputs, its head, and
    its input space."""

    arch: str  # the architecture name it was built from (a timm name or one of ours)

    @property
    def num_features(self) -> int:
        """Width of `features`: the pooled pre-logits the classifier reads."""

    @property
    def num_classes(self) -> int:
        """Number of logits."""

    @property
    def classifier(self) -> nn.Module:
        """The head: the module mapping `features` to logits."""

    @property
    def pretrained_tag(self) -> str:
        """Tag of the hub weights it was built with ('' when none): part of a pretrained model's cache key."""

    @property
    def has_intermediates(self) -> bool:
        """Whether `intermediates` / `logits_and_intermediates` are available (stage outputs)."""

    def __call__(self, inputs: Any) -> torch.Tensor:
        """Logits (nn.Module's call: `forward` with hooks)."""

    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits of raw inputs."""

    def features(self, inputs: Any) -> torch.Tensor:
        """Pooled pre-logits (B, num_features)."""

    def features_and_logits(self, inputs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) in one pass."""

    def intermediates(self, inputs: Any) -> List[torch.Tensor]:
        """Stage outputs (UserError when the model has none)."""

    def logits_and_intermediates(self, inputs: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(logits, stage outputs) in one pass (UserError when the model has no stages)."""

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head with `num_classes` outputs (draws from the global RNG)."""

    def freeze_backbone(self) -> "TransferModel":
        """Linear probe: the network in eval mode with every parameter frozen except the classifier's."""

    def normalize(self, inputs: Any) -> torch.Tensor:
        """Raw inputs -> the model's own input space (what `forward_normalized` takes)."""

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: a point of the model's input space as a raw input."""

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of an input already in the model's own space: forward(x) == forward_normalized(normalize(x))."""


class ModelInputs(Protocol):
    """What `create_model` reads from a dataset's description; `modality` is optional (default 'image')."""

    num_classes: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]
    image_size: Optional[int]


@dataclass(frozen=True)
class ImageInputs:
    """A `ModelInputs` for callers without a dataset at hand (a checkpoint's meta, tests, benchmarks)."""

    num_classes: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]
    image_size: Optional[int] = None
    modality: str = "image"


@dataclass(frozen=True)
class TextInputs:
    """A `ModelInputs` of text: the class count and the tokenizer folder (a checkpoint's tokenizer/, a dataset's)."""

    num_classes: int
    tokenizer: str = ""
    channels: int = 0
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    image_size: Optional[int] = None
    modality: str = "text"
