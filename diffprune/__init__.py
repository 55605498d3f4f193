"""diffprune: parameter-efficient transfer learning by learning sparse, task-specific diffs."""

from .config import DiffPruningConfig
from .diff_file import SparseDiff
from .errors import BaseModelMismatchError, ConfigError, DiffFileError, DiffModeError, DiffPruneError
from .model import DiffModel
from .serving.multitask import MultiTaskModel

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "ConfigError",
    "DiffFileError",
    "DiffModeError",
    "DiffModel",
    "DiffPruneError",
    "DiffPruningConfig",
    "MultiTaskModel",
    "SparseDiff",
]
