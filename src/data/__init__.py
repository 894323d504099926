from .datasets import Dataset, DatasetInfo, Split, build_dataset, training_split  # noqa: F401
from .loaders import build_loader, resolve_device  # noqa: F401
