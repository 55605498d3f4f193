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


class RunError(DiffPruneError):
    """A run directory is missing, incomplete, or not a diffprune run."""


class MethodError(DiffPruneError):
    """A method cannot be built or loaded (e.g. a missing optional package)."""


class DataError(DiffPruneError, ValueError):
    """Bad task data: unknown task, missing file or column, bad label, bad encoding."""


class UsageError(DiffPruneError):
    """Bad command-line input: printed as one line, exit code 2."""


# ---- serving ---------------------------------------------------------------------------------------
class TaskError(DiffPruneError):
    """Base class of the errors about tasks of a `MultiTaskModel`."""


class UnknownTaskError(TaskError, LookupError):
    """The task is not loaded (never added, or removed)."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else "unknown task"


class TaskExistsError(TaskError, ValueError):
    """A task of that name is already loaded."""


class InputError(TaskError, ValueError):
    """Inputs that do not fit the task (e.g. single texts for a sentence-pair task)."""


class PromptTooLongError(InputError):
    """A prompt over the task's max_seq_length, or over the base's context with the tokens asked for."""


class TaskTypeError(InputError):
    """A call the task's type does not serve: predict on a generation task, generate on a classifier."""

    def __init__(self, message: str, task_type: str):
        super().__init__(message)
        self.task_type = task_type


class Overloaded(DiffPruneError):
    """The server's queue is full (HTTP 503 with Retry-After)."""
