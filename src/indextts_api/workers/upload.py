"""Upload worker: result topic → audio into S3 → spool cleanup → webhook (or its durable retry), then commit.

It handles UPLOAD_CONCURRENCY results at once, so a slow S3 request or webhook receiver holds one
slot only, and in a second consumer it runs the due webhook retries.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import soundfile
from confluent_kafka import Message
from pydantic import ValidationError

from indextts_api import kafka
from indextts_api.audio_formats import AudioOutput, EncodedAudio, describe_wav, encode
from indextts_api.config import Settings
from indextts_api.httpclient import make_http_client
from indextts_api.logs import bind_task
from indextts_api.metrics import (
    ENCODE_SECONDS,
    TASKS_FINISHED,
    TASKS_IN_FLIGHT,
    UPLOAD_SECONDS,
    UPLOADS,
    WEBHOOK_DELIVERIES,
)
from indextts_api.replies import ReplySender
from indextts_api.schemas import ResultMessage, WebhookPayload
from indextts_api.spool import Spool, SpoolError, make_work_dir
from indextts_api.storage import AudioStore, make_s3_client
from indextts_api.tasks import TaskStateStore, outcome_metadata
from indextts_api.webhooks import WebhookRetrier, attempt_delivery, due_at, schedule_retry, webhook_document
from indextts_api.workers.concurrent import ConcurrentConsumerLoop
from indextts_api.workers.failures import (
    FailurePolicy,
    PermanentError,
    TransientError,
    client_message,
    describe,
    redact_paths,
)

logger = logging.getLogger(__name__)


class ResultProcessor:
    def __init__(
        self,
        settings: Settings,
        store: AudioStore,
        spool: Spool,
        http: httpx.Client,
        producer: kafka.SyncProducer,
        states: TaskStateStore,
    ) -> None:
        self._settings = settings
        self._store = store
        self._spool = spool
        self._http = http
        self._producer = producer
        self._states = states
        self._replies = ReplySender(settings, producer)

    def handle(self, message: Message) -> None:
        try:
            result = ResultMessage.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            kafka.dead_letter(self._producer, self._settings, message, f"invalid result message: {exc}")
            return
        with bind_task(result.task_uuid), TASKS_IN_FLIGHT.labels("upload").track_inprogress():
            self._finish(message, result)

    def _finish(self, message: Message, result: ResultMessage) -> None:
        uuid = result.task_uuid
        if result.status == "canceled":
            self._record_canceled(result)
            return
        started = time.monotonic()
        # The outcome is recorded before the client is told: a client that reads GET /tasks/{id}
        # on receiving its webhook sees the same outcome. A success is recorded by the upload
        # itself (the audio object's metadata), a failure by its own document.
        with self._states.stage_if_slow(uuid, "uploading", {"uploading_at": time.time()}):
            payload = self._payload(result)
        upload_s = round(time.monotonic() - started, 4) if result.status == "success" else None
        if payload.status == "failed":
            try:
                self._states.write(uuid, "result", _outcome_document(result, payload, self._store))
            except Exception as exc:
                raise TransientError(f"could not record the outcome: {exc}") from exc
        latency = f"; {time.time() - result.queued_at:.3f} s since queued" if result.queued_at else ""
        if result.notify:
            self._replies.info(uuid, "finished", {"status": payload.status})  # a Prefer: wait request
        if not result.hook_url:  # an interactive task: its client had the audio streamed
            TASKS_FINISHED.labels(payload.status).inc()
            logger.info("task %s %s (interactive, no webhook)%s", uuid, payload.status, latency)
            return
        delivery = attempt_delivery(self._http, self._settings, result.hook_url, payload)
        WEBHOOK_DELIVERIES.labels("delivered" if delivery.delivered else "failed", "1").inc()
        self._states.write_async(uuid, "webhook", webhook_document(1, delivery, upload_s))
        TASKS_FINISHED.labels(payload.status).inc()
        if delivery.delivered:
            logger.info("task %s %s; webhook delivered%s", uuid, payload.status, latency)
            return
        # The offset is committed only once the retry is stored: a restart forgets nothing.
        try:
            scheduled = not delivery.permanent and schedule_retry(
                self._producer, self._settings, result.hook_url, payload, 1, delivery.error, upload_s
            )
        except kafka.BrokerUnavailable as exc:
            raise TransientError(f"could not schedule the webhook retry: {exc}") from exc
        if not scheduled:
            kafka.dead_letter(self._producer, self._settings, message, f"webhook not delivered: {delivery.error}")

    def _record_canceled(self, result: ResultMessage) -> None:
        """A canceled task: nothing is uploaded, its status says canceled, no webhook."""
        document = {
            "status": "canceled",
            "started_at": result.started_at,
            "finished_at": time.time(),
            "error_message": result.error_message,
            "engine": result.engine,
            "timings": {"fetch_s": result.fetch_s},
        }
        try:
            self._states.write(result.task_uuid, "result", document)
        except Exception as exc:
            raise TransientError(f"could not record the outcome: {exc}") from exc
        if result.audio:
            self._spool.discard(result.audio)
        if result.notify:
            self._replies.info(result.task_uuid, "finished", {"status": "canceled"})
        TASKS_FINISHED.labels("canceled").inc()
        logger.info("task %s canceled: %s", result.task_uuid, result.error_message)

    def give_up(self, message: Message, failure: BaseException) -> None:
        """A result whose handling failed for good (failures.py decided): the client is told the task
        failed (one attempt: what broke may be the delivery itself), GET /tasks shows it, and the
        message goes to the dead-letter topic with the reason."""
        kafka.dead_letter(self._producer, self._settings, message, f"result failed for good: {describe(failure)}")
        try:
            result = ResultMessage.model_validate_json(message.value() or b"")
        except ValidationError:
            return
        error = redact_paths(client_message(failure), [self._settings.data_dir])
        payload = WebhookPayload(
            task_uuid=result.task_uuid, status="failed", timestamp=int(time.time()), error_message=error
        )
        try:
            self._states.write(result.task_uuid, "result", _outcome_document(result, payload, self._store))
        except Exception as exc:  # noqa: BLE001 - the client's webhook matters more than the status record
            logger.warning("task %s: could not record its failure: %s", result.task_uuid, exc)
        TASKS_FINISHED.labels("failed").inc()
        if result.notify:
            self._replies.info(result.task_uuid, "finished", {"status": "failed"})
        if result.hook_url:
            delivery = attempt_delivery(self._http, self._settings, result.hook_url, payload)
            self._states.write_async(result.task_uuid, "webhook", webhook_document(1, delivery))

    def _payload(self, result: ResultMessage) -> WebhookPayload:
        stamp = int(time.time())
        if result.status == "failed":
            return WebhookPayload(
                task_uuid=result.task_uuid,
                status="failed",
                timestamp=stamp,
                error_message=result.error_message or "synthesis failed",
            )
        key = self._store.key_for(result.task_uuid, result.output.spec.extension)
        success = WebhookPayload(
            task_uuid=result.task_uuid, status="success", timestamp=stamp, s3_url=self._store.url_for(key)
        )
        started = time.monotonic()
        try:
            if result.audio:
                success.audio = self._store_audio(result, success, key)
            elif not self._store.exists(key):
                raise SpoolError("result carries no audio and none is stored")
        except SpoolError as exc:
            # The audio is gone (e.g. a redelivered result after cleanup) unless it already reached S3.
            if not self._exists(key):
                logger.error("task %s: %s", result.task_uuid, exc)
                return WebhookPayload(
                    task_uuid=result.task_uuid,
                    status="failed",
                    timestamp=stamp,
                    error_message="the synthesized audio was lost before upload; please resubmit",
                )
        except PermanentError:
            UPLOADS.labels("error").inc()
            raise
        except Exception as exc:
            UPLOADS.labels("error").inc()
            raise TransientError(f"S3 upload failed: {exc}") from exc
        UPLOADS.labels("success").inc()
        UPLOAD_SECONDS.observe(time.monotonic() - started)
        if result.audio:
            self._spool.discard(result.audio)  # S3 has it now; a redelivery finds it there
        logger.info("task %s uploaded %s in %.3f s", result.task_uuid, key, time.monotonic() - started)
        if result.output.is_default:
            success.audio = None  # the spec's payload, exactly, for a task that asked for nothing else
        return success

    def _store_audio(self, result: ResultMessage, success: WebhookPayload, key: str) -> EncodedAudio | None:
        """The spooled audio into S3 at ``key``, encoded first if the task asked for a format other
        than the engine's WAV; returns what was delivered (None: the WAV as it came, not read)."""
        assert result.audio is not None
        output = result.output
        if output.is_default:
            document = _outcome_document(result, success, self._store, key, None)
            self._spool.transfer(result.audio, self._store, key, outcome_metadata(document))
            return None
        with self._spool.local_copy(result.audio) as source:
            scratch = self._spool.work_dir / f".{result.task_uuid}.{time.monotonic_ns()}.{output.spec.extension}"
            try:
                encoded = self._encode(source, scratch, output)
                document = _outcome_document(result, success, self._store, key, encoded)
                self._store.upload_file(scratch, key, outcome_metadata(document), encoded.content_type)
            finally:
                scratch.unlink(missing_ok=True)
        return encoded

    def _encode(self, source: Path, target: Path, output: AudioOutput) -> EncodedAudio:
        started = time.monotonic()
        try:
            if not output.needs_encoding(soundfile.info(str(source)).samplerate):
                shutil.copyfile(source, target)  # a WAV at the engine's own rate: nothing to convert
                return describe_wav(target)
            encoded = encode(source, target, output)
        except (RuntimeError, ValueError, TypeError, OSError, MemoryError) as exc:
            # soundfile's LibsndfileError is a RuntimeError; the same audio would fail the same way.
            detail = exc.error_string if isinstance(exc, soundfile.LibsndfileError) else type(exc).__name__
            raise PermanentError(f"the audio could not be encoded as {output.response_format}: {detail}") from exc
        ENCODE_SECONDS.labels(output.response_format).observe(time.monotonic() - started)
        return encoded

    def _exists(self, key: str) -> bool:
        try:
            return self._store.exists(key)
        except Exception as exc:
            raise TransientError(f"S3 unavailable: {exc}") from exc


