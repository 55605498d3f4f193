"""HTTP server for a `MultiTaskModel` (or a `router.TaskRouter` of several bases, one per model family):
FastAPI app factory `create_app` and the per-task batcher.

Classifier tasks answer ``POST /v1/tasks/{task}/predict``; generation tasks (causal LMs) answer the
OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (`openai_api`); ``/v1/tasks`` and
``/v1/models`` list every task of every base.

Requests for the same task that arrive together are batched: the batcher takes the task whose
oldest request has waited longest, waits at most `batch_wait_ms` after that request arrived for
more requests of the same task (or until `max_batch_size` inputs are queued), then runs them as one
forward on a single model thread. While a forward runs, new requests queue, so under load batches
grow without any added wait and task switches stay at most one per batch.

Bad input never reaches the model thread: unknown task -> 404, malformed JSON -> 400, wrong types
or empty list or texts/pairs not matching the task -> 422, body/count/text length over the limits
-> 413, queue full -> 503. A batch that fails is retried request by request, so one bad request
cannot fail its neighbours. (The OpenAI-compatible endpoints answer in OpenAI's error shape with
400 for a bad body: see `openai_api`.)

Generation requests go through the same queues and model thread, one prompt per entry: a batch is
the queued prompts of one task with equal token length and equal options (max tokens, temperature,
top_p, stop), run as one unpadded ``generate`` call; streamed and seeded requests run alone and do
not wait for company.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .._io import proc_bytes
from ..diff_file import CONFIG_FILE, DIFF_FILE
from ..errors import (
    BaseModelMismatchError, DiffFileError, DiffPruneError, InputError, Overloaded, TaskError, TaskExistsError,
    UnknownTaskError,
)
from .multitask import METRICS_FILE, MultiTaskModel
from .router import TaskRouter
from .schemas import AddTaskRequest, PredictRequest

log = logging.getLogger("diffprune.serve")


@dataclass
class ServerSettings:
    max_batch_size: int = 32
    """Most inputs in one forward (a single larger request runs in chunks of this size)."""
    batch_wait_ms: float = 5.0
    """Longest a request waits for others of the same task to join its batch."""
    max_inputs: int = 64
    """Most inputs in one request (more -> 413)."""
    max_text_chars: int = 20_000
    """Longest text, in characters (longer -> 413)."""
    max_body_bytes: int = 1 << 20
    """Largest request body (larger -> 413)."""
    max_queue: int = 4096
    """Most inputs waiting in the queue; beyond it requests get 503."""
    diff_root: str | None = None
    """Directory under which POST /v1/tasks may load run directories; None disables adding."""
    max_new_tokens: int = 512
    """Most tokens one completion may ask for (max_tokens over it -> 400)."""

    def validate(self) -> None:
        for name in ("max_batch_size", "max_inputs", "max_text_chars", "max_body_bytes", "max_queue", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise DiffPruneError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise DiffPruneError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


# ---- batching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationParams:
    """The options of one completion; requests batch together only when these (and the prompt length) are equal."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed}


class _Pending:
    __slots__ = ("task", "inputs", "future", "arrived", "pairs", "params", "streamer", "cancel", "key")

    def __init__(self, task: str, inputs: list, future: asyncio.Future, arrived: float,
                 params: GenerationParams | None = None, streamer=None, cancel: threading.Event | None = None):
        self.task, self.inputs, self.future, self.arrived = task, inputs, future, arrived
        self.params, self.streamer, self.cancel = params, streamer, cancel
        if params is None:  # predict: texts or pairs
            self.pairs = isinstance(inputs[0], list)
            self.key = None
        else:  # generate: one prompt (token ids)
            self.pairs = None
            # equal-length prompts with equal options share a `generate` call; seeded or streamed ones run alone
            alone = streamer is not None or params.seed is not None
            self.key = None if alone else (len(inputs[0]), params)

    def finish_stream(self) -> None:
        if self.streamer is not None:
            self.streamer.end()


