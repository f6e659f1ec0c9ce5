"""The endpoints: the spec's GET /health and POST /generate; GET /tasks/{task_uuid}; GET /metrics.

They are added to the app itself (``add_routes``), not through an APIRouter: FastAPI resolves an
included router's routes through one more layer on every request, 8% of the CPU of a
POST /generate (measured in-process, 118 -> 108 us per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from indextts_api.api.deps import ApiServices, AuthorizedDep, ServicesDep
from indextts_api.config import Settings
from indextts_api.engines import describe_engine
from indextts_api.ids import new_task_uuid
from indextts_api.kafka import BrokerUnavailable, OutcomeUnknown
from indextts_api.metrics import REQUESTS_REFUSED, TASKS_ACCEPTED
from indextts_api.metrics import render as render_metrics
from indextts_api.netguard import known_internal_reason
from indextts_api.prompts import LocalPromptCheck
from indextts_api.replies import Reply
from indextts_api.schemas import (
    ErrorPublic,
    HealthPublic,
    QueueOutcomeUnknown,
    TaskCreate,
    TaskMessage,
    TaskQueued,
    is_url,
    voice_id_of,
)
from indextts_api.tasks import TaskPublic

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorPublic, "description": "Invalid request"},
    401: {"model": ErrorPublic, "description": "Missing or wrong credentials"},
    413: {"model": ErrorPublic, "description": "Request body too large"},
    503: {"model": ErrorPublic, "description": "The task queue is unavailable; nothing was queued"},
    504: {
        "model": QueueOutcomeUnknown,
        "description": "The task was sent but the broker's verdict did not come in time: it may be queued "
        "(its webhook would name task_uuid). Retry-After says when to look again.",
    },
}
# A client told the outcome is unknown may retry after this long (a broker failover is ~10-30 s).
RETRY_AFTER_UNKNOWN_S = 30
# The longest Prefer: wait a client may ask for (a load balancer's idle timeout is often 60 s).
MAX_WAIT_S = 60.0


def health(services: ServicesDep) -> JSONResponse:
    """Service health with the spec's fields, the engine in use, and checks of Kafka, S3 and the engine
    (200 when all are up, 503 naming the one that is down)."""
    settings, checker = services.settings, services.health
    checks = checker.checks()
    # The engine the TTS workers report running (they may be on other hosts than this API);
    # before any has reported, what these settings would select.
    engine = describe_engine(settings, reported=checker.live_engines[0] if checker.live_engines else None)
    healthy = all(check.status == "up" for check in checks.values())
    body = HealthPublic(
        status="healthy" if healthy else "unhealthy",
        timestamp=int(time.time()),
        model_version=engine.model_version,
        engine=engine,
        checks=checks,
    )
    return JSONResponse(status_code=200 if healthy else 503, content=body.model_dump(mode="json"))


def get_task(task_uuid: str, services: AuthorizedDep) -> TaskPublic:
    """A task's status (queued, processing, uploading, success, failed), its times, outcome, engine
    timings and webhook delivery record: a client that lost its webhook recovers the result here."""
    try:
        task_uuid = str(uuid.UUID(task_uuid))
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such task") from None
    task = services.task_states.read(task_uuid, services.settings.task_id_key)
    if task is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such task")
    return task


def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics (of the whole process tree when run as `all`)."""
    services.lag.wanted()
    body, content_type = render_metrics()
    return Response(content=body, media_type=content_type)


# (field name, reference) of a task's audio prompts, as the checks below take them.
Prompts = list[tuple[str, str | None]]


def prompts_of(task: TaskCreate) -> Prompts:
    return [("spk_audio_prompt", task.spk_audio_prompt), ("params.emo_audio_prompt", task.params.emo_audio_prompt)]


def _check_urls_are_public(settings: Settings, hook_url: str | None, prompts: Prompts) -> None:
    """Refuse at once URLs already known to lead inside (the workers check again when connecting)."""
    if settings.private_urls_allowed:
        return
    for field, url in [("hook_url", hook_url), *prompts]:
        if url and is_url(url):
            reason = known_internal_reason(url)
            if reason:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {reason}; only public URLs are allowed")


def _check_local_prompts(prompts_check: LocalPromptCheck, prompts: Prompts) -> None:
    """Refuse at once a prompt path that is not in this host's prompt directory (when it has one)."""
    for field, reference in prompts:
        if reference and not is_url(reference) and voice_id_of(reference) is None:
            error = prompts_check.error_for(reference)
            if error is not None:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {error}")


async def _check_voices(services: ApiServices, prompts: Prompts) -> None:
    """Refuse a ``voice:<id>`` that is not registered (S3 is asked in the thread pool, and only when
    a task names a voice: a yes is remembered for a few seconds)."""
    for field, reference in prompts:
        voice_id = voice_id_of(reference) if reference else None
        if voice_id is None:
            continue
        try:
            registered = await run_in_threadpool(services.voice_check.exists, voice_id)
        except Exception as exc:  # noqa: BLE001 - whatever S3 raised: nothing was queued
            logger.error("voice storage unavailable: %s", exc)
            REQUESTS_REFUSED.labels("503").inc()
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "voice storage unavailable; retry later") from None
        if not registered:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: voice {voice_id} is not registered")


