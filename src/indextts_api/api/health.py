"""Dependency-aware health: Kafka, S3 and the engine, each timed, cached briefly so that a load
balancer polling every second does not load the broker or the bucket."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from indextts_api.config import Settings
from indextts_api.kafka import make_admin, replication_warnings
from indextts_api.schemas import CheckPublic
from indextts_api.storage import AudioStore, make_s3_client
from indextts_api.workers.heartbeat import heartbeat_prefix

CHECK_TIMEOUT_S = 2.0
# The topics' replication changes only when an operator changes it: checked this often.
REPLICATION_CHECK_S = 60.0


CheckResult = CheckPublic


class HealthChecker:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # Its own S3 client: short timeouts and no retries, so a down S3 is reported in seconds.
        client = make_s3_client(settings, connect_timeout_s=CHECK_TIMEOUT_S, read_timeout_s=CHECK_TIMEOUT_S, attempts=1)
        self._store = AudioStore(settings, client)
        self._admin = make_admin(settings)
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, CheckResult]] | None = None
        self._replication: tuple[float, list[str]] | None = None  # (checked at, warnings)
        self.live_engines: list[dict[str, Any]] = []  # what the TTS workers reported, freshest first

    def checks(self) -> dict[str, CheckResult]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self._settings.health_cache_s:
                return self._cached[1]
            results = {
                "kafka": _timed(self._check_kafka),
                "s3": _timed(self._check_s3),
                "engine": _timed(self._check_engine),
            }
            self._cached = (time.monotonic(), results)
            return results

    def _check_kafka(self) -> str:
        topic = self._settings.kafka_task_topic
        metadata = self._admin.list_topics(topic, timeout=CHECK_TIMEOUT_S)
        if metadata.topics[topic].error is not None:
            raise RuntimeError(f"topic {topic}: {metadata.topics[topic].error}")
        detail = (
            f"{len(metadata.brokers)} broker(s), topic {topic} has {len(metadata.topics[topic].partitions)} partitions"
        )
        warnings = self._replication_warnings()
        return detail + "".join(f"; warning: {warning}" for warning in warnings)

    def _replication_warnings(self) -> list[str]:
        """Topics that cannot survive the loss of a broker (still up: a warning in the detail)."""
        now = time.monotonic()
        if self._replication is None or now - self._replication[0] >= REPLICATION_CHECK_S:
            try:
                warnings = replication_warnings(self._settings, self._admin, CHECK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - an ACL may forbid describing configs
                warnings = [f"could not check the topics' replication ({type(exc).__name__})"]
            self._replication = (now, warnings)
        return self._replication[1]

    def _check_s3(self) -> str:
        self._store.client.head_bucket(Bucket=self._store.bucket)
        return f"bucket {self._store.bucket}"

    def _check_engine(self) -> str:
        """Up when at least one TTS worker reported within three heartbeat intervals."""
        listing = self._store.client.list_objects_v2(Bucket=self._store.bucket, Prefix=heartbeat_prefix(self._settings))
        fresh_after = time.time() - 3 * self._settings.heartbeat_interval_s
        live: list[dict[str, Any]] = []
        for item in listing.get("Contents", []):
            if item["LastModified"].timestamp() >= fresh_after:
                body = self._store.client.get_object(Bucket=self._store.bucket, Key=item["Key"])["Body"].read()
                live.append(json.loads(body))
        workers = sorted((w for w in live if w.get("role") == "tts-worker"), key=lambda w: -float(w.get("seen_at", 0)))
        self.live_engines = workers
        if not workers:
            raise RuntimeError(
                f"no TTS worker has reported in the last {3 * self._settings.heartbeat_interval_s:.0f} s"
            )
        engines = sorted({str(w.get("engine")) for w in workers})
        detail = f"{len(workers)} TTS worker(s), engine {', '.join(engines)}"
        stuck = sorted((w for w in workers if w.get("retrying_since")), key=lambda w: float(w["retrying_since"]))
        if stuck:
            oldest = stuck[0]
            detail += (
                f"; {len(stuck)} retrying a message, for {time.time() - float(oldest['retrying_since']):.0f} s "
                f"({oldest.get('host')}-{oldest.get('pid')}: {oldest.get('retrying_reason')})"
            )
        return detail


def _timed(check: Callable[[], str]) -> CheckResult:
    started = time.perf_counter()
    try:
        detail = check()
        status: Literal["up", "down"] = "up"
    except Exception as exc:  # noqa: BLE001 - any failure means: down, and says why
        detail, status = f"{type(exc).__name__}: {exc}", "down"
    return CheckResult(status=status, duration_ms=round((time.perf_counter() - started) * 1000, 2), detail=detail)
