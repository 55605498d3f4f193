"""Request bodies of the HTTP server (pydantic v2). Strict: no coercion of numbers to strings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

Pair = tuple[StrictStr, StrictStr]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": ["a charming and often affecting journey"]}, {"inputs": [["A man sings.", "A person sings."]]}]
        },
    )

    inputs: list[StrictStr | Pair] = Field(
        ...,
        min_length=1,
        description='Texts (["a", ...]) or text pairs ([["a", "b"], ...]), one kind per request, as the task takes.',
    )

    @field_validator("inputs")
    @classmethod
    def _one_kind(cls, v: list) -> list:
        if len({isinstance(x, tuple) for x in v}) > 1:
            raise ValueError("inputs mix single texts and [text, text] pairs; send one kind per request")
        return [list(x) if isinstance(x, tuple) else x for x in v]


class AddTaskRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"run_dir": "rte", "name": "rte"}]}
    )

    run_dir: StrictStr = Field(..., min_length=1, description="Run directory, relative to --diff-root or absolute inside it.")
    name: StrictStr | None = Field(None, description="Task name; default: the diff's task name, else the directory name.")
    replace: StrictBool = Field(False, description="Replace a loaded task of the same name.")
