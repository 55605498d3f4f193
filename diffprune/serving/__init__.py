"""Multi-task serving: one base model, many sparse diffs (`MultiTaskModel`), one base per model family
side by side (`TaskRouter`), and an HTTP server (`diffprune.serving.server.create_app`, with
OpenAI-compatible endpoints for causal LMs in `openai_api`; needs the ``serve`` extra: fastapi + uvicorn)."""

from ..errors import InputError, TaskError, TaskExistsError, TaskTypeError, UnknownTaskError
from .multitask import MultiTaskModel
from .router import TaskRouter

__all__ = ["InputError", "MultiTaskModel", "TaskError", "TaskExistsError", "TaskRouter", "TaskTypeError", "UnknownTaskError"]
