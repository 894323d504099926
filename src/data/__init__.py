from .datasets import Dataset, DatasetInfo, Split, build_dataset, training_split  # noqa: F401
from .loaders import NoiseBatches, build_loader, resolve_device  # noqa: F401
from .dense import DENSE_BUILDERS  # noqa: F401,E402  (importing it registers the segmentation / detection datasets in BUILDERS)
