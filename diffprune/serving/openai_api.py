"""OpenAI-compatible endpoints for generation tasks (registered by `server.create_app`).

    GET  /v1/models               every loaded task as a model (``"generation": true`` marks the ones
                                  that generate; classifier tasks answer 400 on the endpoints below)
    GET  /v1/models/{model}
    POST /v1/completions          prompt (text, texts, or token ids) -> text
    POST /v1/chat/completions     messages -> assistant message

``model`` is the task name. Prompts are rendered as training rendered them (`diffprune.lmdata.render_prompt`:
the prompt tokenised; messages through the tokenizer's chat template, else diffprune's default one, with
the generation prompt). ``temperature`` 0 is greedy decoding (defaults as OpenAI's: 1.0, top_p 1.0,
max_tokens 16); ``stop`` up to 4 strings; ``seed`` makes sampling reproducible; ``n`` must be 1.
``stream: true`` answers with server-sent events in OpenAI's chunk format (``data: {...}`` lines, then
``data: [DONE]``; chat chunks carry a ``delta`` with the role first, then content pieces; the last chunk
has the ``finish_reason``; ``stream_options.include_usage`` adds a usage chunk). A client that
disconnects mid-stream stops its generation. Non-streamed answers carry ``usage``.

Batching: each prompt is queued on the server's batcher as a generation request; non-streamed prompts
of one task with the same token length and options that wait together run as one ``generate`` call
(no padding, so answers do not depend on what else was batched). Streamed or seeded requests run alone.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: an unknown model is
404; a bad body (malformed JSON, wrong types, unknown or unsupported fields, max_tokens <= 0 or over
the server's ``max_new_tokens``, a prompt over the task's ``max_seq_length`` tokens) is 400 naming the
field; a classifier task used for generation is 400 naming its type; a body over ``max_body_bytes`` is
413; a full queue is 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..errors import InputError, PromptTooLongError, TaskTypeError, UnknownTaskError
from .schemas import ChatCompletionRequest, CompletionRequest, _Generation, inline_schema

log = logging.getLogger("diffprune.serve")

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(status: int, message: str) -> dict:
    """OpenAI's error shape for an HTTP error raised outside these handlers (404 route, 405, 500)."""
    kind = "server_error" if status >= 500 else ("not_found_error" if status == 404 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _union_tag(part) -> bool:
    """Whether a pydantic error location entry names a union member ('str', 'list[int]', 'TextPart', ...)
    rather than a field or an index."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _validation_error(e: ValidationError) -> OpenAIError:
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"] if not _union_tag(x))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (this server does not support it; leave it out)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return OpenAIError(400, f"{loc}: {msg}{more}" if loc else f"{msg}{more}", param=loc or None)


def _now() -> int:
    return int(time.time())


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def register_openai_routes(app: FastAPI, router, batcher, settings) -> None:
    """Add the OpenAI-compatible routes to `app` (a `create_app` app: `router` a `TaskRouter`)."""
    from ..errors import Overloaded
    from .server import GenerationParams, _read_json

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    def model_card(info: dict) -> dict:
        return {
            "id": info["name"],
            "object": "model",
            "created": info.get("created") or 0,
            "owned_by": "diffprune",
            "task_type": info["task_type"],
            "family": info.get("family"),
            "generation": info["task_type"] == "generation",
            "base_model": info.get("base_model"),
            "max_seq_length": info.get("max_seq_length"),
        }

    @app.get("/v1/models", summary="OpenAI: every loaded task as a model (generation: true marks generating ones)")
    async def list_models():
        return {"object": "list", "data": [model_card(t) for t in router.describe()]}

    @app.get("/v1/models/{model_id}", summary="OpenAI: one task as a model", responses={404: {"description": "unknown"}})
    async def get_model(model_id: str):
        try:
            return model_card(router.task_info(model_id))
        except UnknownTaskError:
            raise _unknown(model_id) from None

    def _unknown(name: str) -> OpenAIError:
        return OpenAIError(404, f"the model {name!r} does not exist: it is not a loaded task; loaded tasks: "
                                f"{router.tasks()} (GET /v1/models)", param="model", code="model_not_found")

    async def parse(request: Request, schema: type[_Generation]) -> _Generation:
        try:
            data = await _read_json(request, settings.max_body_bytes)
        except HTTPException as e:
            raise OpenAIError(e.status_code, str(e.detail)) from None
        if not isinstance(data, dict):
            raise OpenAIError(400, f"the body must be a JSON object, got {type(data).__name__}")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if body.model not in router:
            raise _unknown(body.model)
        if not router.generates(body.model):
            info = router.task_info(body.model)
            raise OpenAIError(
                400, f"the model {body.model!r} is a {info['task_type']} task (a classifier): it does not generate "
                     f"text; use POST /v1/tasks/{body.model}/predict, or a generation task (GET /v1/models lists "
                     "them with \"generation\": true)", param="model", code="model_not_generative")
        found = body.unsupported()
        if found:
            raise OpenAIError(400, found[1], param=found[0], code="unsupported_parameter")
        return body

    def params_of(body: _Generation, max_tokens: int | None, field: str) -> GenerationParams:
        if max_tokens is None:
            max_tokens = 16
        if max_tokens < 1:
            raise OpenAIError(400, f"{field} must be at least 1, got {max_tokens}", param=field)
        if max_tokens > settings.max_new_tokens:
            raise OpenAIError(400, f"{field}={max_tokens} is over this server's limit of {settings.max_new_tokens} "
                                   "new tokens (diffprune serve --max-new-tokens)", param=field)
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        return GenerationParams(max_new_tokens=max_tokens, temperature=temperature,
                                top_p=1.0 if body.top_p is None else float(body.top_p),
                                stop=tuple(body.stop or ()), seed=body.seed)

    def check_chars(texts: list[str], field: str) -> None:
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise OpenAIError(400, f"a {field} text is not valid Unicode ({e.reason} at character {e.start}: "
                                       "a lone surrogate escape such as \\ud800)", param=field) from None
        longest = max((len(t) for t in texts), default=0)
        if longest > settings.max_text_chars:
            raise OpenAIError(400, f"a {field} text of {longest} characters; the limit is {settings.max_text_chars}",
                              param=field)

    async def render(task: str, field: str, **kwargs) -> list[int]:
        try:
            return await run_in_threadpool(router.render, task, **kwargs)
        except UnknownTaskError:
            raise _unknown(task) from None
        except InputError as e:
            raise OpenAIError(400, str(e), param=field) from None

    def check_prompt(task: str, ids: list[int], params: GenerationParams, field: str) -> None:
        try:
            router.check_prompt(task, ids, params.max_new_tokens)
        except UnknownTaskError:
            raise _unknown(task) from None
        except PromptTooLongError as e:
            raise OpenAIError(400, str(e), param=field, code="context_length_exceeded") from None
        except InputError as e:
            raise OpenAIError(400, str(e), param=field) from None

    async def run_all(task: str, prompts: list[list[int]], params: GenerationParams) -> list[dict]:
        try:
            futures = [batcher.enqueue_generation(task, ids, params) for ids in prompts]
        except Overloaded as e:
            raise OpenAIError(503, str(e), type="server_error", code="overloaded") from None
        try:
            return list(await asyncio.gather(*futures))
        except UnknownTaskError:
            raise _unknown(task) from None
        except TaskTypeError as e:
            raise OpenAIError(400, str(e), param="model") from None
        except InputError as e:
            raise OpenAIError(400, str(e)) from None
        except Overloaded as e:
            raise OpenAIError(503, str(e), type="server_error", code="overloaded") from None
        finally:
            for f in futures:
                f.cancel()  # a no-op for finished ones; drops queued ones of a failed request

    def usage(results: list[dict]) -> dict:
        p = sum(r["prompt_tokens"] for r in results)
        c = sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish_reason(r: dict) -> str:
        return "length" if r["finish_reason"] == "length" else "stop"

    def stream(task: str, ids: list[int], params: GenerationParams, include_usage: bool, chat: bool) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        try:
            streamer = router.streamer(task, stop=params.stop,
                                       callback=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        except UnknownTaskError:
            raise _unknown(task) from None
        try:
            future = batcher.enqueue_generation(task, ids, params, streamer=streamer, cancel=cancel)
        except Overloaded as e:
            raise OpenAIError(503, str(e), type="server_error", code="overloaded") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = _now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": task, "choices": [choice]}

        async def events():
            done = False
            getter = None
            try:
                if chat:
                    yield _sse(chunk("", role=True))
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    finished, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in finished:  # the request ended without ending its stream (an error)
                        getter.cancel()
                        break
                    piece = getter.result()
                    if piece is None:
                        break
                    yield _sse(chunk(piece))
                try:
                    result = await future
                except Exception as e:  # the status line is sent: report in the stream
                    err = e if isinstance(e, OpenAIError) else OpenAIError(
                        503 if isinstance(e, Overloaded) else (400 if isinstance(e, InputError) else 500), str(e),
                        type="invalid_request_error" if isinstance(e, InputError) else "server_error")
                    if not isinstance(e, (InputError, Overloaded)):
                        log.exception("generation failed for task %s", task)
                    yield _sse(err.body())
                    yield "data: [DONE]\n\n"
                    done = True
                    return
                yield _sse(chunk(None if chat else "", finish=finish_reason(result)))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": task, "choices": [],
                                "usage": usage([result])})
                yield "data: [DONE]\n\n"
                done = True
            finally:
                if getter is not None and not getter.done():
                    getter.cancel()
                if not done:  # the client went away (or the server stops): stop generating for it
                    cancel.set()
                    future.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(
        "/v1/completions",
        summary="OpenAI: complete a prompt with a generation task",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": inline_schema(CompletionRequest)}}}},
        responses={400: {"description": "bad body, or not a generation task"}, 404: {"description": "unknown model"},
                   413: {"description": "body too large"}, 503: {"description": "queue full"}},
    )
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)  # type: ignore[assignment]
        task = body.model
        params = params_of(body, body.max_tokens, "max_tokens")
        prompt = body.prompt
        if isinstance(prompt, str):
            texts, id_prompts = [prompt], None
        elif prompt and all(isinstance(x, int) for x in prompt):
            texts, id_prompts = None, [list(prompt)]
        elif prompt and all(isinstance(x, list) for x in prompt):
            texts, id_prompts = None, [list(x) for x in prompt]
        else:
            texts, id_prompts = list(prompt), None
        count = len(texts if texts is not None else id_prompts)
        if count == 0:
            raise OpenAIError(400, "prompt: give a text, a non-empty list of texts, or token ids", param="prompt")
        if count > settings.max_inputs:
            raise OpenAIError(400, f"{count} prompts in one request; the limit is {settings.max_inputs}", param="prompt")
        if texts is not None:
            check_chars(texts, "prompt")
            prompts = [await render(task, "prompt", prompt=t) for t in texts]
        else:
            prompts = id_prompts
        for ids in prompts:
            check_prompt(task, ids, params, "prompt")
        if body.stream:
            if len(prompts) != 1:
                raise OpenAIError(400, f"stream=true takes one prompt, got {len(prompts)}: send one request per prompt",
                                  param="prompt")
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(task, prompts[0], params, include, chat=False)
        results = await run_all(task, prompts, params)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": _now(),
            "model": task,
            "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": finish_reason(r)}
                        for i, r in enumerate(results)],
            "usage": usage(results),
        }

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI: answer a conversation with a generation task",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": inline_schema(ChatCompletionRequest)}}}},
        responses={400: {"description": "bad body, or not a generation task"}, 404: {"description": "unknown model"},
                   413: {"description": "body too large"}, 503: {"description": "queue full"}},
    )
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)  # type: ignore[assignment]
        task = body.model
        if body.max_completion_tokens is not None:
            params = params_of(body, body.max_completion_tokens, "max_completion_tokens")
        else:
            params = params_of(body, body.max_tokens, "max_tokens")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_chars([m["content"] for m in messages], "messages")
        ids = await render(task, "messages", messages=messages)
        check_prompt(task, ids, params, "messages")
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(task, ids, params, include, chat=True)
        (result,) = await run_all(task, [ids], params)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": _now(),
            "model": task,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage([result]),
        }