def _outcome_document(
    result: ResultMessage,
    payload: WebhookPayload,
    store: AudioStore,
    key: str | None = None,
    encoded: EncodedAudio | None = None,
) -> dict[str, object]:
    """What GET /tasks shows of the outcome (the upload's duration comes with the delivery record)."""
    output = result.output
    audio = encoded or EncodedAudio(response_format=output.response_format, content_type=output.spec.content_type)
    return {
        "status": payload.status,
        "started_at": result.started_at,
        "finished_at": time.time(),
        "error_message": payload.error_message,
        "s3_key": (key or store.key_for(result.task_uuid, output.spec.extension))
        if payload.status == "success"
        else None,
        "audio": audio.model_dump(exclude_none=True) if payload.status == "success" else None,
        "engine": result.engine,
        "timings": {
            "fetch_s": result.fetch_s,
            "engine_wait_s": result.engine_wait_s,
            "synthesis_s": result.synthesis_s,
            "audio_s": result.audio_s,
        },
    }


def run_upload_worker(settings: Settings, stop: threading.Event) -> None:
    """Run one upload worker (results and webhook retries) until ``stop`` is set."""
    s3 = make_s3_client(settings)
    store = AudioStore(settings, s3)
    http = make_http_client(
        connect_timeout_s=5.0, read_timeout_s=settings.webhook_timeout_s, allow_private=settings.private_urls_allowed
    )
    producer = kafka.SyncProducer(settings)
    work_dir = make_work_dir(Path(settings.data_dir), "upload")
    states = TaskStateStore(settings, store)
    processor = ResultProcessor(settings, store, Spool(settings.spool_location, s3, work_dir), http, producer, states)
    results = ConcurrentConsumerLoop(
        kafka.make_consumer(settings, settings.kafka_upload_consumer_group),
        [settings.kafka_result_topic],
        processor.handle,
        stop,
        "upload-worker",
        settings.upload_concurrency,
        give_up=processor.give_up,
        policy=FailurePolicy(settings.unexpected_error_retries),
    )
    retrier = WebhookRetrier(settings, http, producer, states)
    retries = ConcurrentConsumerLoop(
        kafka.make_consumer(settings, f"{settings.kafka_upload_consumer_group}_webhook_retries", relaxed=True),
        settings.webhook_retry_topics,
        retrier.handle,
        stop,
        "webhook-retries",
        settings.webhook_retry_concurrency,
        give_up=retrier.give_up,
        policy=FailurePolicy(settings.unexpected_error_retries),
        due_at=due_at,
    )
    retry_thread = threading.Thread(target=retries.run, name="webhook-retries")
    logger.info("upload worker ready: bucket %s", store.bucket)
    retry_thread.start()
    try:
        results.run()
    finally:
        stop.set()
        retry_thread.join()
        states.close()
        producer.close()
        http.close()
        shutil.rmtree(work_dir, ignore_errors=True)
