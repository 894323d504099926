from .base import CrossEntropy, FrozenOutputs, Method  # noqa: F401
