"""The HTTP API of `kubetune serve`: OpenAI's completions, chat completions and models, vLLM's
runtime LoRA endpoints, health, readiness and Prometheus metrics.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status,
as vLLM answers. Generation runs in worker threads; the engine serialises it.

Everything a client sends is bounded before it costs anything (`Guard`, `Limits`): the API key is
checked before the body is read (401/403, see `access`), the body is capped (413, on Content-Length
and while reading a chunked body), the sequences of one request (prompts x n) are capped (400), a
non-streaming request whose client left stops at its next token, and adapter loads run in their own
bounded pool with a deadline (429, 504, see `loads`). Refused adapter sources all get one message
(404, see `sources`); adapter content that can never load gets 422, never 500. `/health` is 503 when
the engine is wedged (no progress for `stall_timeout`), whatever the number of loads in flight.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from kubetune.logs import log

from .access import Access
from .adapters_file import AdaptersFileSync
from .engine import Engine, EngineError, Generation, Pending, Sampling
from .loads import BUSY_RETRY_AFTER_S, Loads
from .metrics import ServingMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .sources import SourceRefused

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25
CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never seen by a client
ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/models": "models",
    "/v1/load_lora_adapter": "load_lora_adapter",
    "/v1/unload_lora_adapter": "unload_lora_adapter",
}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1024 * 1024
    max_sequences: int = 16  # prompts x n in one request
    stall_timeout: float = 120.0  # seconds without progress before /health calls the engine wedged


class Startup:
    """Readiness: the base model, every adapter named on the command line (each one must load), then
    the adapters file, if any (an adapter it lists that fails to load is reported, not fatal)."""

    def __init__(
        self,
        engine: Engine,
        adapters: list[tuple[str, str]],
        metrics: ServingMetrics,
        adapters_file: AdaptersFileSync | None = None,
    ):
        self.engine, self.adapters, self.metrics, self.adapters_file = engine, adapters, metrics, adapters_file
        self.ready = False
        self.error: str | None = None
        self.public_error: str | None = None

    def run(self) -> None:
        try:
            started = time.monotonic()
            self.engine.load_base()
            log(
                "model_loaded",
                model=self.engine.served_name,
                uri=self.engine.model_uri,
                device=str(self.engine.device),
                seconds=round(time.monotonic() - started, 2),
            )
            for name, uri in self.adapters:
                self.engine.load_adapter(name, uri)
                self.metrics.loaded(self.engine.adapters())
                log("adapter_loaded", name=name, uri=uri)
        except Exception as error:
            # the log has the whole story; /health, open to anyone, names no file of this machine
            detail = getattr(error, "detail", None) or (error.message if isinstance(error, EngineError) else None)
            self.error = detail or f"{type(error).__name__}: {error}"
            self.public_error = (
                error.message if isinstance(error, EngineError) else f"{type(error).__name__}; the server log says why"
            )
            log("startup_failed", error=self.error)
            raise
        if self.adapters_file is not None:
            self.adapters_file.sync_once()
        self.ready = True
        self.metrics.ready.set(1)
        log("ready", model=self.engine.served_name, adapters=[a.name for a in self.engine.adapters()])

    def state(self) -> dict:
        """The body of /health: what is loaded, and what the adapters file asked for but did not get."""
        body: dict = {"status": "ready" if self.ready else ("failed" if self.error else "loading")}
        if self.error:
            body["message"] = self.public_error
        if self.ready:
            body.update(model=self.engine.served_name, adapters=[a.name for a in self.engine.adapters()])
        if self.adapters_file is not None and (self.adapters_file.failed or self.adapters_file.error):
            body["adaptersFile"] = {"failed": dict(self.adapters_file.failed), "error": self.adapters_file.error}
        return body


def error_body(message: str, type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def error_response(error: EngineError) -> JSONResponse:
    headers = {"Retry-After": str(BUSY_RETRY_AFTER_S)} if error.status == 429 else None
    return JSONResponse(
        error_body(error.message, error.type, error.status, error.param), status_code=error.status, headers=headers
    )


def endpoint_label(path: str) -> str:
    """A metrics label for a path: a known endpoint or "other" (a client picks paths, not labels)."""
    if path.startswith("/v1/models/"):
        return "models"
    return ENDPOINTS.get(path, "other")


class Guard:
    """ASGI middleware in front of every route: the API key, then the body size.

    The key is checked before any byte of the body is read. The body is read here, whole and capped
    (a declared Content-Length over the cap is refused before reading, a chunked body as soon as it
    passes the cap), then handed to the app; what the client sends later (its disconnect) passes through.
    """

    KINDS = {401: "AuthenticationError", 403: "PermissionDeniedError", 413: "RequestTooLargeError"}

    def __init__(self, app, access: Access, max_bytes: int, metrics: ServingMetrics):
        self.app, self.access, self.max_bytes, self.metrics = app, access, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.access.problem(scope["path"], headers.get("authorization"))
        if refusal is not None:
            return await self._refuse(scope, send, *refusal)
        declared = headers.get("content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, send, 413, self._too_large())
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send, 413, self._too_large())
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (--max-request-bytes)"

    async def _refuse(self, scope, send, status: int, message: str) -> None:
        self.metrics.request(endpoint_label(scope["path"]), "unknown", status, 0.0)
        payload = json.dumps(error_body(message, self.KINDS.get(status, "BadRequestError"), status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class _Measured:
    """Counts one request in the metrics when it ends (a stream counts itself when it ends)."""

    def __init__(self, metrics: ServingMetrics, engine: Engine, endpoint: str, model: str | None):
        self.metrics, self.engine, self.endpoint, self.model = metrics, engine, endpoint, model
        self.started = time.monotonic()
        self.streaming = False

    def label(self) -> str:
        """The model, when it is one served: unknown names would make a series each."""
        if self.model is None:
            return ""
        return self.model if self.engine.has_model(self.model) else "unknown"

    def done(self, status: int) -> None:
        self.metrics.request(self.endpoint, self.label(), status, time.monotonic() - self.started)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            if not self.streaming:
                self.done(200)
        else:
            self.done(error.status if isinstance(error, EngineError) else 500)
        return False


def create_app(
    engine: Engine,
    metrics: ServingMetrics,
    startup: Startup,
    *,
    access: Access | None = None,
    loads: Loads | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The API. `access` defaults to no keys (admin endpoints refused), `loads` to a pool with no
    allowed source (every runtime load refused), `limits` to the defaults of the CLI."""
    access = access or Access()
    loads = loads or Loads(engine, allowed=())
    limits = limits or Limits()
    app = FastAPI(title="kubetune serve", description="OpenAI-compatible serving of a base model and LoRA adapters.")
    app.add_middleware(Guard, access=access, max_bytes=limits.max_request_bytes, metrics=metrics)
    metrics.loads_in_flight.set_function(lambda: loads.running)
    metrics.requests_in_flight.set_function(lambda: engine.in_flight)

    def measured(endpoint: str, model: str | None) -> _Measured:
        return _Measured(metrics, engine, endpoint, model)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in problems)
        param = ".".join(str(p) for p in problems[0]["loc"][1:]) if problems else None
        metrics.request(request.url.path.removeprefix("/v1/").replace("/", "_"), "unknown", 400, 0.0)
        return JSONResponse(error_body(message or "invalid request", "BadRequestError", 400, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(error.status_code, "BadRequestError")
        return JSONResponse(error_body(str(error.detail), kind, error.status_code), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        # the details (which may name files) go to the log only
        log("internal_error", path=request.url.path, error=f"{type(error).__name__}: {error}")
        return JSONResponse(
            error_body("internal error; the server log has the details", "InternalServerError", 500), status_code=500
        )

    # --- probes and metrics ------------------------------------------------------------------------

    @app.get("/live")
    async def live():
        """Liveness: the process answers (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/health")
    @app.get("/ready")
    async def health():
        """Readiness: 200 only once the base model and every startup adapter are loaded (those of
        the command line and of the adapters file), so no request reaches a replica that lacks one;
        503 again when the engine is wedged. Adapter loads in flight do not count: they never hold
        the engine for long."""
        state = startup.state()
        stalled = engine.stalled_for()
        if startup.ready and stalled > limits.stall_timeout:
            state.update(status="wedged", message=f"the engine has made no progress for {stalled:.0f}s")
            return JSONResponse(state, status_code=503)
        return JSONResponse(state, status_code=200 if startup.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- models and adapters ----------------------------------------------------------------------

    def cards() -> list[dict]:
        engine.check_model(engine.served_name)  # 503 while the base model loads
        base = {
            "id": engine.served_name,
            "object": "model",
            "created": engine.created,
            "owned_by": "kubetune",
            "root": engine.model_uri,
            "parent": None,
            "max_model_len": engine.max_model_len,
            "permission": [],
        }
        adapters = [
            {
                "id": a.name,
                "object": "model",
                "created": a.created,
                "owned_by": "kubetune",
                "root": a.uri,
                "parent": engine.served_name,
                "max_model_len": engine.max_model_len,
                "permission": [],
                "sha256": a.sha256,
                "batching": a.grouping,
            }  # beyond OpenAI's card: what each replica serves (the operator reports it) and how
            for a in engine.adapters()
        ]
        return [base, *adapters]

    @app.get("/v1/models")
    def list_models():
        with measured("models", None):
            return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model:path}")
    def get_model(model: str):
        with measured("models", model):
            for card in cards():
                if card["id"] == model:
                    return card
            raise EngineError(f"The model `{model}` does not exist.", 404, "NotFoundError")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        """Load an adapter from an allowed source, in the load pool (see `loads`). Loading a name
        again from the same source changes nothing (200); `load_inplace` over an adapter being
        served is refused (409): unload it first, so no request is answered by half of a swap."""
        name, uri = body.lora_name, body.lora_path
        with measured("load_lora_adapter", name):
            try:
                if body.load_inplace and name != engine.served_name and engine.has_model(name):
                    raise EngineError(
                        f"the lora adapter '{name[:256]}' is being served; unload it, then load it again",
                        409,
                        "ConflictError",
                        reason="conflict",
                    )
                await loads.load(name, uri)
            except EngineError as error:
                _load_failed(metrics, error, name, uri)
                raise
            except Exception:
                metrics.load_failed("error")
                raise
            metrics.loaded(engine.adapters())
            log("adapter_loaded", name=name, uri=uri)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        with measured("unload_lora_adapter", body.lora_name) as call:
            engine.unload_adapter(body.lora_name)
            call.model = None  # gone now: counted as "unknown" like any name not served
            metrics.forget(body.lora_name or "")
            metrics.loaded(engine.adapters())
            log("adapter_unloaded", name=body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # --- generation -------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = body.model or engine.served_name
        with measured("completions", model) as call:
            engine.check_model(model)
            if body.echo or body.logprobs:
                raise EngineError("echo and logprobs are not supported by the builtin runtime")
            check_sequences(_prompt_count(body.prompt), body.n, limits.max_sequences)
            prompts = await anyio.to_thread.run_sync(_prompt_ids, engine, body.prompt)
            max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
            for ids in prompts:
                engine.check_length(len(ids), max_tokens)
            jobs = [
                (i * body.n + j, ids, _sampling(body, max_tokens, j))
                for i, ids in enumerate(prompts)
                for j in range(body.n)
            ]
            reply = _Reply("cmpl", "text_completion", model, sum(map(len, prompts)))
            if body.stream:
                call.streaming = True
                return _stream(engine, metrics, call, jobs, reply.completion_chunk, reply, _usage_wanted(body))
            results = await _generate_all(request, engine, model, jobs)
            _count_tokens(metrics, call, reply, [g for _, g in results])
            return reply.body(
                [
                    {
                        "index": i,
                        "text": g.text,
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": None,
                    }
                    for i, g in results
                ],
                [g for _, g in results],
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = body.model or engine.served_name
        with measured("chat_completions", model) as call:
            engine.check_model(model)
            if body.logprobs:
                raise EngineError("logprobs are not supported by the builtin runtime")
            check_sequences(1, body.n, limits.max_sequences)
            messages = [_message(m) for m in body.messages]
            ids = await anyio.to_thread.run_sync(engine.encode_chat, messages, body.add_generation_prompt)
            max_tokens = body.max_completion_tokens or body.max_tokens or max(1, (engine.max_model_len or 0) - len(ids))
            engine.check_length(len(ids), max_tokens)
            jobs = [(j, ids, _sampling(body, max_tokens, j)) for j in range(body.n)]
            reply = _Reply("chatcmpl", "chat.completion", model, len(ids))
            if body.stream:
                call.streaming = True
                return _stream(engine, metrics, call, jobs, reply.chat_chunk, reply, _usage_wanted(body))
            results = await _generate_all(request, engine, model, jobs)
            _count_tokens(metrics, call, reply, [g for _, g in results])
            return reply.body(
                [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": g.text},
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": None,
                    }
                    for i, g in results
                ],
                [g for _, g in results],
            )

    return app


# --- helpers ---------------------------------------------------------------------------------------


def _load_failed(metrics: ServingMetrics, error: EngineError, name: str, uri: str) -> None:
    """Count and log a refused load. The log has the details a client is not told (a refused source's
    real cause); the metrics have a fixed reason, never the name or the path."""
    if error.status == 503:  # the base model still loading: not a refusal
        return
    reason = error.reason or _REASONS.get(error.status, "invalid" if error.status < 500 else "error")
    metrics.load_failed(reason)
    detail = error.detail if isinstance(error, SourceRefused) else error.message
    log("adapter_load_failed", name=name[:256], uri=uri[:512], status=error.status, reason=reason, error=detail)


_REASONS = {404: "not_allowed", 409: "conflict", 429: "busy", 504: "timeout"}


class ClientGone(EngineError):
    def __init__(self) -> None:
        super().__init__("the client closed the request", CLIENT_GONE, "ClientClosedRequest")


def check_sequences(prompts: int, n: int, most: int) -> None:
    """Every prompt is generated n times: the product is the work a request asks for."""
    if prompts * n > most:
        raise EngineError(
            f"{prompts} prompts x n={n} asks for {prompts * n} sequences; this server generates at most "
            f"{most} per request (--max-sequences-per-request): send fewer prompts or a smaller n",
            param="n",
        )


def _prompt_count(prompt) -> int:
    """How many prompts `prompt` holds, before anything is tokenized: a string or a list of token
    ids is one, a list of strings or of token lists is one each."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _start_all(
    engine: Engine, model: str, jobs: list, cancel: threading.Event, on_text: Callable | None = None
) -> list[tuple[int, Pending]]:
    """Queue every job of a request (they are batched together); if one is refused (the queue is
    full), those already queued are told to stop and the refusal is raised."""
    pending = []
    try:
        for index, ids, sampling in jobs:
            text = None if on_text is None else functools.partial(on_text, index)
            pending.append((index, engine.start(model, ids, sampling, cancelled=cancel.is_set, on_text=text)))
    except BaseException:
        cancel.set()
        raise
    return pending


async def _generate_all(request: Request, engine: Engine, model: str, jobs: list) -> list[tuple[int, Generation]]:
    """Generate `jobs` (batched together) from a worker thread, stopping at the next token when the
    client disconnects (a non-streaming client that left must not keep the engine busy)."""
    cancel = threading.Event()
    done = threading.Event()

    def work() -> list[tuple[int, Generation]]:
        try:
            pending = _start_all(engine, model, jobs, cancel)
            return [(index, job.result()) for index, job in pending]
        finally:
            done.set()

    async def watch() -> None:
        while not done.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await anyio.sleep(DISCONNECT_POLL_S)

    failure: Exception | None = None
    results: list[tuple[int, Generation]] = []
    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            results = await anyio.to_thread.run_sync(work)
        except Exception as error:  # raised below, outside the task group, which would wrap it in a group
            failure = error
        finally:
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if cancel.is_set():
        log("request_cancelled", model=model, reason="client disconnected")
        raise ClientGone()
    return results


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [engine.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [engine.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not ids for ids in prompts):
        raise EngineError("prompt must not be empty")
    vocabulary = len(engine.tokenizer)
    if any(not 0 <= token < vocabulary for ids in prompts for token in ids):
        raise EngineError(f"prompt token ids must be between 0 and {vocabulary - 1}")
    return prompts


def _message(message) -> dict:
    """A chat message for the template: content parts of type text joined, other fields kept."""
    fields = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        kinds = {part.get("type") for part in content}
        if kinds - {"text"}:
            raise EngineError(f"only text content is supported by the builtin runtime, not {sorted(kinds - {'text'})}")
        content = "\n".join(str(part.get("text", "")) for part in content)
    fields["content"] = content or ""
    return fields


def _sampling(body, max_tokens: int, sample: int) -> Sampling:
    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=body.top_p or 1.0,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        stop=body.stop_list(),
        seed=None if body.seed is None else body.seed + sample,  # n samples from one seed differ
        ignore_eos=bool(body.ignore_eos),
    )


def _usage_wanted(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage(prompt: int, generations: list[Generation]) -> dict:
    """Usage as OpenAI counts it: each prompt once, however many choices it has."""
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count_tokens(metrics: ServingMetrics, call: _Measured, reply: _Reply, generations: list[Generation]) -> None:
    usage = _usage(reply.prompt_tokens, generations)
    metrics.tokens(call.label(), usage["prompt_tokens"], usage["completion_tokens"])
    for generation in generations:
        metrics.timings(call.label(), generation.queued_seconds, generation.first_token_seconds)


class _Reply:
    """The id, timestamps and shapes shared by a response and its stream chunks."""

    def __init__(self, prefix: str, kind: str, model: str, prompt_tokens: int):
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, choices: list[dict], generations: list[Generation]) -> dict:
        return {**self._head(self.kind), "choices": choices, "usage": _usage(self.prompt_tokens, generations)}

    def completion_chunk(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def chat_chunk(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        delta = (
            {"role": "assistant", "content": ""}
            if text is None and finish_reason is None
            else ({"content": text} if text is not None else {})
        )
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, generations: list[Generation]) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._head(kind), "choices": [], "usage": _usage(self.prompt_tokens, generations)}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _stream(
    engine: Engine,
    metrics: ServingMetrics,
    call: _Measured,
    jobs: list,
    chunk: Callable,
    reply: _Reply,
    include_usage: bool,
) -> StreamingResponse:
    """Server-sent events: each piece of text as it is generated, then `data: [DONE]`.

    Every choice is queued before the response starts (so a full queue is a real 429, not an error
    inside a 200 stream); the batcher hands pieces over a queue, a worker thread waits for the ends;
    when the client goes away the generation is told to stop at its next token.
    """
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    pending = _start_all(engine, call.model, jobs, cancel, lambda index, piece: events.put(("text", index, piece)))

    def work() -> None:
        try:
            for index, job in pending:
                events.put(("done", index, job.result()))
        except EngineError as error:
            events.put(("error", error, None))
        except Exception as error:  # the stream has started: report it in the stream
            log("internal_error", path="stream", error=f"{type(error).__name__}: {error}")
            events.put(("error", EngineError(f"internal error: {error}", 500, "InternalServerError"), None))
        finally:
            events.put(None)

    async def sse() -> AsyncIterator[str]:
        status, generations = 200, []
        worker = threading.Thread(target=work, name="kubetune-stream", daemon=True)
        worker.start()
        try:
            if chunk == reply.chat_chunk:
                for index, _, _ in jobs:
                    yield _sse(chunk(index, None, None))  # the role comes first, as OpenAI streams it
            while (event := await anyio.to_thread.run_sync(events.get, abandon_on_cancel=True)) is not None:
                kind, first, second = event
                if kind == "text":
                    yield _sse(chunk(first, second, None))
                elif kind == "done":
                    generations.append(second)
                    yield _sse(chunk(first, None if chunk == reply.chat_chunk else "", second.finish_reason))
                else:
                    status = first.status
                    yield _sse(error_body(first.message, first.type, first.status))
            if include_usage and status == 200:
                yield _sse(reply.usage_chunk(generations))
            yield _sse("[DONE]")
        finally:
            cancel.set()
            call.done(status)
            if generations:
                _count_tokens(metrics, call, reply, generations)

    return StreamingResponse(sse(), media_type="text/event-stream")
