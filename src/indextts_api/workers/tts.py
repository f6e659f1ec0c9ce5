"""TTS worker: task topic → prompt fetch → engine → spool → result topic, then commit."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import Message
from pydantic import ValidationError

from indextts_api import kafka
from indextts_api.config import Settings
from indextts_api.engines import Engine, LoadedEngine, SynthesisJob
from indextts_api.httpclient import make_http_client
from indextts_api.logs import bind_task
from indextts_api.metrics import AUDIO_SECONDS, PROMPT_FETCH_SECONDS, SYNTHESIS_SECONDS, TASKS_IN_FLIGHT
from indextts_api.prompts import PromptError, PromptFetcher, VoiceStoreUnavailable
from indextts_api.replies import ReplySender
from indextts_api.schemas import ResultMessage, TaskMessage, describe_validation_error, now
from indextts_api.spool import Spool, make_work_dir
from indextts_api.storage import AudioStore, make_s3_client
from indextts_api.tasks import TaskStateStore
from indextts_api.voices import VoiceStore
from indextts_api.workers.consumer import PartitionTenure, PausingConsumerLoop
from indextts_api.workers.failures import (
    FailurePolicy,
    PermanentError,
    TransientError,
    client_message,
    describe,
    redact_paths,
)
from indextts_api.workers.heartbeat import Heartbeat

logger = logging.getLogger(__name__)

# How long the prefetch's answer to "is this task's audio in S3?" stands in for the check before
# synthesis. Only a worker handling the same task at the same moment (a redelivery during a
# rebalance) could store it meanwhile, and a repeated synthesis is what at-least-once delivery
# allows anyway.
PREFETCHED_CHECK_VALID_S = 30.0
# Task ids this worker started, remembered so that a second handling here (a retry, a result the
# broker may or may not have stored) checks S3 first; more than the tasks it holds at any time.
REMEMBERED_TASKS = 4096


class TaskCanceled(Exception):
    """Raised between segments when the client canceled (an interactive client that disconnected)."""


class EngineGate:
    """One engine, two consumer loops: an interactive task takes the engine before any batch task
    waiting for it, so it waits at most for the synthesis in progress, never for a backlog."""

    def __init__(self) -> None:
        self._free = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0

    @contextlib.contextmanager
    def use(self, urgent: bool) -> Iterator[None]:
        with self._free:
            self._urgent_waiting += urgent
            try:
                while self._busy or (not urgent and self._urgent_waiting):
                    self._free.wait()
            finally:
                self._urgent_waiting -= urgent
            self._busy = True
        try:
            yield
        finally:
            with self._free:
                self._busy = False
                self._free.notify_all()


class _ReplyStream:
    """An interactive task's audio, sent to the reply topic segment by segment; between segments
    it looks whether the client canceled (one HEAD), and stops the synthesis if so."""

    def __init__(self, task_uuid: str, replies: ReplySender, states: TaskStateStore) -> None:
        self._task_uuid = task_uuid
        self._replies = replies
        self._states = states
        self._seq = 0

    def on_segment(self, samples: npt.NDArray[np.int16], sample_rate: int) -> None:
        self._seq = self._replies.audio(self._task_uuid, samples, sample_rate, self._seq)
        if self._states.cancel_requested(self._task_uuid):
            raise TaskCanceled("canceled: the client disconnected")


class TaskProcessor:
    """Everything one task needs, built once per process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        fetcher: PromptFetcher,
        spool: Spool,
        store: AudioStore,
        producer: kafka.SyncProducer,
        states: TaskStateStore,
        tenure: PartitionTenure,
        replies: ReplySender | None = None,
        gate: EngineGate | None = None,
    ) -> None:
        self._settings = settings
        self._replies = replies
        self._gate = gate or EngineGate()
        self._engine = engine
        self._fetcher = fetcher
        self._spool = spool
        self._store = store
        self._producer = producer
        self._states = states
        self._tenure = tenure
        # What the prefetch found: task id -> (audio in S3?, when checked); each answer is used
        # once, by the task's first handling here. Keyed, not one slot: the next task's prefetch
        # may finish before this task's handling reads its answer.
        self._prefetched_checks: dict[str, tuple[bool, float]] = {}
        self._checks_lock = threading.Lock()
        self._started: dict[str, None] = {}  # task ids handled here, oldest first
        # Directories of this host that an exception's text may name: never shown to a client.
        self._private_paths = [settings.data_dir, settings.prompt_dir, settings.model_dir, spool.work_dir]

    def handle(self, message: Message) -> Future[None] | None:
        """Synthesize one task and produce its result; returns the broker's acknowledgement to come
        (the loop commits the task once it arrives, and meanwhile starts the next synthesis)."""
        try:
            task = TaskMessage.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            return self._refuse_invalid(message, exc)
        may_be_stored = self._may_be_stored(message, task.task_uuid)
        self._remember(task.task_uuid)
        with bind_task(task.task_uuid), TASKS_IN_FLIGHT.labels("synthesis").track_inprogress():
            started_at = time.time()
            with self._states.stage_if_slow(
                task.task_uuid, "processing", {"started_at": started_at, "engine": self._engine.name}
            ):
                result = self._run(task, may_be_stored)
            result.started_at = started_at
        if task.interactive:
            self._announce(task, result)
        return self._send_result(result)

    def _announce(self, task: TaskMessage, result: ResultMessage) -> None:
        """The interactive client's last reply: done (its audio is all sent) or why not."""
        if self._replies is None:
            return
        if result.status == "success":
            self._replies.info(task.task_uuid, "done", {"audio_s": result.audio_s, "synthesis_s": result.synthesis_s})
        else:
            self._replies.info(
                task.task_uuid, "error", {"status": result.status, "error_message": result.error_message}
            )

    def _interactive_refusal(self, task: TaskMessage) -> ResultMessage | None:
        """An interactive task that nobody waits for any more: canceled, or older than the API's wait."""
        try:
            canceled = self._states.cancel_requested(task.task_uuid)
        except Exception as exc:
            raise TransientError(f"S3 unavailable: {exc}") from exc
        if canceled:
            return self._result(task, status="canceled", error_message="canceled before synthesis")
        if time.time() - task.timestamp > self._settings.interactive_timeout_s:
            return self._result(task, status="failed", error_message="expired: nobody waits for this audio any more")
        return None

    def _refuse_invalid(self, message: Message, error: ValidationError) -> Future[None] | None:
        """A task message that does not validate (another producer, an older version): dead letters,
        and, when it names its task and webhook, a failure webhook saying what was wrong."""
        kafka.dead_letter(self._producer, self._settings, message, f"invalid task message: {error}")
        try:
            fields = json.loads(message.value() or b"")
            task_uuid, hook_url = fields["task_uuid"], fields["hook_url"]
        except (ValueError, TypeError, KeyError):
            return None
        if not (isinstance(task_uuid, str) and isinstance(hook_url, str)):
            return None
        problems = "; ".join(describe_validation_error(dict(item)) for item in error.errors()[:3])
        return self._send_result(
            ResultMessage(
                task_uuid=task_uuid,
                hook_url=hook_url,
                status="failed",
                error_message=f"invalid task: {problems}",
                engine=self._engine.name,
                timestamp=now(),
            )
        )

    def give_up(self, message: Message, failure: BaseException) -> Future[None] | None:
        """Fail the task for good (failures.py decided): a failed result, hence its failure webhook;
        after an unexpected exception the message goes to the dead-letter topic too, with the reason."""
        try:
            task = TaskMessage.model_validate_json(message.value() or b"")
        except ValidationError:
            task = None
        if task is None or not isinstance(failure, PermanentError):
            kafka.dead_letter(self._producer, self._settings, message, f"task failed for good: {describe(failure)}")
        if task is None:
            return None
        error = redact_paths(client_message(failure), self._private_paths)
        logger.error("task %s failed for good: %s", task.task_uuid, describe(failure))
        result = self._result(task, status="failed", error_message=error)
        if task.interactive:
            self._announce(task, result)
        return self._send_result(result)

    def _send_result(self, result: ResultMessage) -> Future[None]:
        try:
            return self._producer.submit(
                self._settings.kafka_result_topic,
                result.task_uuid,
                result.model_dump_json(exclude_none=True).encode(),
            )
        except kafka.BrokerUnavailable as exc:
            raise TransientError(str(exc)) from exc

    def prefetch(self, message: Message) -> None:
        """Check the audio and fetch the prompts of the task that comes next while the engine works
        on this one, so neither S3 round trip waits in front of the engine."""
        task = TaskMessage.model_validate_json(message.value() or b"")
        if self._may_be_stored(message, task.task_uuid):
            stored = self._already_uploaded(task)
            checked_at = time.monotonic()
            with self._checks_lock:
                self._prefetched_checks = {
                    uuid: check
                    for uuid, check in self._prefetched_checks.items()
                    if checked_at - check[1] < PREFETCHED_CHECK_VALID_S  # unused: the task went to another worker
                }
                self._prefetched_checks[task.task_uuid] = (stored, checked_at)
        self._fetcher.fetch(task.spk_audio_prompt, "spk_audio_prompt")
        if task.params.emo_control_method == 1 and task.params.emo_audio_prompt:
            self._fetcher.fetch(task.params.emo_audio_prompt, "emo_audio_prompt")

    def _may_be_stored(self, message: Message, uuid: str) -> bool:
        """Whether another handling may have stored this task's audio: a redelivery (the message
        is older than this worker's hold on its partition) or a second handling here. A task
        queued while this worker held its partition needs no S3 round trip before synthesis."""
        return uuid in self._started or not self._tenure.produced_during(message)

    def _remember(self, uuid: str) -> None:
        self._started[uuid] = None
        if len(self._started) > REMEMBERED_TASKS:
            del self._started[next(iter(self._started))]

    def _audio_stored(self, task: TaskMessage) -> bool:
        """Whether the task's audio is in S3: the prefetch's answer if it has a recent one, else a HEAD."""
        with self._checks_lock:
            check = self._prefetched_checks.pop(task.task_uuid, None)
        if check is not None and time.monotonic() - check[1] < PREFETCHED_CHECK_VALID_S:
            return check[0]
        return self._already_uploaded(task)

    def _run(self, task: TaskMessage, may_be_stored: bool) -> ResultMessage:
        uuid = task.task_uuid
        if task.interactive:
            refusal = self._interactive_refusal(task)
            if refusal is not None:
                logger.info("task %s not synthesized: %s", uuid, refusal.error_message)
                return refusal
        elif may_be_stored and self._audio_stored(task):
            # A redelivered task whose audio is already stored: do not synthesize it again.
            logger.info("task %s already has its audio in S3; not synthesizing again", uuid)
            return self._result(task, status="success")
        started = time.monotonic()
        try:
            speaker = self._fetcher.fetch(task.spk_audio_prompt, "spk_audio_prompt")
            emotion = None
            if task.params.emo_control_method == 1 and task.params.emo_audio_prompt:
                emotion = self._fetcher.fetch(task.params.emo_audio_prompt, "emo_audio_prompt")
        except PromptError as exc:
            logger.info("task %s failed: %s", uuid, exc)
            return self._result(task, status="failed", error_message=str(exc))
        except VoiceStoreUnavailable as exc:
            raise TransientError(str(exc)) from exc
        fetched = time.monotonic()
        scratch = self._spool.scratch_path(uuid)
        try:
            job = SynthesisJob(uuid, task.text, speaker, emotion, task.params)
            stream = _ReplyStream(uuid, self._replies, self._states) if task.interactive and self._replies else None
            try:
                with self._gate.use(urgent=task.interactive):
                    engine_started = time.monotonic()  # the engine's time starts when it is ours
                    outcome = self._engine.synthesize(job, scratch, stream.on_segment if stream else None)
            except TaskCanceled as exc:
                logger.info("task %s: %s", uuid, exc)
                return self._result(task, status="canceled", error_message=str(exc))
            except Exception as exc:
                # An engine exception fails the task at once: a retry would fail the same way.
                logger.exception("task %s synthesis failed", uuid)
                message = redact_paths(f"synthesis failed: {type(exc).__name__}: {exc}", self._private_paths)
                return self._result(task, status="failed", error_message=message)
            synthesized = time.monotonic()
            try:
                audio_uri = self._spool.store(uuid, scratch)
            except Exception as exc:
                raise TransientError(f"could not spool audio: {exc}") from exc
        finally:
            scratch.unlink(missing_ok=True)
        SYNTHESIS_SECONDS.labels(self._engine.name).observe(synthesized - engine_started)
        AUDIO_SECONDS.labels(self._engine.name).observe(outcome.audio_seconds)
        PROMPT_FETCH_SECONDS.observe(fetched - started)
        logger.info(
            "task %s synthesized %.2f s of audio in %.2f s (prompt %.2f s, engine wait %.2f s)%s",
            uuid,
            outcome.audio_seconds,
            synthesized - engine_started,
            fetched - started,
            engine_started - fetched,
            f"; engine ignored: {'; '.join(outcome.ignored)}" if outcome.ignored else "",
        )
        return self._result(
            task,
            status="success",
            audio=audio_uri,
            fetch_s=round(fetched - started, 4),
            engine_wait_s=round(engine_started - fetched, 4),
            synthesis_s=round(synthesized - engine_started, 4),
            audio_s=round(outcome.audio_seconds, 4),
        )

    def _result(self, task: TaskMessage, **outcome: Any) -> ResultMessage:
        return ResultMessage(
            task_uuid=task.task_uuid,
            hook_url=task.hook_url,
            queued_at=task.timestamp,
            engine=self._engine.name,
            output=task.output,
            notify=task.notify,
            timestamp=now(),
            **outcome,
        )

    def _already_uploaded(self, task: TaskMessage) -> bool:
        try:
            return self._store.exists(self._store.key_for(task.task_uuid, task.output.spec.extension))
        except Exception as exc:
            raise TransientError(f"S3 unavailable: {exc}") from exc