class Batcher:
    """Queues per task; one model thread; see the module docstring for the policy.

    `model` is a `MultiTaskModel` or a `router.TaskRouter`. Predict requests (`submit`) batch as
    described above; generation requests (`enqueue_generation`, one prompt each) of a task batch with
    the queued ones of equal prompt length and options, up to `max_batch_size` prompts."""

    def __init__(self, model: MultiTaskModel | TaskRouter, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 max_queue: int = 4096):
        self.model = model
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queues: dict[str, deque[_Pending]] = {}
        self.queued_inputs = 0
        self.batches = 0
        self.requests = 0
        self.failed_batches = 0
        self.cancelled = 0
        self._last_trim = 0.0
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    # lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._runner is not None and self._loop is loop and not self._runner.done():
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffprune-model")
        self._runner = loop.create_task(self._run(), name="diffprune-batcher")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        for q in self.queues.values():
            for p in q:
                if not p.future.done():
                    p.future.set_exception(Overloaded("the server is shutting down"))
                p.finish_stream()
        self.queues.clear()
        self.queued_inputs = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def submit(self, task: str, inputs: list) -> list[dict]:
        self.start()
        if self.queued_inputs + len(inputs) > self.max_queue:
            raise Overloaded(f"the server is busy ({self.queued_inputs} inputs queued); retry later")
        loop = asyncio.get_running_loop()
        pending = _Pending(task, inputs, loop.create_future(), loop.time())
        self.queues.setdefault(task, deque()).append(pending)
        self.queued_inputs += len(inputs)
        self._wakeup.set()
        return await pending.future

    def enqueue_generation(self, task: str, prompt: list[int], params: GenerationParams, *, streamer=None,
                           cancel: threading.Event | None = None) -> asyncio.Future:
        """Queue one prompt (token ids) of generation task `task`; the future gives its result dict
        (`MultiTaskModel.generate`). Raises `Overloaded` when the queue is full. Cancelling the future
        (and setting `cancel`) drops a request that has not started; `cancel` stops a running one."""
        self.start()
        if self.queued_inputs + 1 > self.max_queue:
            raise Overloaded(f"the server is busy ({self.queued_inputs} inputs queued); retry later")
        loop = asyncio.get_running_loop()
        pending = _Pending(task, [prompt], loop.create_future(), loop.time(), params, streamer, cancel)
        self.queues.setdefault(task, deque()).append(pending)
        self.queued_inputs += 1
        self._wakeup.set()
        return pending.future

    async def submit_generation(self, task: str, prompt: list[int], params: GenerationParams, **kwargs) -> dict:
        return await self.enqueue_generation(task, prompt, params, **kwargs)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "failed_batches": self.failed_batches,
            "cancelled_generations": self.cancelled,
            "mean_requests_per_batch": self.requests / self.batches if self.batches else None,
            "queued_inputs": self.queued_inputs,
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.wait_s * 1000.0,
        }

    # policy
    def _queued(self, task: str) -> int:
        return sum(len(p.inputs) for p in self.queues.get(task, ()))

    def _pick(self) -> str | None:
        best, best_t = None, None
        for task, q in self.queues.items():
            if q and (best_t is None or q[0].arrived < best_t):
                best, best_t = task, q[0].arrived
        return best

    def _take(self, task: str) -> list[_Pending]:
        q = self.queues[task]
        batch = [q.popleft()]
        n = len(batch[0].inputs)
        if batch[0].params is None:
            while q and q[0].pairs == batch[0].pairs and n + len(q[0].inputs) <= self.max_batch_size:
                p = q.popleft()
                batch.append(p)
                n += len(p.inputs)
        elif batch[0].key is not None:  # every queued prompt of the same length and options, in order
            rest = deque()
            while q:
                p = q.popleft()
                if p.key == batch[0].key and n < self.max_batch_size and not p.future.done():
                    batch.append(p)
                    n += 1
                else:
                    rest.append(p)
            q = self.queues[task] = rest
        if not q:
            del self.queues[task]
        self.queued_inputs -= sum(len(p.inputs) for p in batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            task = self._pick()
            if task is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self.queues[task][0]
            # a streamed or seeded generation runs alone: nothing to wait for
            deadline = head.arrived + (0.0 if head.params is not None and head.key is None else self.wait_s)
            while self._queued(task) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [p for p in self._take(task) if not p.future.done()]
            if batch:
                await self._execute(loop, task, batch)

    async def _execute(self, loop, task: str, batch: list[_Pending]) -> None:
        inputs = [x for p in batch for x in p.inputs]
        generating = batch[0].params is not None
        try:
            if generating:
                results = await loop.run_in_executor(self._executor, self._generate, task, batch)
            else:
                results = await loop.run_in_executor(self._executor, self._predict, task, inputs)
        except Exception as e:  # isolate: retry one by one so a bad request fails alone
            self.failed_batches += 1
            if len(batch) > 1 and not isinstance(e, UnknownTaskError):
                for p in batch:
                    await self._execute(loop, task, [p])
                return
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
                p.finish_stream()
            return
        self.batches += 1
        self.requests += len(batch)
        start = 0
        for p in batch:
            n = len(p.inputs)
            if generating and results[start]["finish_reason"] == "cancelled":
                self.cancelled += 1
            if not p.future.done():
                p.future.set_result(results[start] if generating else results[start : start + n])
            start += n
        now = time.monotonic()
        if now - self._last_trim >= TRIM_INTERVAL_S:
            self._last_trim = now
            await loop.run_in_executor(self._executor, trim_heap)  # between batches, on the model thread

    def _predict(self, task: str, inputs: list) -> list[dict]:
        return self.model.predict(task, inputs, batch_size=self.max_batch_size)

    def _generate(self, task: str, batch: list[_Pending]) -> list[dict]:
        first = batch[0]
        return self.model.generate(task, [p.inputs[0] for p in batch], **first.params.kwargs(),
                                   streamer=first.streamer if len(batch) == 1 else None,
                                   cancel=first.cancel if len(batch) == 1 else None)


TRIM_INTERVAL_S = 2.0
"""How often (at most) the model thread hands freed heap memory back to the system."""


def _malloc_trim():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """glibc keeps the memory of freed tensors in its arenas: forwards of ever-changing batch shapes then grow
    the server's RSS without bound (measured: +7.5 MiB/min over a 10-minute soak, while the number of Python
    objects stayed constant); malloc_trim(0) returns it (the same loop with a trim every 50 requests stayed
    within 3 MiB). A no-op where there is no glibc."""
    if _TRIM is not None:
        _TRIM(0)


# ---- helpers ------------------------------------------------------------------------------------
def _error(status: int, detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, "malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers over Python's digit limit
        raise HTTPException(400, f"malformed JSON body: {e}") from None


def _validate(schema, data):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise HTTPException(422, json.loads(e.json(include_url=False, include_input=False))) from None


def _rss_bytes() -> int | None:
    return proc_bytes("/proc/self/status", "VmRSS")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_run_dir(root: str | os.PathLike, given: str) -> Path:
    """The real path of `given` (relative to `root` or absolute), refused unless it and the files
    that will be read resolve (symlinks, ``..``) inside `root`. Raises PermissionError / FileNotFoundError."""
    if "\x00" in given:
        raise PermissionError("run_dir contains a NUL byte")
    root_real = Path(os.path.realpath(root))
    candidate = Path(given)
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = Path(os.path.realpath(candidate))
    if not _inside(real, root_real):
        raise PermissionError(f"run_dir {given!r} is outside the allowed diff root")
    if not real.is_dir():
        raise FileNotFoundError(f"no run directory {given!r} under the diff root")
    for name in (DIFF_FILE, CONFIG_FILE, METRICS_FILE):
        f = real / name
        if (f.exists() or f.is_symlink()) and not _inside(Path(os.path.realpath(f)), root_real):
            raise PermissionError(f"{name} in run_dir {given!r} links outside the allowed diff root")
    return real


# ---- app ----------------------------------------------------------------------------------------
def create_app(model: MultiTaskModel | TaskRouter, settings: ServerSettings | None = None, **overrides) -> FastAPI:
    """The FastAPI app serving `model`: a `MultiTaskModel` or a `TaskRouter` of one base per family (see
    the module docstring); `overrides` set `ServerSettings` fields."""
    from .openai_api import error_body, is_openai_path, register_openai_routes

    settings = settings or ServerSettings()
    for k, v in overrides.items():
        if not hasattr(settings, k):
            raise TypeError(f"unknown server setting {k!r}")
        setattr(settings, k, v)
    settings.validate()
    given = model
    model = model if isinstance(model, TaskRouter) else TaskRouter([model])
    batcher = Batcher(model, settings.max_batch_size, settings.batch_wait_ms, settings.max_queue)
    diff_root = Path(os.path.realpath(settings.diff_root)) if settings.diff_root else None
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="diffprune serve",
        version=_version(),
        description="Many tasks on one base model: each task is a sparse diff plus a head (diff pruning).",
        lifespan=lifespan,
    )
    app.state.model = given
    app.state.router = model
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow lists only the first route of the path; list them all
            methods = set()
            for route in app.router.routes:
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= set(route.methods)
            headers["Allow"] = ", ".join(sorted(methods))
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        message = f"internal error: {type(exc).__name__}: {exc}"
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(500, message), status_code=500)
        return _error(500, message)

    @app.get("/health", summary="Liveness and a short status")
    async def health():
        return {
            "status": "ok",
            "tasks": len(model),
            "base_model": model.base_model_id,
            "active_task": model.active_task,
            "bases": model.bases(),
            "uptime_s": round(time.time() - started, 3),
        }

    @app.get("/v1/tasks", summary="Loaded tasks: labels, nnz, stored bytes, validation metrics")
    async def list_tasks():
        return {"tasks": model.describe()}

    @app.get("/v1/tasks/{task}", summary="One task", responses={404: {"description": "unknown task"}})
    async def get_task(task: str):
        try:
            return model.task_info(task)
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/v1/stats", summary="Batching, switching and memory counters")
    async def stats():
        return {
            "model": model.stats.to_dict(),
            "models": model.per_family_stats(),
            "batcher": batcher.stats(),
            "memory": model.memory_report(),
            "rss_bytes": _rss_bytes(),
            "settings": asdict(settings),
        }

    predict_body = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}
    }

    @app.post(
        "/v1/tasks/{task}/predict",
        summary="Predict with one task",
        openapi_extra=predict_body,
        responses={
            400: {"description": "malformed JSON"},
            404: {"description": "unknown task"},
            413: {"description": "body, input count or text length over the limits"},
            422: {"description": "wrong types, empty list, or texts/pairs not what the task takes"},
            503: {"description": "queue full"},
        },
    )
    async def predict(task: str, request: Request):
        """One result per input: `label`, `label_id`, `score` and `scores` (all labels) for
        classification, `value` for regression; `truncated` is true when an input was longer than
        the task's max_seq_length and was cut. A generation task answers 422 (it is served by
        /v1/completions and /v1/chat/completions)."""
        if task not in model:
            raise HTTPException(404, f"unknown task {task!r}; loaded tasks: {model.tasks()}")
        data = await _read_json(request, settings.max_body_bytes)
        if isinstance(data, dict) and isinstance(data.get("inputs"), list) and len(data["inputs"]) > settings.max_inputs:
            raise HTTPException(413, f"{len(data['inputs'])} inputs in one request; the limit is {settings.max_inputs}")
        body = _validate(PredictRequest, data)
        longest = max(len(s) for x in body.inputs for s in ([x] if isinstance(x, str) else x))
        if longest > settings.max_text_chars:
            raise HTTPException(413, f"a text of {longest} characters; the limit is {settings.max_text_chars}")
        try:
            model.split_inputs(task, body.inputs)
            results = await batcher.submit(task, body.inputs)
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        except Overloaded as e:
            raise HTTPException(503, str(e)) from None
        return {"task": task, "results": results}

    add_body = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": AddTaskRequest.model_json_schema()}}}
    }

    @app.post(
        "/v1/tasks",
        status_code=201,
        summary="Load a run directory (under --diff-root) as a new task",
        openapi_extra=add_body,
        responses={
            400: {"description": "malformed JSON"},
            403: {"description": "adding disabled, or path outside the diff root"},
            409: {"description": "a task of that name is loaded"},
            422: {"description": "bad body, not a run directory, or a diff for another base (with the reason)"},
        },
    )
    async def add_task(request: Request):
        data = await _read_json(request, 64 * 1024)
        body = _validate(AddTaskRequest, data)
        if diff_root is None:
            raise HTTPException(403, "adding tasks is disabled: start the server with --diff-root DIR")
        try:
            run_dir = resolve_run_dir(diff_root, body.run_dir)
        except PermissionError as e:
            raise HTTPException(403, str(e)) from None
        except (FileNotFoundError, OSError, ValueError) as e:
            raise HTTPException(422, str(e)) from None
        try:
            info = await run_in_threadpool(model.add_task, body.name, run_dir, run_dir=run_dir, replace=body.replace)
        except TaskExistsError as e:
            raise HTTPException(409, str(e)) from None
        except BaseModelMismatchError as e:
            raise HTTPException(422, f"refused: {e}") from None
        except (DiffFileError, TaskError) as e:
            raise HTTPException(422, str(e)) from None
        log.info("added task %s from %s", info["name"], run_dir)
        return JSONResponse(info, status_code=201)

    @app.delete("/v1/tasks/{task}", summary="Unload a task", responses={404: {"description": "unknown task"}})
    async def remove_task(task: str):
        try:
            await run_in_threadpool(model.remove_task, task)
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None
        log.info("removed task %s", task)
        return {"removed": task}

    register_openai_routes(app, model, batcher, settings)
    return app


def _version() -> str:
    from .. import __version__

    return __version__
