from .factory import Normalized, create_model, freeze, load_weights  # noqa: F401
from .nets import OUR_MODELS  # noqa: F401
from .protocol import ImageInputs, ModelInputs, TransferModel  # noqa: F401
from .zoo import load_checkpoint, read_meta, save_checkpoint, zoo_dir  # noqa: F401
from .spec import ModelSpec  # noqa: F401
