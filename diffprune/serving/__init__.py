"""Multi-task serving: one base model, many sparse diffs (`MultiTaskModel`), and an HTTP server
(`diffprune.serving.server.create_app`, needs the ``serve`` extra: fastapi + uvicorn)."""

from .multitask import InputError, MultiTaskModel, TaskError, TaskExistsError, UnknownTaskError

__all__ = ["InputError", "MultiTaskModel", "TaskError", "TaskExistsError", "UnknownTaskError"]
