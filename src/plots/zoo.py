"""Figures of the zoo (`main_pretrain.py`): a class-conditional generator's samples, one row per class with the
class name at the row's left."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import image_grid


def class_rows(images, class_names: Sequence[str], per_class: int, path, title: str = "") -> Path:
    """`images`: N x C x H x W in [0, 1], `per_class` consecutive images per class in class order."""
    rows = len(images) // per_class
    names = [str(class_names[k]) if k < len(class_names) else str(k) for k in range(rows)]
    return image_grid(images, rows, per_class, path, title=title, row_labels=names)
