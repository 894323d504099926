from .datasets import Dataset, DatasetInfo, Split, build_dataset, training_split  # noqa: F401
from .loaders import NoiseBatches, build_loader, resolve_device  # noqa: F401
from .text import TEXT_DATASETS  # noqa: F401,E402  (importing it registers the text datasets in BUILDERS)
from .dense import DENSE_BUILDERS  # noqa: F401,E402  (registers the segmentation / detection datasets)