class TaskBudget:
    """TTS_WORKER_MAX_TASKS: after that many tasks, stop taking more (the loop then commits what
    it handled and hands the rest back), so that a fresh process replaces this one."""

    def __init__(self, max_tasks: int, stop: threading.Event) -> None:
        self._left = max_tasks
        self._stop = stop
        self._lock = threading.Lock()  # both consumer loops (batch and interactive) count here
        self.spent = False

    def counted(self, handle: Callable[[Message], Future[None] | None]) -> Callable[[Message], Future[None] | None]:
        if self._left <= 0:
            return handle

        def handle_and_count(message: Message) -> Future[None] | None:
            acknowledged = handle(message)  # a retried failure raises and is not counted
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                logger.info("tts worker handled its TTS_WORKER_MAX_TASKS tasks; stopping for a fresh process")
                self.spent = True
                self._stop.set()
            return acknowledged

        return handle_and_count


def run_tts_worker(settings: Settings, loaded: LoadedEngine, stop: threading.Event) -> bool:
    """Run one TTS worker (one engine instance) until ``stop`` is set. True when it stopped because
    it reached TTS_WORKER_MAX_TASKS."""
    engine = loaded.engine
    logger.info("tts worker ready: engine %s (%s)", engine.name, engine.model_version)
    s3 = make_s3_client(settings)
    http = make_http_client(
        connect_timeout_s=settings.prompt_connect_timeout_s,
        read_timeout_s=settings.prompt_read_timeout_s,
        max_redirects=settings.prompt_max_redirects,
        allow_private=settings.private_urls_allowed,
    )
    # Results need no idempotent producer: a result duplicated by a produce retry is one more
    # redelivery, which at-least-once handling already absorbs (same S3 key; a repeated webhook is
    # allowed). It saves the broker a write per task, on every task's path.
    producer = kafka.SyncProducer(settings, idempotent=False)
    # Replies must arrive once and in order: an interactive client plays them as they come.
    reply_producer = kafka.SyncProducer(settings)
    store = AudioStore(settings, s3)
    states = TaskStateStore(settings, store)
    work_dir = make_work_dir(Path(settings.data_dir), "tts")
    tenure = PartitionTenure()
    processor = TaskProcessor(
        settings,
        engine,
        PromptFetcher(settings, http, VoiceStore(settings, s3)),
        Spool(settings.spool_location, s3, work_dir),
        store,
        producer,
        states,
        tenure,
        ReplySender(settings, reply_producer),
        EngineGate(),
    )
    budget = TaskBudget(settings.tts_worker_max_tasks, stop)
    # The fast lane: interactive tasks, in a loop (and consumer group) of their own, which take the
    # engine before the batch loop's next task (EngineGate).
    interactive = PausingConsumerLoop(
        kafka.make_consumer(settings, f"{settings.kafka_tts_consumer_group}_interactive"),
        settings.kafka_interactive_topic,
        budget.counted(processor.handle),
        stop,
        "tts-interactive",
        give_up=processor.give_up,
        policy=FailurePolicy(settings.unexpected_error_retries),
    )
    loop = PausingConsumerLoop(
        kafka.make_consumer(settings, settings.kafka_tts_consumer_group),
        settings.kafka_task_topic,
        budget.counted(processor.handle),
        stop,
        "tts-worker",
        give_up=processor.give_up,
        policy=FailurePolicy(settings.unexpected_error_retries),
        prefetch=processor.prefetch,
        tenure=tenure,
    )

    def status() -> dict[str, Any]:
        # A worker stuck on one message says so in /health (the engine check's detail).
        return {"retrying_since": loop.retrying.since, "retrying_reason": loop.retrying.reason}

    heartbeat = Heartbeat(settings, s3, store.bucket, {"role": "tts-worker", **loaded.details}, status).start()
    fast_lane = threading.Thread(target=interactive.run, name="tts-interactive")
    fast_lane.start()
    try:
        loop.run()
    finally:
        stop.set()
        fast_lane.join()
        heartbeat.stop()
        states.close()
        reply_producer.close()
        producer.close()
        http.close()
        engine.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    return budget.spent
