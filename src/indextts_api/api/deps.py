"""Typed dependencies of the routes, in one place.

The API's long-lived objects are built once (the app's lifespan) into one ``ApiServices`` bundle,
and a route takes that bundle as a single dependency: FastAPI solves every dependency of every
request anew, and on POST /generate five separate ones cost a fifth of the request's CPU (profiled
under load). Both dependencies are ``async def``: FastAPI would run a plain ``def`` dependency in
its thread pool, a thread hop per request.
"""

from __future__ import annotations

import secrets
from base64 import b64decode
from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from indextts_api.api.health import HealthChecker
from indextts_api.config import Settings
from indextts_api.kafka import AsyncProducer
from indextts_api.metrics import LagMonitor
from indextts_api.prompts import LocalPromptCheck
from indextts_api.replies import ReplyHub
from indextts_api.tasks import TaskStateStore
from indextts_api.voices import VoiceCheck, VoiceStore


class _UnicodeBasic(HTTPBasic):
    """HTTP Basic credentials decoded as UTF-8 (RFC 7617; httpx, curl and browsers send it), or as
    Latin-1 when they are not UTF-8 (what requests and older clients send); None when absent or
    malformed, which the caller answers with its own 401.

    FastAPI's HTTPBasic decodes them as ASCII and answers 401 for anything else, so a password
    with a non-ASCII character could never log in.
    """

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        scheme, param = get_authorization_scheme_param(request.headers.get("Authorization"))
        if scheme.lower() != "basic":
            return None
        try:
            raw = b64decode(param)
        except ValueError:  # binascii.Error is one, and so is a header value that is not ASCII
            return None
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError:
            data = raw.decode("latin-1")
        username, separator, password = data.partition(":")
        return HTTPBasicCredentials(username=username, password=password) if separator else None


# The scheme keeps FastAPI's name, so the OpenAPI document is unchanged.
_basic = _UnicodeBasic(auto_error=False, realm="indextts-api", scheme_name="HTTPBasic")


@dataclass(frozen=True)
class ApiServices:
    """What the routes use, built once per process by the app's lifespan."""

    settings: Settings
    producer: AsyncProducer
    prompt_check: LocalPromptCheck
    health: HealthChecker
    task_states: TaskStateStore
    lag: LagMonitor
    voices: VoiceStore
    voice_check: VoiceCheck
    prompt_http: httpx.Client  # downloads of voices registered by URL
    replies: ReplyHub  # audio and outcomes coming back from the workers
    # Basic auth credentials as bytes, compared in constant time (empty: nobody is let in).
    username: bytes
    password: bytes
    bearer_keys: tuple[bytes, ...] = ()  # API_KEYS


def make_services(
    settings: Settings,
    producer: AsyncProducer,
    prompt_check: LocalPromptCheck,
    health: HealthChecker,
    task_states: TaskStateStore,
    lag: LagMonitor,
    voices: VoiceStore,
    voice_check: VoiceCheck,
    prompt_http: httpx.Client,
    replies: ReplyHub,
) -> ApiServices:
    return ApiServices(
        settings=settings,
        producer=producer,
        prompt_check=prompt_check,
        health=health,
        task_states=task_states,
        lag=lag,
        voices=voices,
        voice_check=voice_check,
        prompt_http=prompt_http,
        replies=replies,
        username=(settings.api_username or "").encode(),
        password=settings.api_password.get_secret_value().encode() if settings.api_password else b"",
        bearer_keys=tuple(settings.bearer_keys),
    )


async def get_services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


ServicesDep = Annotated[ApiServices, Depends(get_services)]


async def authorized_services(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> ApiServices:
    """The services, for a caller whose Basic auth credentials or bearer key (API_KEYS) match
    (compared in constant time); 401 with a Basic challenge otherwise."""
    services = await get_services(request)
    if services.bearer_keys and _bearer_matches(request, services.bearer_keys):
        return services
    if credentials is not None and services.username and services.password:
        user_ok = secrets.compare_digest(credentials.username.encode(), services.username)
        password_ok = secrets.compare_digest(credentials.password.encode(), services.password)
        if user_ok and password_ok:
            return services
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="Authentication required",
        headers={"WWW-Authenticate": 'Basic realm="indextts-api"'},
    )


def _bearer_matches(request: Request, keys: tuple[bytes, ...]) -> bool:
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.encode("utf-8", "surrogateescape")
    # Every key is compared, so the time taken does not tell which one nearly matched.
    return sum(secrets.compare_digest(given, key) for key in keys) > 0


AuthorizedDep = Annotated[ApiServices, Depends(authorized_services)]
