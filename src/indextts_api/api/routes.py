"""The spec's endpoints: GET /health and POST /generate."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, HTTPException, status

from indextts_api.api.deps import ProducerDep, SettingsDep, UserDep
from indextts_api.engines import describe_engine
from indextts_api.kafka import BrokerUnavailable
from indextts_api.netguard import known_internal_reason
from indextts_api.prompts import PromptError, resolve_local_prompt
from indextts_api.schemas import ErrorPublic, HealthPublic, TaskCreate, TaskMessage, TaskQueued, is_url

logger = logging.getLogger(__name__)

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorPublic, "description": "Invalid request"},
    401: {"model": ErrorPublic, "description": "Missing or wrong credentials"},
    413: {"model": ErrorPublic, "description": "Request body too large"},
    503: {"model": ErrorPublic, "description": "The task queue is unavailable; nothing was queued"},
}


@router.get("/health", response_model=HealthPublic)
def health(settings: SettingsDep) -> HealthPublic:
    """Service health, the model version and the engine in use."""
    engine = describe_engine(settings)
    return HealthPublic(status="healthy", timestamp=int(time.time()), model_version=engine.model_version, engine=engine)


def _check_urls_are_public(settings: SettingsDep, task: TaskCreate) -> None:
    """Refuse at once URLs already known to lead inside (the workers check again when connecting)."""
    if settings.private_urls_allowed:
        return
    for field, url in (
        ("hook_url", task.hook_url),
        ("spk_audio_prompt", task.spk_audio_prompt),
        ("params.emo_audio_prompt", task.params.emo_audio_prompt),
    ):
        if url and is_url(url):
            reason = known_internal_reason(url)
            if reason:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {reason}; only public URLs are allowed")


def _check_local_prompts(settings: SettingsDep, task: TaskCreate) -> None:
    """Refuse at once a prompt path that is not in this host's prompt directory (when it has one)."""
    if not settings.prompt_dir.is_dir():
        return  # the API host may not share the workers' prompt directory; the worker checks
    for field, reference in (
        ("spk_audio_prompt", task.spk_audio_prompt),
        ("params.emo_audio_prompt", task.params.emo_audio_prompt),
    ):
        if reference and not is_url(reference):
            try:
                resolve_local_prompt(settings.prompt_dir, reference)
            except PromptError as exc:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {exc}") from None


@router.post("/generate", response_model=TaskQueued, responses=_ERRORS)
async def generate(task: TaskCreate, settings: SettingsDep, producer: ProducerDep, _user: UserDep) -> TaskQueued:
    """Queue a synthesis task; answers only once the broker has stored it."""
    _check_urls_are_public(settings, task)
    _check_local_prompts(settings, task)
    task_uuid = str(uuid.uuid4())
    message = TaskMessage(
        task_uuid=task_uuid,
        spk_audio_prompt=task.spk_audio_prompt,
        text=task.text,
        hook_url=task.hook_url,
        params=task.params,
        timestamp=time.time(),
    )
    try:
        await producer.send(settings.kafka_task_topic, task_uuid, message.model_dump_json().encode())
    except BrokerUnavailable as exc:
        logger.error("task %s not queued: %s", task_uuid, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "task queue unavailable; retry later") from None
    logger.info("task %s queued (%d characters)", task_uuid, len(task.text))
    return TaskQueued(task_uuid=task_uuid)
