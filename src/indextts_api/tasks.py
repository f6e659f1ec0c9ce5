"""Task state: small JSON documents in the audio bucket, one per stage, read back by GET /tasks/{id}.

Why here: it needs no new infrastructure, every API and worker host already reaches the bucket,
and it scales with the workers (writes happen at the rate tasks are processed, not accepted).
Each stage has its own object (``tasks/<id>/processing.json``, ``uploading.json``, ``result.json``,
``webhook.json``), written by the one role that owns that stage, so writers on different hosts
never overwrite each other and no write can move a task backwards: the status is the latest stage
present. A success is recorded on the audio object itself, as its user metadata, by the PUT that
stores it: one storage write less on every task's way to its webhook (``result.json`` is written for
failures only). "queued" needs no write at all: a task id is signed (see ``ids``), so an id we issued with
no stage recorded yet is a queued task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from indextts_api.audio_formats import EncodedAudio
from indextts_api.config import Settings
from indextts_api.ids import issued_at
from indextts_api.storage import AudioStore

logger = logging.getLogger(__name__)

# "cancel" is a request (the API writes it; the TTS worker looks for it between segments).
Stage = Literal["processing", "uploading", "result", "webhook", "cancel"]
# Steps shorter than this leave no "processing" / "uploading" record (see stage_if_slow).
STAGE_WRITE_DELAY_S = 0.25
STAGES: tuple[Stage, ...] = ("processing", "uploading", "result", "webhook")
TaskStatus = Literal["queued", "processing", "uploading", "success", "failed", "canceled"]
# The audio object's user metadata (x-amz-meta-indextts-outcome) holding a success's outcome document.
OUTCOME_METADATA_KEY = "indextts-outcome"


def outcome_metadata(document: dict[str, Any]) -> dict[str, str]:
    """A success's outcome document as user metadata of its audio object (ASCII JSON: HTTP headers)."""
    return {OUTCOME_METADATA_KEY: json.dumps({**document, "updated_at": time.time()}, separators=(",", ":"))}


class WebhookRecord(BaseModel):
    attempts: int = 0
    delivered: bool = False
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: float | None = None


class TaskTimings(BaseModel):
    fetch_s: float | None = Field(default=None, description="prompt download and check")
    engine_wait_s: float | None = Field(default=None, description="waiting for the engine (another task's synthesis)")
    synthesis_s: float | None = Field(default=None, description="engine time")
    audio_s: float | None = Field(default=None, description="length of the audio produced")
    upload_s: float | None = None


class TaskPublic(BaseModel):
    """GET /tasks/{task_uuid}: where a task is, and its outcome once it has one."""

    task_uuid: str
    status: TaskStatus
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    s3_url: str | None = None
    audio: EncodedAudio | None = Field(
        default=None, description="what was delivered: format, content type, sample rate, duration, size"
    )
    error_message: str | None = None
    engine: str | None = None
    timings: TaskTimings = Field(default_factory=TaskTimings)
    webhook: WebhookRecord = Field(default_factory=WebhookRecord)


