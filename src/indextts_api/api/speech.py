"""POST /v1/audio/speech: OpenAI's speech endpoint, streamed, over the durable queue.

An interactive request is a task like the others: stored in Kafka (its own topic, which TTS
workers serve first) before any work, visible in GET /tasks. The worker sends its audio back
through the reply topic segment by segment (``replies``); this API host encodes it into the asked
format as it comes and streams it in the response body (chunked), or as OpenAI's server-sent
events. A client that disconnects cancels its task: the worker stops at its next segment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from indextts_api.api.deps import ApiServices, AuthorizedDep
from indextts_api.api.routes import check_references, queue_task
from indextts_api.audio_formats import STREAM_CONTENT_TYPES, StreamEncoder
from indextts_api.config import Settings
from indextts_api.ids import new_task_uuid
from indextts_api.replies import Reply
from indextts_api.schemas import OpenAIError, SpeechRequest, TaskMessage, check_audio_reference

logger = logging.getLogger(__name__)

# OpenAI's voice names: each speaks with the voice OPENAI_VOICES maps it to, else the default one.
OPENAI_VOICE_NAMES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"}
)
_BARE_VOICE_ID = re.compile(r"[0-9a-f]{32}")
STREAM_FRAME_SAMPLES = 480  # 20 ms at 24 kHz: the unit of usage.output_tokens
# How long the API waits for the reply hub to be reading at start-up before it refuses.
HUB_READY_WAIT_S = 10.0


def resolve_voice(settings: Settings, voice: str) -> str:
    """The prompt reference ``voice`` stands for: a registered voice, a configured name, or (for
    one of OpenAI's names not configured) OPENAI_DEFAULT_VOICE; else 400."""
    if voice.startswith("voice:"):
        return voice
    if _BARE_VOICE_ID.fullmatch(voice):
        return f"voice:{voice}"
    mapped = settings.openai_voice_map.get(voice.lower())
    if mapped:
        return mapped
    if voice.lower() in OPENAI_VOICE_NAMES:
        return settings.openai_default_voice
    raise HTTPException(
        status.HTTP_400_BAD_REQUEST,
        f"voice {voice!r} is neither a registered voice (voice:<voice_id>) nor a configured name "
        f"(OPENAI_VOICES, or one of OpenAI's: {', '.join(sorted(OPENAI_VOICE_NAMES))})",
    )


def ignored_parameters(body: SpeechRequest) -> list[str]:
    """What the request asks that no engine here can honour: accepted, and said in a header."""
    ignored = []
    if body.speed != 1.0:
        ignored.append("speed")
    if body.instructions:
        ignored.append("instructions")
    ignored += sorted(body.model_extra or {})
    return ignored


async def _next_reply(queue: asyncio.Queue[Reply], timeout_s: float) -> Reply | None:
    try:
        return await asyncio.wait_for(queue.get(), timeout=timeout_s)
    except TimeoutError:
        return None


async def create_speech(body: SpeechRequest, services: AuthorizedDep) -> Response:
    """Speech for ``input`` in ``voice``, streamed as it is synthesized: the audio in the body
    (``stream_format=audio``, chunked) or OpenAI's ``speech.audio.delta`` / ``speech.audio.done``
    events (``sse``). ``X-Task-Id`` names the task (GET /tasks/{id}); ``X-Ignored-Parameters``
    lists what was accepted but cannot be honoured."""
    settings = services.settings
    reference = resolve_voice(settings, body.voice)
    try:
        check_audio_reference(reference, "voice")
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    await check_references(
        services, None, [("voice", reference), ("params.emo_audio_prompt", body.params.emo_audio_prompt)]
    )
    ready = services.replies.ready
    if not ready.is_set() and not await anyio.to_thread.run_sync(ready.wait, HUB_READY_WAIT_S):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the reply topic cannot be read yet; retry later")
    task_uuid = new_task_uuid(settings.task_id_key)
    message = TaskMessage(
        task_uuid=task_uuid,
        spk_audio_prompt=reference,
        text=body.input,
        hook_url="",
        params=body.params,
        timestamp=time.time(),
        interactive=True,
    )
    replies = services.replies.expect(task_uuid)  # before the task exists: no reply is missed
    try:
        refusal = await queue_task(services, settings.kafka_interactive_topic, message)
        if refusal is not None:
            return _openai_refusal(refusal)
        first = await _next_reply(replies, settings.interactive_timeout_s)
        if first is None or first.kind != "audio":
            return await _failed_before_audio(services, task_uuid, first)
    except BaseException:
        services.replies.forget(task_uuid)
        raise
    headers = {"X-Task-Id": task_uuid}
    ignored = ignored_parameters(body)
    if ignored:
        headers["X-Ignored-Parameters"] = ", ".join(ignored)
    sse = body.stream_format == "sse"
    return StreamingResponse(
        _stream(services, task_uuid, replies, first, body),
        media_type="text/event-stream" if sse else STREAM_CONTENT_TYPES[body.response_format],
        headers=headers,
    )


def _openai_refusal(refusal: JSONResponse) -> JSONResponse:
    """A 504 from queue_task, in OpenAI's error shape (its body names the task)."""
    document = json.loads(bytes(refusal.body))
    return JSONResponse(
        status_code=refusal.status_code,
        content={
            "error": {"message": document["error"], "type": "server_error", "param": None, "code": "queued_unknown"}
        },
        headers={key: value for key, value in refusal.headers.items() if key.lower() == "retry-after"},
    )


async def _failed_before_audio(services: ApiServices, task_uuid: str, reply: Reply | None) -> Response:
    """The task ended (or nothing came in time) before any audio: an HTTP error says why."""
    services.replies.forget(task_uuid)
    if reply is None:
        await run_in_threadpool(services.task_states.request_cancel, task_uuid, "no audio in time")
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT, f"no audio within {services.settings.interactive_timeout_s:g} s"
        )
    info = reply.info or {}
    message = str(info.get("error_message") or "synthesis failed")
    # A prompt that cannot be used is the request's fault; anything else is the service's.
    code = (
        status.HTTP_400_BAD_REQUEST
        if "voice" in message or "prompt" in message
        else status.HTTP_500_INTERNAL_SERVER_ERROR
    )
    raise HTTPException(code, message)


