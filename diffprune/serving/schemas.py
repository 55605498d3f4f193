"""Request bodies of the HTTP server (pydantic v2). Strict: no coercion of numbers to strings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

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


# ---- OpenAI-compatible requests (diffprune.serving.openai_api) --------------------------------------
# Strict as the rest: unknown fields are refused (as OpenAI's API does) and so are options this server
# does not implement, unless they are at their neutral value (n=1, penalties 0, no logprobs, ...).
Prob = Annotated[StrictFloat, Field(gt=0, le=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(..., min_length=1, description="The task name (GET /v1/models lists them).")
    max_tokens: StrictInt | None = Field(16, description="Most tokens to generate (the server caps it).")
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = Field(1.0, description="0: greedy decoding; > 0: sampling.")
    top_p: Prob | None = Field(1.0, description="Nucleus sampling mass (with temperature > 0).")
    n: StrictInt | None = Field(1, description="Completions per prompt: only 1 is supported.")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="Up to 4 strings that end the completion (not included).")
    stream: StrictBool | None = Field(False, description="Server-sent events, OpenAI's chunk format.")
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64, description="Makes sampling reproducible.")
    user: StrictStr | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) of the first option set to something this server does not do."""
        if self.n not in (None, 1):
            return "n", f"n={self.n} is not supported: this server returns one choice per prompt (n=1)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported (leave it out, or 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported (leave it out)"
        return None


class CompletionRequest(_Generation):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "my-task", "prompt": "question: is fire cold? answer:",
                                                          "max_tokens": 8, "temperature": 0}]}
    )

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="A text, a list of texts (one choice each), or token ids."
    )
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self):
        found = super().unsupported()
        if found:
            return found
        if self.echo:
            return "echo", "echo is not supported (leave it out, or false)"
        if self.logprobs is not None:
            return "logprobs", "logprobs is not supported (leave it out)"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported (leave it out, or 1)"
        if self.suffix:
            return "suffix", "suffix is not supported (leave it out)"
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None
    # what a client echoes back from an earlier answer's message: accepted when empty
    refusal: None = None
    tool_calls: None = None
    function_call: None = None
    annotations: list[None] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "my-task", "messages": [{"role": "user", "content": "hello"}],
                                                          "max_tokens": 8, "temperature": 0}]}
    )

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    max_completion_tokens: StrictInt | None = Field(None, description="Most tokens to generate (over max_tokens).")
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def unsupported(self):
        found = super().unsupported()
        if found:
            return found
        if self.logprobs or self.top_logprobs is not None:
            return "logprobs", "logprobs is not supported (leave it out, or false)"
        return None


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its ``$defs`` substituted in place, for an ``openapi_extra`` request
    body (a ``#/$defs/...`` reference would point at the root of the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                merged = {**defs[ref[len("#/$defs/"):]], **{k: v for k, v in node.items() if k != "$ref"}}
                return resolve(merged)
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
