"""FastAPI application: lifespan (one producer per process), JSON errors, body size limit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indextts_api import __version__
from indextts_api.api.deps import make_services
from indextts_api.api.health import HealthChecker
from indextts_api.api.routes import add_routes
from indextts_api.api.speech import add_speech_routes
from indextts_api.api.voices import VOICE_FORM_OVERHEAD_BYTES, add_voice_routes
from indextts_api.config import Settings
from indextts_api.httpclient import make_http_client
from indextts_api.kafka import AsyncProducer
from indextts_api.metrics import LagMonitor
from indextts_api.prompts import LocalPromptCheck
from indextts_api.replies import ReplyHub
from indextts_api.schemas import describe_validation_error
from indextts_api.storage import AudioStore, make_s3_client
from indextts_api.tasks import TaskStateStore
from indextts_api.voices import VoiceCheck, VoiceStore

logger = logging.getLogger(__name__)


def _unknown_field_hint(errors: list[dict[str, Any]]) -> str:
    from indextts_api.schemas import TaskCreate, TaskParams

    hints = []
    for error in errors:
        if error.get("type") != "extra_forbidden":
            continue
        model = TaskParams if "params" in error.get("loc", ()) else TaskCreate
        where = "params" if model is TaskParams else "the request"
        hints.append(f"accepted keys in {where}: {', '.join(model.model_fields)}")
    return ("; " + "; ".join(dict.fromkeys(hints))) if hints else ""


def error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None, openai: bool = False
) -> JSONResponse:
    """``{"error": message}``, or on the OpenAI-compatible routes OpenAI's error object, so that its
    SDKs raise their usual exceptions. A message may quote the client's input, and a lone surrogate
    in it would make the JSON encoder raise (a 500 instead of the answer): such characters are sent escaped."""
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if openai:
        body: dict[str, Any] = {"error": {"message": safe, "type": _OPENAI_ERROR_TYPES.get(status_code, "api_error")}}
        body["error"]["param"], body["error"]["code"] = None, None
        return JSONResponse(status_code=status_code, content=body, headers=headers)
    return JSONResponse(status_code=status_code, content={"error": safe}, headers=headers)


# OpenAI's error types by status (its SDKs map the status to an exception class).
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


def _is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    text = "; ".join(describe_validation_error(error) for error in errors) + _unknown_field_hint(errors)
    return error_response(400, text, openai=_is_openai_route(request))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), exc.headers, openai=_is_openai_route(request))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", openai=_is_openai_route(request))


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with 413, declared or streamed (pure ASGI: no per-request task).

    A streamed (chunked) body is counted as it is received, and the refusal is raised from
    ``receive`` as an HTTPException, which the app answers as any other: FastAPI's body parsing
    re-raises those, while it turns any other exception into 400 "There was an error parsing the body".
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._per_path = dict(per_path or {})  # paths that take larger bodies (an audio upload)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._per_path.get(scope["path"], self.max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await error_response(413, _too_large(limit))(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this API answers 400 (documented per route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s3 = make_s3_client(settings)
        voices = VoiceStore(settings, s3)
        # Downloads a voice registered by URL, with the prompts' bounds and SSRF rules.
        prompt_http = make_http_client(
            connect_timeout_s=settings.prompt_connect_timeout_s,
            read_timeout_s=settings.prompt_read_timeout_s,
            max_redirects=settings.prompt_max_redirects,
            allow_private=settings.private_urls_allowed,
        )
        services = make_services(
            settings,
            producer=AsyncProducer(settings),
            prompt_check=LocalPromptCheck(settings.prompt_dir),
            health=HealthChecker(settings),
            task_states=TaskStateStore(settings, AudioStore(settings, s3)),
            lag=LagMonitor(settings).start(),
            voices=voices,
            voice_check=VoiceCheck(voices, settings.voice_check_s),
            prompt_http=prompt_http,
            replies=ReplyHub(settings).start(),
        )
        app.state.services = services
        try:
            yield
        finally:
            services.lag.stop()
            services.task_states.close()
            services.producer.close()
            prompt_http.close()
            services.replies.close()

    app = FastAPI(
        title="IndexTTS API",
        version=__version__,
        summary="Text-to-speech jobs: queue a task, receive the audio URL by webhook.",
        lifespan=lifespan,
        # Metrics are Prometheus' (GET /metrics); FastAPI's OpenTelemetry hooks would only cost
        # a provider lookup per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    add_routes(app)
    add_voice_routes(app)
    add_speech_routes(app)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        per_path={"/voices": settings.prompt_max_bytes + VOICE_FORM_OVERHEAD_BYTES},
    )
    return app