def _sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _stream(
    services: ApiServices, task_uuid: str, replies: asyncio.Queue[Reply], first: Reply, body: SpeechRequest
) -> AsyncIterator[bytes]:
    """The response body: each reply's audio, encoded, as it arrives."""
    sse = body.stream_format == "sse"
    encoder = StreamEncoder(body.response_format, first.sample_rate)
    next_seq = 0
    finished = False
    sent = 0

    def wrap(data: bytes) -> bytes:
        return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data

    try:
        reply: Reply | None = first
        while reply is not None:
            if reply.kind == "audio":
                if reply.seq >= next_seq:  # a redelivered task's repeated stream is skipped
                    next_seq = reply.seq + 1
                    data = encoder.feed(reply.samples())
                    if data:
                        sent += len(data)
                        yield wrap(data)
            elif reply.kind == "done":
                finished = True
                tail = encoder.finish()
                if tail:
                    yield wrap(tail)
                if sse:
                    # OpenAI's usage: input tokens are counted here as characters of input, output
                    # tokens as 20 ms frames of audio (this service has no tokenizer).
                    frames = round(encoder.samples / STREAM_FRAME_SAMPLES)
                    usage = {"input_tokens": len(body.input), "output_tokens": frames}
                    yield _sse({"type": "speech.audio.done", "usage": {**usage, "total_tokens": sum(usage.values())}})
                return
            elif reply.kind == "error":
                finished = True  # the worker stopped; nothing to cancel
                logger.warning("task %s failed mid-stream: %s", task_uuid, (reply.info or {}).get("error_message"))
                return
            reply = await _next_reply(replies, services.settings.interactive_timeout_s)
        logger.warning("task %s: no audio for %g s; stream ended", task_uuid, services.settings.interactive_timeout_s)
    finally:
        services.replies.forget(task_uuid)
        if not finished:
            # The client went away (or the stream stalled): the worker stops at its next segment.
            # Shielded: this runs while the response's task is being cancelled.
            with anyio.CancelScope(shield=True):
                try:
                    await run_in_threadpool(services.task_states.request_cancel, task_uuid, "client disconnected")
                    logger.info("task %s canceled: the client disconnected after %d bytes", task_uuid, sent)
                except Exception as exc:  # noqa: BLE001 - the task then runs to its end
                    logger.warning("task %s: could not record its cancellation: %s", task_uuid, exc)


def add_speech_routes(app: FastAPI) -> None:
    errors: dict[int | str, dict[str, object]] = {
        code: {"model": OpenAIError, "description": text}
        for code, text in (
            (400, "Invalid request"),
            (401, "Missing or wrong key or credentials"),
            (413, "Request body too large"),
            (500, "The engine failed before any audio"),
            (503, "The task queue or the reply topic is unavailable; nothing was queued"),
            (504, "No verdict from the broker, or no audio in time"),
        )
    }
    app.post(
        "/v1/audio/speech",
        response_class=StreamingResponse,
        responses={200: {"content": {value: {} for value in STREAM_CONTENT_TYPES.values()}}, **errors},
        tags=["openai"],
    )(create_speech)
