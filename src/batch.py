"""The one batch every loader yields and every method opens by name (../shared/DESIGN.md, "Modalities and tasks").

- `inputs`: what the models read: a float image tensor (N, C, H, W) in [0, 1], a dict of tensors (text:
  input_ids / attention_mask), a list (detection: one image per sample) or any tensor (zero-shot: the z batch);
- `targets`: labels (N,) int64, masks, per-image dicts ({boxes, labels}), or None (no targets);
- `ids`: int64 (N,) sample ids within their split, the key of the output caches and of per-sample statistics
  (None where the samples have none, e.g. generated inputs);
- `extra`: anything else a method needs from its loader (zero-shot: `phase`, `pseudo_batch`).

The engine never opens a batch: it hands it to the method. A Batch is deliberately not a tuple (no iteration, no
indexing), so code that still unpacks `(x, y, index)` fails at once instead of reading the wrong field.
`torch.nn.parallel.DistributedDataParallel` passes it to the method's forward unchanged (its input mover does not
descend into dataclasses: loaders deliver batches on the device already, `to` moves one explicitly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


def move(obj: Any, device, non_blocking: bool = False) -> Any:
    """`obj` with every tensor in it (through dicts, lists and tuples) moved to `device`; other values as they are."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return type(obj)((k, move(v, device, non_blocking)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device, non_blocking) for v in obj)
    return obj


def is_image(inputs: Any) -> bool:
    """Whether `inputs` are float images: one 4-D floating-point tensor (N, C, H, W), what mixing can blend."""
    return torch.is_tensor(inputs) and inputs.ndim == 4 and inputs.is_floating_point()


def _leading(obj: Any) -> int:
    """Samples in `inputs` without ids: a tensor's first dimension, a dict's first value's, a list's length."""
    if torch.is_tensor(obj):
        return int(obj.shape[0]) if obj.ndim else 1
    if isinstance(obj, dict):
        return _leading(next(iter(obj.values()))) if obj else 0
    return len(obj)


@dataclass(eq=False)
class Batch:
    """One batch: `inputs`, `targets`, `ids` (see the module docstring) and `extra`. Opened by name only."""

    inputs: Any
    targets: Any = None
    ids: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A Batch with every tensor of inputs, targets, ids and extra (nested in dicts / lists) on `device`."""
        return Batch(move(self.inputs, device, non_blocking), move(self.targets, device, non_blocking),
                     move(self.ids, device, non_blocking), move(self.extra, device, non_blocking))

    def __len__(self) -> int:
        """The number of samples: len(ids) (without ids: the inputs' leading size)."""
        return int(self.ids.shape[0]) if self.ids is not None else _leading(self.inputs)

    @property
    def is_image(self) -> bool:
        """Whether the inputs are float images (N, C, H, W): the inputs mixup and synthetic rows apply to."""
        return is_image(self.inputs)