async def check_references(services: ApiServices, hook_url: str | None, prompts: Prompts) -> None:
    """Every check of a task's URLs, paths and voices that can be made before it is queued."""
    _check_urls_are_public(services.settings, hook_url, prompts)
    _check_local_prompts(services.prompt_check, prompts)
    await _check_voices(services, prompts)


async def queue_task(services: ApiServices, topic: str, message: TaskMessage) -> JSONResponse | None:
    """Store ``message`` in the broker: None once stored, a 504 answer when the broker's verdict did
    not come (it may be stored), HTTPException 503 when it was not stored."""
    task_uuid = message.task_uuid
    try:
        await services.producer.send(topic, task_uuid, message.model_dump_json().encode())
    except OutcomeUnknown as exc:
        # Not a 503: the task may be stored, and then it will be synthesized and its webhook sent.
        logger.error("task %s may or may not be queued: %s", task_uuid, exc)
        REQUESTS_REFUSED.labels("504").inc()
        unknown = QueueOutcomeUnknown(
            error="the task queue did not confirm in time whether the task was stored; it may be queued",
            task_uuid=task_uuid,
        )
        return JSONResponse(
            status_code=status.HTTP_504_GATEWAY_TIMEOUT,
            content=unknown.model_dump(),
            headers={"Retry-After": str(RETRY_AFTER_UNKNOWN_S)},
        )
    except BrokerUnavailable as exc:
        logger.error("task %s not queued: %s", task_uuid, exc)
        REQUESTS_REFUSED.labels("503").inc()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "task queue unavailable; retry later") from None
    TASKS_ACCEPTED.inc()
    return None


def wait_preference(prefer: str | None) -> float | None:
    """Seconds of ``Prefer: wait=N`` (RFC 7240, Replicate's convention), at most MAX_WAIT_S; None without it."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "Prefer: wait=N takes a number of seconds") from None
            if not 0 < seconds <= MAX_WAIT_S or seconds != seconds:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"Prefer: wait=N takes 0 < N <= {MAX_WAIT_S:g}")
            return seconds
    return None


async def generate(
    task: TaskCreate, services: AuthorizedDep, prefer: Annotated[str | None, Header()] = None
) -> Response:
    """Queue a synthesis task; answers only once the broker has stored it. With ``Prefer: wait=N``
    (at most 60 s) it answers the finished task instead (GET /tasks/{id}'s body, with its
    ``s3_url``) if it ends within N seconds, else the usual queued answer."""
    wait_s = wait_preference(prefer)
    await check_references(services, task.hook_url, prompts_of(task))
    task_uuid = new_task_uuid(services.settings.task_id_key)
    message = TaskMessage(
        task_uuid=task_uuid,
        spk_audio_prompt=task.spk_audio_prompt,
        text=task.text,
        hook_url=task.hook_url,
        params=task.params,
        timestamp=time.time(),
        output=task.output,
        notify=wait_s is not None,
    )
    replies = services.replies.expect(task_uuid) if wait_s is not None else None
    try:
        refusal = await queue_task(services, services.settings.kafka_task_topic, message)
        if refusal is not None:
            return refusal
        logger.info("task %s queued (%d characters)", task_uuid, len(task.text))
        if replies is not None and wait_s is not None:
            finished = await _finished_within(services, task_uuid, replies, wait_s)
            if finished is not None:
                return finished
    finally:
        if replies is not None:
            services.replies.forget(task_uuid)
    # Serialized here: a returned model would be validated against response_model once more.
    return Response(TaskQueued(task_uuid=task_uuid).model_dump_json(), media_type="application/json")


async def _finished_within(
    services: ApiServices, task_uuid: str, replies: asyncio.Queue[Reply], wait_s: float
) -> Response | None:
    """The finished task if the upload worker announces it within ``wait_s``, else None."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = await asyncio.wait_for(replies.get(), timeout=left)
        except TimeoutError:
            return None
        if reply.kind == "finished":
            task = await run_in_threadpool(services.task_states.read, task_uuid, services.settings.task_id_key)
            if task is None:
                return None
            return Response(
                task.model_dump_json(),
                media_type="application/json",
                headers={"Preference-Applied": f"wait={wait_s:g}"},
            )
    return None


def add_routes(app: FastAPI) -> None:
    task_responses: dict[int | str, dict[str, object]] = {401: _ERRORS[401], 404: {"model": ErrorPublic}}
    app.get("/health", response_model=HealthPublic, responses={503: {"model": HealthPublic}})(health)
    generate_responses: dict[int | str, dict[str, object]] = {
        **_ERRORS,
        200: {
            "model": TaskQueued,
            "description": "Queued; with Prefer: wait=N and the task finished within N s, GET /tasks/{id}'s body",
        },
    }
    app.post("/generate", response_model=TaskQueued, responses=generate_responses)(generate)
    app.get("/tasks/{task_uuid}", response_model=TaskPublic, responses=task_responses)(get_task)
    app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})(metrics)