class TaskStateStore:
    """Writes and reads the stage documents. Writes can run in the background (``write_async``)."""

    def __init__(self, settings: Settings, store: AudioStore) -> None:
        self._store = store
        self._client = store.client
        prefix = settings.s3_key_prefix.strip("/")
        self._prefix = f"{prefix}/tasks" if prefix else "tasks"
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="task-state")

    def _key(self, task_uuid: str, stage: Stage) -> str:
        return f"{self._prefix}/{task_uuid}/{stage}.json"

    def write(self, task_uuid: str, stage: Stage, document: dict[str, Any]) -> None:
        body = json.dumps({**document, "updated_at": time.time()}).encode()
        self._client.put_object(
            Bucket=self._store.bucket, Key=self._key(task_uuid, stage), Body=body, ContentType="application/json"
        )

    def write_async(self, task_uuid: str, stage: Stage, document: dict[str, Any]) -> Future[None]:
        """Write without waiting (informational stages); a failure is logged, the task goes on."""
        future = self._writer.submit(self.write, task_uuid, stage, document)
        future.add_done_callback(lambda done: _log_failure(done, task_uuid, stage))
        return future

    @contextlib.contextmanager
    def stage_if_slow(
        self, task_uuid: str, stage: Stage, document: dict[str, Any], delay_s: float = STAGE_WRITE_DELAY_S
    ) -> Iterator[None]:
        """Around an informational step (processing, uploading): its record is written only if the
        step is still running ``delay_s`` after it began. A short step costs no storage write; the
        final record carries its times either way."""
        timer = threading.Timer(delay_s, self._write_if_open, (task_uuid, stage, document))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def request_cancel(self, task_uuid: str, reason: str) -> None:
        self.write(task_uuid, "cancel", {"reason": reason})

    def cancel_requested(self, task_uuid: str) -> bool:
        """Whether the task's cancellation was asked for (one HEAD)."""
        try:
            self._client.head_object(Bucket=self._store.bucket, Key=self._key(task_uuid, "cancel"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def _read_stage(self, task_uuid: str, stage: Stage) -> dict[str, Any] | None:
        try:
            response = self._client.get_object(Bucket=self._store.bucket, Key=self._key(task_uuid, stage))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        document: dict[str, Any] = json.loads(response["Body"].read())
        return document

    def read(self, task_uuid: str, id_secret: bytes) -> TaskPublic | None:
        """The task's state, or None for an id this service did not issue and knows nothing of."""
        listing = self._client.list_objects_v2(Bucket=self._store.bucket, Prefix=f"{self._prefix}/{task_uuid}/")
        present = {item["Key"].rsplit("/", 1)[-1].removesuffix(".json") for item in listing.get("Contents", [])}
        documents = {stage: self._read_stage(task_uuid, stage) for stage in STAGES if stage in present}
        if (documents.get("result") or {}).get("status") != "success":
            # A success is recorded on the audio itself (see the module docstring); it outranks a
            # failure recorded before (a redelivery that succeeded after all).
            stored = self._stored_outcome(task_uuid)
            if stored is not None:
                documents["result"] = stored
        created_at = issued_at(task_uuid, id_secret)
        if not any(documents.values()):
            return (
                None if created_at is None else TaskPublic(task_uuid=task_uuid, status="queued", created_at=created_at)
            )
        task = TaskPublic(task_uuid=task_uuid, status="queued", created_at=created_at)
        if processing := documents.get("processing"):
            task.status = "processing"
            task.started_at = processing.get("started_at")
            task.engine = processing.get("engine")
        if documents.get("uploading"):
            task.status = "uploading"
        if result := documents.get("result"):
            task.status = result["status"]
            task.started_at = task.started_at or result.get("started_at")
            task.finished_at = result.get("finished_at")
            task.error_message = result.get("error_message")
            task.engine = result.get("engine") or task.engine
            task.timings = TaskTimings.model_validate(result.get("timings") or {})
            if result.get("s3_key") and result["status"] == "success":
                task.s3_url = self._store.url_for(result["s3_key"])
                task.audio = _audio_record(result)
        if webhook := documents.get("webhook"):
            task.webhook = WebhookRecord.model_validate(webhook)
            # The upload's duration is known only after the PUT that recorded the outcome: the
            # delivery record carries it.
            if task.timings.upload_s is None:
                task.timings.upload_s = webhook.get("upload_s")
        return task

    def _stored_outcome(self, task_uuid: str) -> dict[str, Any] | None:
        """The outcome recorded on the task's audio object, if it is stored."""
        key = self._store.find_audio(task_uuid)  # its extension is the format the task asked for
        metadata = None if key is None else self._store.metadata(key)
        if metadata is None:
            return None
        try:
            document: dict[str, Any] = json.loads(metadata[OUTCOME_METADATA_KEY])
        except (KeyError, ValueError):
            document = {}  # stored by an older version, or by hand: the audio is there all the same
        return {**document, "status": "success", "s3_key": key}

    def _write_if_open(self, task_uuid: str, stage: Stage, document: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the worker is shutting down: the record is informational
            self.write_async(task_uuid, stage, document)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _audio_record(result: dict[str, Any]) -> EncodedAudio | None:
    """The delivered audio's description; a WAV stored as the engine wrote it (or by an older
    version) is described by what its key says."""
    audio = result.get("audio")
    return EncodedAudio.model_validate(audio) if audio else None


def _log_failure(future: Future[None], task_uuid: str, stage: str) -> None:
    error = future.exception()
    if error is not None:
        logger.warning("task %s: could not record stage %s: %s", task_uuid, stage, error)
