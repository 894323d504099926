from .trainer import CheckpointDir, Trainer, build_optimizer, lr_lambda, seed_everything  # noqa: F401
from .evaluate import collect, predict  # noqa: F401
from .cache import OutputCache, digest, rows_by_id  # noqa: F401
from .trainer import RunLabels  # noqa: F401  (how a Trainer's errors name its caller's settings)
