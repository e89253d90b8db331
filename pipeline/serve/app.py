"""The HTTP routes (FastAPI): OpenAI's Images API, progress as server-sent events, the web page.

    POST /v1/images/generations    -> {"created", "data": [{"url" | "b64_json", "seed"}], ...}
                                      with "stream": true, server-sent events: image_generation.progress
                                      ..., then image_generation.completed (the same body) or error
    GET  /v1/models, /v1/models/{id}, /health (503 with "status": "warming" until --warm-size is served)
    GET  /v1/images/{id}.png       the PNG of a `url` response, with the CLI's metadata
    GET  /v1/progress/{request_id} server-sent events image_generation.progress until the request ends
    GET  /                         the web page

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a request the library
refuses (checked here, before the job is queued), 413 for a body over MAX_BODY_BYTES (refused before it is
parsed), 429 + Retry-After when the queue is full, 504 past the timeout, 503 while stopping, 500 for a bug.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidInputError, PipelineError
from .jobs import BatchResult, Job, JobTimeoutError, QueueFullError, ServiceStoppedError
from .schemas import MAX_PROMPT_CHARS, ImageRequest, error_body
from .service import ImageService, RequestError

logger = logging.getLogger("pipeline.serve")

POLL = 0.1  # seconds between looks at a job's progress and at the client's connection
FIND_WAIT = 5.0  # /v1/progress/{id} waits this long for a request that has not arrived yet
_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}
# The largest request body: two prompts at MAX_PROMPT_CHARS, each character JSON-escaped (6 bytes), fit with
# room to spare. FastAPI reads a body whole before validating it, so without a bound one request could take
# the server's memory.
MAX_BODY_BYTES = 1 << 20


class ClientGoneError(Exception):
    """The client disconnected while its request waited."""


def error_response(
    status: int,
    message: str,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, type_ or _TYPES.get(status, "server_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def job_error(e: BaseException) -> JSONResponse:
    """The answer for a job that ended without images."""
    if isinstance(e, JobTimeoutError):
        return error_response(504, str(e), "timeout_error", code="timeout")
    if isinstance(e, ServiceStoppedError):
        return error_response(503, str(e), "server_error", code="unavailable")
    if isinstance(e, PipelineError):
        return error_response(400, str(e), code="invalid_value")
    if isinstance(e, ClientGoneError | asyncio.CancelledError):
        return error_response(499, "the client closed the connection", "server_error", code="client_closed")
    return error_response(500, f"the pipeline failed: {type(e).__name__}: {e}", "server_error")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app reads it, whether its
    Content-Length says so or a chunked body grows past it; smaller bodies are passed on unchanged."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app sees it
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over {self.limit} bytes; a prompt may have at most {MAX_PROMPT_CHARS} characters"
        await error_response(413, message, code="body_too_large")(scope, receive, send)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(service: ImageService) -> FastAPI:
    """The app over a loaded `service`; stopping the app stops the service's worker."""
    worker = service.worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="adaptive-diffusion", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    page = resources.files("pipeline.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        if err["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json")
        if param is None and err["type"] == "model_attributes_type":
            message = 'the body must be a JSON object, e.g. {"prompt": "a red fox"}, sent as application/json'
            return error_response(400, message, code="invalid_json")
        message = f"{param}: {err['msg']}" if param else err["msg"]
        return error_response(400, message, param=param, code=err["type"])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request) -> Response:
        try:
            job = service.prepare(body)
            worker.submit(job)
        except RequestError as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        except InvalidInputError as e:  # a request_id already in use
            return error_response(400, str(e), param="request_id", code="invalid_value")
        except QueueFullError as e:
            headers = {"Retry-After": str(e.retry_after)}
            return error_response(429, str(e), "rate_limit_error", code="queue_full", headers=headers)
        except ServiceStoppedError as e:
            return job_error(e)
        headers = {"X-Request-Id": job.request_id, "X-Replica": service.replica}
        base_url = str(request.base_url)
        if body.stream:
            events = _stream(job, body.response_format, base_url)
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            result = await _wait(job, request.is_disconnected)
            payload = await asyncio.to_thread(service.render, job, result, body.response_format, base_url)
        except Exception as e:
            return job_error(e)
        return JSONResponse(payload, headers=headers | {"X-Batch-Id": str(result.batch_id)})

    async def _wait(job: Job, disconnected: Callable[[], Awaitable[bool]]) -> BatchResult:
        """The job's result; its error; JobTimeoutError at its deadline; ClientGoneError if the client left."""
        future = asyncio.wrap_future(job.future)
        try:
            while True:
                left = job.deadline - time.monotonic()
                if left <= 0:
                    raise JobTimeoutError(
                        "the request did not finish within the server's timeout (--timeout)"
                    )
                await asyncio.wait({future}, timeout=min(POLL, left))
                if future.done():
                    return future.result()
                if await disconnected():
                    raise ClientGoneError
        finally:  # timed out, client gone, or this task cancelled (a Ray proxy does that): free the slot
            worker.cancel(job)

    async def _stream(job: Job, response_format: str, base_url: str) -> AsyncIterator[str]:
        """Progress events, then the response body (or an error body). A disconnect cancels this
        generator (Starlette watches the connection), and the `finally` frees the slot."""
        future = asyncio.wrap_future(job.future)
        last: dict[str, Any] | None = None
        try:
            while not future.done():
                if time.monotonic() >= job.deadline:
                    raise JobTimeoutError(
                        "the request did not finish within the server's timeout (--timeout)"
                    )
                snap = worker.progress(job)
                if snap != last:
                    yield sse("image_generation.progress", {"type": "image_generation.progress", **snap})
                    last = snap
                await asyncio.wait({future}, timeout=POLL)
            result = future.result()
            payload = await asyncio.to_thread(service.render, job, result, response_format, base_url)
            yield sse("image_generation.completed", {"type": "image_generation.completed", **payload})
        except Exception as e:
            yield sse("error", json.loads(job_error(e).body))
        finally:  # done, failed, or the client left: never leave a job behind
            worker.cancel(job)

    @app.get("/v1/progress/{request_id}")
    async def progress(request_id: str) -> Response:
        job = worker.find(request_id)
        waited = 0.0
        while job is None and waited < FIND_WAIT:  # the page may open this before its POST arrives
            await asyncio.sleep(POLL)
            waited += POLL
            job = worker.find(request_id)
        if job is None:
            return error_response(404, f"no request {request_id!r} on this server", param="request_id")
        return StreamingResponse(
            _progress(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _progress(job: Job) -> AsyncIterator[str]:
        last: dict[str, Any] | None = None
        while True:
            finished = job.finished
            snap = worker.progress(job)
            if snap != last:
                yield sse("image_generation.progress", {"type": "image_generation.progress", **snap})
                last = snap
            if finished:
                return
            await asyncio.sleep(POLL)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        card = service.model_card()
        if model_id != card["id"]:
            return error_response(404, f"model {model_id!r} is not served here", param="model")
        return JSONResponse(card)

    @app.get("/health")
    async def health() -> Response:
        health = service.health()  # 503 while warming up (--warm-size): ready to take requests, not fast yet
        code = 503 if health["status"] == "warming" else 200
        return JSONResponse(health, status_code=code, headers={"X-Replica": service.replica})

    @app.get("/v1/images/{image_id}.png")
    async def image(image_id: str) -> Response:
        path = service.store.path(image_id)
        if path is None:
            return error_response(404, f"no image {image_id!r} here", param="image_id")
        return FileResponse(path, media_type="image/png")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
