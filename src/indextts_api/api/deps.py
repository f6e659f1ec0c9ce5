"""Typed dependencies of the routes, in one place.

All of them are ``async def``: they never block, and FastAPI would run a plain ``def`` dependency
in its thread pool, a thread hop per dependency per request (the accept rate halved).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from indextts_api.api.health import HealthChecker
from indextts_api.config import Settings
from indextts_api.kafka import AsyncProducer
from indextts_api.prompts import LocalPromptCheck
from indextts_api.tasks import TaskStateStore

_basic = HTTPBasic(auto_error=False, realm="indextts-api")


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_producer(request: Request) -> AsyncProducer:
    producer: AsyncProducer = request.app.state.producer
    return producer


async def get_health_checker(request: Request) -> HealthChecker:
    checker: HealthChecker = request.app.state.health
    return checker


async def get_task_states(request: Request) -> TaskStateStore:
    states: TaskStateStore = request.app.state.task_states
    return states


async def get_prompt_check(request: Request) -> LocalPromptCheck:
    check: LocalPromptCheck = request.app.state.prompt_check
    return check


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ProducerDep = Annotated[AsyncProducer, Depends(get_producer)]
HealthDep = Annotated[HealthChecker, Depends(get_health_checker)]
TaskStatesDep = Annotated[TaskStateStore, Depends(get_task_states)]
PromptCheckDep = Annotated[LocalPromptCheck, Depends(get_prompt_check)]


async def require_user(
    settings: SettingsDep, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> str:
    """Basic auth, compared in constant time; 401 with a Basic challenge otherwise."""
    expected_user = (settings.api_username or "").encode()
    expected_password = settings.api_password.get_secret_value().encode() if settings.api_password else b""
    if credentials is not None and expected_user and expected_password:
        user_ok = secrets.compare_digest(credentials.username.encode(), expected_user)
        password_ok = secrets.compare_digest(credentials.password.encode(), expected_password)
        if user_ok and password_ok:
            return credentials.username
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="Authentication required",
        headers={"WWW-Authenticate": 'Basic realm="indextts-api"'},
    )


UserDep = Annotated[str, Depends(require_user)]
