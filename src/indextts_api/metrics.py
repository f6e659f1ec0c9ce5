"""Prometheus metrics of every role, defined in one place.

In the all-in-one process tree (``all``), every process writes to PROMETHEUS_MULTIPROC_DIR and
the API's ``/metrics`` aggregates them (prometheus-client's multiprocess mode). A worker role run
on its own serves its metrics on METRICS_PORT.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from indextts_api.config import Settings

logger = logging.getLogger(__name__)

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

TASKS_ACCEPTED = Counter("indextts_tasks_accepted_total", "Tasks stored in Kafka by POST /generate")
REQUESTS_REFUSED = Counter("indextts_generate_refused_total", "POST /generate answered with an error", ["code"])
TASKS_FINISHED = Counter("indextts_tasks_finished_total", "Tasks finished, by outcome", ["status"])
SYNTHESIS_SECONDS = Histogram("indextts_synthesis_seconds", "Engine time per task", ["engine"], buckets=_SECONDS)
AUDIO_SECONDS = Histogram("indextts_audio_seconds", "Audio produced per task", ["engine"], buckets=_SECONDS)
PROMPT_FETCH_SECONDS = Histogram(
    "indextts_prompt_fetch_seconds", "Prompt download and check per task", buckets=_SECONDS
)
ENCODE_SECONDS = Histogram(
    "indextts_encode_seconds",
    "Upload worker's encoding time per task, by response format",
    ["format"],
    buckets=_SECONDS,
)
PROMPT_CACHE = Counter(
    "indextts_prompt_cache_total",
    "TTS workers' prompt lookups, by source (voice, url, path) and outcome (hit: no download, no decoding)",
    ["source", "outcome"],
)
VOICES_REGISTERED = Counter("indextts_voices_registered_total", "POST /voices, by outcome", ["outcome"])
UPLOADS = Counter("indextts_uploads_total", "Audio uploads to S3, by result", ["result"])
UPLOAD_SECONDS = Histogram("indextts_upload_seconds", "Upload time per task", buckets=_SECONDS)
WEBHOOK_DELIVERIES = Counter(
    "indextts_webhook_deliveries_total", "Webhook attempts, by result and attempt number", ["result", "attempt"]
)
TASKS_IN_FLIGHT = Gauge(
    "indextts_tasks_in_flight", "Tasks being worked on now, by stage", ["stage"], multiprocess_mode="livesum"
)
MESSAGE_FAILURES = Counter(
    "indextts_message_failures_total",
    "Failed handlings of a message, by worker role and kind (transient, permanent, unexpected)",
    ["role", "kind"],
)
MESSAGES_RETRYING = Gauge(
    "indextts_messages_retrying",
    "Messages a worker is retrying now (a worker stuck on one shows here)",
    ["role"],
    multiprocess_mode="livesum",
)
CONSUMER_LAG = Gauge(
    "indextts_kafka_consumer_lag",
    "Messages not yet committed by the group",
    ["topic", "group"],
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of the whole tree in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a dead process's live gauges (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class LagMonitor:
    """Consumer lag per topic and group (high watermark minus committed offset), measured in the
    background while someone reads /metrics. Standard Kafka APIs; brokers that under-report
    watermarks (Tansu, see DESIGN.md) show less lag than there is.

    A measurement asks the broker for every partition's watermarks and committed offsets (96
    partitions by default: on the embedded Tansu about 200 object-store LISTs and 100 GETs, whose
    cost grows with the topics' history). So it runs only while /metrics is scraped: each scrape
    (``wanted``) asks for a figure at most LAG_INTERVAL_S old, and with no scrape for
    IDLE_AFTER_INTERVALS intervals the broker is left alone. A scrape never waits for the broker,
    except the first one, which waits up to FIRST_WAIT_S so that the family is there at once.

    Committed offsets are read with a consumer of each group that never subscribes (an OffsetFetch,
    no group membership). librdkafka's admin ListConsumerGroupOffsets aborted the process with an
    internal assertion while the broker was down, so it is not used.
    """

    IDLE_AFTER_INTERVALS = 4
    FIRST_WAIT_S = 5.0

    def __init__(self, settings: Settings) -> None:
        from indextts_api.kafka import client_config

        self._settings = settings
        retry_group = f"{settings.kafka_upload_consumer_group}_webhook_retries"
        self._pairs = [
            (settings.kafka_task_topic, settings.kafka_tts_consumer_group),
            (settings.kafka_result_topic, settings.kafka_upload_consumer_group),
            *((topic, retry_group) for topic in settings.webhook_retry_topics),
        ]
        self._readers = {
            group: Consumer({**client_config(settings), "group.id": group, "enable.auto.commit": False})
            for group in {group for _, group in self._pairs}
        }
        self._wanted_at: float | None = None  # monotonic time of the last scrape
        self._measured_at: float | None = None  # monotonic time the last measurement began
        self._measured = threading.Event()  # set once a first measurement is done
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-monitor", daemon=True)
        self.measurements = 0  # how many times the broker was asked (tests, logs)

    def start(self) -> LagMonitor:
        self._thread.start()
        return self

    def wanted(self) -> None:
        """A scrape: keep the figures fresh from now on; the first scrape waits for a first figure."""
        now = time.monotonic()
        self._wanted_at = now
        if self._measured_at is None or now - self._measured_at >= self._settings.lag_interval_s:
            self._wake.set()
        if not self._measured.is_set():
            self._measured.wait(self.FIRST_WAIT_S)

    def _run(self) -> None:
        interval = self._settings.lag_interval_s
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if self._wanted_at is None or now - self._wanted_at > self.IDLE_AFTER_INTERVALS * interval:
                continue  # nobody reads the figures
            self._measured_at = now
            self.measurements += 1
            for topic, group in self._pairs:
                try:
                    CONSUMER_LAG.labels(topic, group).set(self.lag(topic, group))
                except (KafkaException, RuntimeError, ValueError, KeyError) as exc:
                    logger.debug("lag of %s/%s unavailable: %s", group, topic, exc)
            self._measured.set()

    def lag(self, topic: str, group: str) -> int:
        reader = self._readers[group]
        metadata = reader.list_topics(topic, timeout=5)
        partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        total = 0
        for committed in reader.committed(partitions, timeout=5):
            low, high = reader.get_watermark_offsets(committed, timeout=5, cached=False)
            total += max(0, high - (committed.offset if committed.offset >= 0 else low))
        return total

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=20)
        for reader in self._readers.values():
            reader.close()
