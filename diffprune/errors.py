"""Exceptions raised by diffprune. Every message names the cause and the fix."""


class DiffPruneError(Exception):
    """Base class of every diffprune error."""


class ConfigError(DiffPruneError, ValueError):
    """A configuration value is out of range or inconsistent."""


class DiffFileError(DiffPruneError):
    """A diff file is missing, truncated, corrupted or of an unknown format."""


class BaseModelMismatchError(DiffPruneError):
    """A diff was applied to (or loaded onto) a model other than the base it was trained from."""


class DiffModeError(DiffPruneError, RuntimeError):
    """An operation was asked of a DiffModel in the wrong stage (e.g. saving before projection)."""


class TrainError(DiffPruneError):
    """Training cannot start or continue (output directory, checkpoint, settings, memory)."""
