"""The HTTP side: an OpenAI-compatible API and the chat page, on Starlette, over one `BatchScheduler`.

    GET  /                      the chat page (static/index.html; it talks to the API below)
    GET  /health                200 {"status": "ok", batching stats} once the model is loaded, 503 before
    GET  /v1/models             the served model, with its adapter kind and template under "mm_moslora"
    POST /v1/chat/completions   OpenAI chat completions, JSON or server-sent events (stream: true)

Every refused request gets a 4xx with OpenAI's error object ({"error": {"message", "type", "param", "code"}});
a failure while generating is a 500 for the requests of that batch only.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib.resources import files

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..infer import InferenceEngine, PromptTooLongError
from ..infer import Request as EngineRequest
from .images import ImagePolicy, load_image_url
from .protocol import APIError, Defaults, bad_request, chunk, completion, completion_id, parse_chat_request, usage
from .scheduler import BatchScheduler, Job

log = logging.getLogger("mm_moslora.serve")


@dataclass
class ServeConfig:
    """The server's settings (the CLI's flags). model_info: shown by /v1/models and the page."""
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 32 * 2**20
    max_images: int = 8
    images: ImagePolicy = field(default_factory=ImagePolicy)
    defaults: Defaults = field(default_factory=Defaults)
    max_batch_size: int = 32
    gather_s: float = 0.005
    model_info: dict = field(default_factory=dict)


class Service:
    """What the routes share: the settings and, once loaded, the engine and its scheduler."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.engine: InferenceEngine | None = None
        self.scheduler: BatchScheduler | None = None
        self.created = int(time.time())

    def attach(self, engine: InferenceEngine) -> None:
        """The model is loaded: start answering."""
        self.engine = engine
        self.config.model_info.setdefault("context_length", engine.context_length)
        self.config.model_info.setdefault("conv_mode", engine.conv_mode)
        self.scheduler = BatchScheduler(engine, self.config.max_batch_size, self.config.gather_s)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(service: Service) -> Starlette:
    config = service.config
    page = files("mm_moslora.serve").joinpath("static/index.html").read_text()

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def loaded() -> Service:
        if service.scheduler is None:
            raise APIError(503, "the model is still loading; GET /health turns 200 when it is ready",
                           type="server_error", code="model_loading")
        return service

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        limit = config.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request is {declared} bytes, more than the limit of {limit} (--max-request-mb)",
                           code="request_too_large")
        body = bytearray()
        try:
            async for piece in request.stream():
                body += piece
                if len(body) > limit:
                    raise APIError(413, f"the request is more than the limit of {limit} bytes (--max-request-mb)",
                                   code="request_too_large")
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON ({err})") from None

    async def health(request: Request) -> Response:
        if service.scheduler is None:
            return JSONResponse({"status": "loading", "model": config.model_name}, status_code=503)
        return JSONResponse({"status": "ok", "model": config.model_name, "batching": service.scheduler.stats()})

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": service.created, "owned_by": "mm_moslora",
                "mm_moslora": {**config.model_info, "loaded": service.scheduler is not None,
                               "defaults": vars(config.defaults)}}

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        payload = await read_json(request)
        parsed = parse_chat_request(payload, config.model_name, config.defaults, config.max_images)
        engine = loaded().engine
        images = await run_in_threadpool(lambda: [
            load_image_url(url, config.images, f"image {k}") for k, url in enumerate(parsed.image_urls)])
        engine_request = EngineRequest(parsed.messages, images)
        try:
            n_prompt = len(await run_in_threadpool(engine.prompt_ids, parsed.messages, len(images)))
        except PromptTooLongError as err:
            raise bad_request(f"{err}: shorten the conversation", "messages", "context_length_exceeded") from None
        job = service.scheduler.submit(engine_request, parsed.temperature, parsed.top_p, parsed.max_tokens,
                                       parsed.stop, parsed.stream)
        cid = completion_id()
        if parsed.stream:
            return StreamingResponse(stream_events(job, cid, n_prompt, parsed.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        kind, value = await until_done_or_gone(request, job)
        if kind == "error":
            raise value
        return JSONResponse(completion(cid, config.model_name, value, job.options.finish_reason, n_prompt,
                                       job.options.n_tokens))

    async def until_done_or_gone(request: Request, job: Job):
        """The job's last event; a client that disconnects first cancels it."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        events, gone = asyncio.ensure_future(next_final(job)), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait([events, gone], return_when=asyncio.FIRST_COMPLETED)
            if events in done:
                return events.result()
            job.cancel()
            return await events
        finally:
            gone.cancel()

    async def next_final(job: Job):
        while True:
            kind, value = await job.events.get()
            if kind != "text":
                return kind, value

    async def stream_events(job: Job, cid: str, n_prompt: int, include_usage: bool):
        def event(body: dict) -> str:
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
        name = config.model_name
        try:
            yield event(chunk(cid, name, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield event(chunk(cid, name, {"content": value}))
                elif kind == "error":
                    yield event(value.body())
                    return
                else:
                    yield event(chunk(cid, name, {}, job.options.finish_reason))
                    if include_usage:
                        yield event(chunk(cid, name, {}, with_usage=usage(n_prompt, job.options.n_tokens)))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also when the client disconnects mid-stream (the response task is cancelled)
            job.cancel()

    async def api_error(request: Request, err: APIError) -> Response:
        if err.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, err.message)
        return error_response(err)

    async def http_error(request: Request, err: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path} (see /v1/models, /v1/chat/completions)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return error_response(APIError(err.status_code, message, code={404: "not_found"}.get(err.status_code)))

    async def server_error(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})

