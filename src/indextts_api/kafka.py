"""The one Kafka wrapper: client configuration, topic creation, producers and consumers.

Every role builds its clients here, so the delivery guarantees (idempotent producer, acks=all,
manual commits, earliest offset for new groups) and the latency tuning live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from indextts_api.config import KAFKA_DEFAULTS, KafkaTuning, Settings
from indextts_api.infra.embedded import TANSU_TUNING

logger = logging.getLogger(__name__)

Consumer = _Consumer


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge a message: it was not stored."""


class OutcomeUnknown(BrokerUnavailable):
    """No acknowledgement came in time after the message was sent: it may have been stored."""


def tuning(settings: Settings) -> KafkaTuning:
    """The client tuning in force: the embedded broker's (KAFKA_PROFILE=embedded, or auto with no
    KAFKA_BOOTSTRAP_SERVERS) or Kafka's defaults, with the KAFKA_*_MS overrides applied."""
    embedded = settings.kafka_profile == "embedded" or (settings.kafka_profile == "auto" and settings.kafka_embedded)
    base = TANSU_TUNING if embedded else KAFKA_DEFAULTS
    fetch_wait = settings.kafka_fetch_wait_max_ms
    return dataclasses.replace(
        base,
        session_timeout_ms=settings.kafka_session_timeout_ms or base.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms or base.heartbeat_interval_ms,
        fetch_wait_max_ms=base.fetch_wait_max_ms if fetch_wait is None else fetch_wait,
        delivery_timeout_ms=settings.kafka_delivery_timeout_ms,
    )


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by every client (bootstrap servers and security)."""
    if settings.kafka_bootstrap_servers is None:
        raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set and no embedded broker was started")
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "logger": _librdkafka_logger,  # its log lines go through our logging, not raw to stderr
    }
    if settings.kafka_security_protocol:
        config["security.protocol"] = settings.kafka_security_protocol
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        config["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    return config


# librdkafka's own log lines repeat every reconnect attempt; errors reach us through error_cb.
_librdkafka_logger = logging.getLogger("librdkafka")
_librdkafka_logger.setLevel(logging.CRITICAL)
_last_reported: dict[int, float] = {}
_REPORT_EVERY_S = 10.0


# Told when librdkafka reports that no broker is reachable (the API's producer refuses at once).
_ALL_BROKERS_DOWN_LISTENERS: list[Callable[[], None]] = []


def _log_client_error(error: KafkaError) -> None:
    # librdkafka reconnects by itself; an outage is reported, once per kind every few seconds.
    if error.code() == KafkaError._ALL_BROKERS_DOWN:
        for listener in list(_ALL_BROKERS_DOWN_LISTENERS):
            listener()
    now = time.monotonic()
    if now - _last_reported.get(error.code(), -_REPORT_EVERY_S) >= _REPORT_EVERY_S:
        _last_reported[error.code()] = now
        logger.warning("kafka client: %s", error)


def make_producer(settings: Settings, *, linger_ms: int = 1, idempotent: bool = True) -> Producer:
    """A producer with acks=all: a delivered message is durable. An ``idempotent`` one also never
    duplicates a message by retrying it (the broker then stores the producer's sequence numbers:
    on Tansu one more S3 write per request, 3 instead of 2, +1.2 ms, measured)."""
    return Producer(
        {
            **client_config(settings),
            "enable.idempotence": idempotent,
            "acks": "all",
            "linger.ms": linger_ms,
            # librdkafka's own verdict arrives within this time: a send is either acked or failed.
            # Longer than a broker failover (acks=all writes stall ~10 s while a cluster fences a
            # dead broker), so a task that the cluster stores is not reported as refused.
            "message.timeout.ms": tuning(settings).delivery_timeout_ms,
            "error_cb": _log_client_error,
        }
    )


# For consumers whose messages are due seconds from now (webhook retries): a fraction of the
# broker's load, whatever the profile's wait.
RELAXED_FETCH_WAIT_MS = 500


def make_consumer(settings: Settings, group_id: str, *, relaxed: bool = False) -> Consumer:
    """A consumer with manual commits that starts a new group at the earliest offset, tuned for
    the broker (``tuning``)."""
    tuned = tuning(settings)
    fetch_wait = max(tuned.fetch_wait_max_ms, RELAXED_FETCH_WAIT_MS) if relaxed else tuned.fetch_wait_max_ms
    return Consumer(
        {
            **client_config(settings),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A group that starts fresh must see tasks queued before any worker joined.
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": tuned.session_timeout_ms,
            "heartbeat.interval.ms": tuned.heartbeat_interval_ms,
            "fetch.wait.max.ms": fetch_wait,
            "fetch.queue.backoff.ms": 5,
            "error_cb": _log_client_error,
        }
    )


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create the task, result, dead-letter and webhook retry topics if they do not exist, and warn
    about those that cannot survive the loss of a broker."""
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [name for name in service_topics(settings) if name not in existing]
    if missing:
        _create_topics(settings, admin, missing, timeout_s)
    try:
        for problem in replication_warnings(settings, admin, timeout_s):
            logger.warning("%s", problem)
    except KafkaException as exc:  # a warning only: an ACL may forbid describing configs
        logger.warning("could not check the topics' replication: %s", exc)


def _create_topics(settings: Settings, admin: AdminClient, missing: list[str], timeout_s: float) -> None:
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=settings.kafka_topic_partitions,
                # -1: the cluster's default.replication.factor, unless the operator sets one.
                replication_factor=settings.kafka_replication_factor or -1,
            )
            for name in missing
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            logger.info("created topic %s (%d partitions)", name, settings.kafka_topic_partitions)
        except KafkaException as exc:
            # Another process may have created it between our listing and our request.
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def service_topics(settings: Settings) -> list[str]:
    return [
        settings.kafka_task_topic,
        settings.kafka_interactive_topic,
        settings.kafka_reply_topic,
        settings.kafka_result_topic,
        settings.kafka_dead_letter_topic,
        *settings.webhook_retry_topics,
    ]


def replication_problem(topic: str, replicas: int, min_insync: int, brokers: int) -> str | None:
    """Why ``topic`` cannot survive the loss of one broker of a multi-broker cluster, if it cannot."""
    if brokers < 2:
        return None  # a single broker: nothing to fail over to (the embedded one, a trial cluster)
    if replicas < 2:
        return f"topic {topic} has 1 replica: losing the broker that holds a partition loses its tasks"
    if min_insync >= replicas:
        return (
            f"topic {topic} has {replicas} replicas and min.insync.replicas={min_insync}: "
            "acks=all writes stop while one broker is down"
        )
    if min_insync < 2:
        return f"topic {topic} has min.insync.replicas=1: an acknowledged task may be on one broker only"
    return None


def replication_warnings(settings: Settings, admin: AdminClient, timeout_s: float = 10.0) -> list[str]:
    """The service's topics that cannot survive the loss of one broker (empty on one broker)."""
    metadata = admin.list_topics(timeout=timeout_s)
    if len(metadata.brokers) < 2:
        return []
    present = [name for name in service_topics(settings) if name in metadata.topics]
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in present]
    configs = admin.describe_configs(resources, request_timeout=timeout_s) if resources else {}
    problems = []
    for resource, future in configs.items():
        entries = future.result(timeout=timeout_s)
        min_insync = int(entries["min.insync.replicas"].value)
        partitions = metadata.topics[resource.name].partitions.values()
        replicas = min((len(partition.replicas) for partition in partitions), default=0)
        problem = replication_problem(resource.name, replicas, min_insync, len(metadata.brokers))
        if problem:
            problems.append(problem)
    return problems


def is_fatal(error: KafkaError) -> bool:
    """An error after which this producer instance can never deliver again (e.g. fenced)."""
    return bool(error.fatal()) or error.code() == KafkaError.PRODUCER_FENCED


class _ServedProducer:
    """One librdkafka producer and the thread that serves its delivery reports.

    After a fatal error (an idempotent producer fenced by a restarted broker, say) librdkafka's
    producer is unusable for good: a delivery report says so with ``mark_broken``, and this thread
    replaces it with a new one (the messages it failed have been reported as failed already).
    """

    def __init__(self, name: str, make: Callable[[], Producer]) -> None:
        self._make = make
        self.producer = make()
        self._broken: Producer | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kafka-{name}", daemon=True)
        self._thread.start()

    def mark_broken(self, producer: Producer) -> None:
        """Called from a delivery report: ``producer`` failed for good (a no-op once replaced)."""
        self._broken = producer

    def after_poll(self) -> None:
        """Run by the serving thread after each poll (and on close)."""

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(0.05)
            self.after_poll()
            broken = self._broken
            if broken is not None and broken is self.producer:
                self.producer = self._make()  # only this thread swaps them
                logger.warning("producer failed for good; started a new one")
                broken.purge()
                broken.poll(0)
                broken.close()

    def close(self, timeout_s: float) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        remaining = self.producer.flush(timeout_s)
        self.after_poll()
        if remaining:
            logger.error("%d messages were not acknowledged before shutdown", remaining)
        self.producer.close()


# Kafka message headers, as confluent-kafka takes them.
Headers = dict[str, str | bytes | None]


class SyncProducer:
    """A producer for worker threads (idempotent unless told otherwise): ``submit`` returns a
    future the broker's acknowledgement completes, ``send`` waits for it."""

    def __init__(self, settings: Settings, *, idempotent: bool = True) -> None:
        self._served = _ServedProducer("producer", lambda: make_producer(settings, idempotent=idempotent))
        # librdkafka's verdict comes within its delivery timeout; a little more for the report.
        self._verdict_timeout_s = tuning(settings).delivery_timeout_ms / 1000 + 5

    def submit(self, topic: str, key: str, value: bytes, headers: Headers | None = None) -> Future[None]:
        """Produce one message; the future completes once it is stored, or fails with BrokerUnavailable
        (within the producer's delivery timeout, KAFKA_DELIVERY_TIMEOUT_MS)."""
        producer = self._served.producer
        acknowledged: Future[None] = Future()

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                acknowledged.set_result(None)
                return
            if is_fatal(error):
                self._served.mark_broken(producer)
            acknowledged.set_exception(BrokerUnavailable(f"broker refused message for {topic}: {error}"))

        try:
            producer.produce(topic, key=key.encode(), value=value, headers=headers, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            raise BrokerUnavailable(f"cannot produce to {topic}: {exc}") from exc
        return acknowledged

    def send(self, topic: str, key: str, value: bytes) -> None:
        """Produce one message and block until it is stored, or raise BrokerUnavailable."""
        try:
            self.submit(topic, key, value).result(timeout=self._verdict_timeout_s)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no acknowledgement from the broker for {topic} within {self._verdict_timeout_s:.0f} s"
            ) from exc

    def close(self, timeout_s: float = 10.0) -> None:
        self._served.close(timeout_s)


class PartitionSpreader:
    """Which partition the next task goes to: the same one for a few messages or milliseconds,
    then the next one, round robin.

    Every partition batch the broker receives is a storage write (an S3 object for the embedded
    Tansu), so spreading each burst over all partitions by key hash costs a write per message;
    filling one partition's batch at a time costs one per batch, and round robin still shares the
    tasks evenly among the partitions (and so the TTS workers) over any longer stretch. Tasks are
    independent, so no ordering by key is lost. Until the partition count is known: the key hash.
    """

    def __init__(self, batch_messages: int = 1000, batch_s: float = 0.02) -> None:
        self._batch_messages = batch_messages
        self._batch_s = batch_s
        self.partition_counts: dict[str, int] = {}  # replaced whole by the metadata refresh
        self._current: dict[str, tuple[int, int, float]] = {}  # topic -> (partition, sent, since)

    def next(self, topic: str) -> int:
        count = self.partition_counts.get(topic, 0)
        if count <= 0:
            return -1  # librdkafka's own partitioner (by key)
        now = time.monotonic()
        partition, sent, since = self._current.get(topic, (random.randrange(count), 0, now))
        if sent >= self._batch_messages or now - since >= self._batch_s or partition >= count:
            partition, sent, since = (partition + 1) % count, 0, now
        self._current[topic] = (partition, sent + 1, since)
        return partition


class _Lane(_ServedProducer):
    """A served producer whose delivery verdicts reach the event loop in one wake-up per poll."""

    def __init__(self, name: str, make: Callable[[], Producer]) -> None:
        # Verdicts collected during one poll, handed to the event loop together.
        self._verdicts: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        super().__init__(name, make)

    def report(self, future: asyncio.Future[None], error: KafkaError | None) -> None:
        """Called by librdkafka's delivery callback, on the thread that polls."""
        self._verdicts.append((future, error))

    def after_poll(self) -> None:
        if not self._verdicts:
            return
        verdicts, self._verdicts = self._verdicts, []
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            verdicts[0][0].get_loop().call_soon_threadsafe(_settle_all, verdicts)


class AsyncProducer:
    """An idempotent producer for asyncio code: ``await send(...)`` returns once the broker acked.

    Background threads serve librdkafka's delivery reports and resolve one future per message,
    so concurrent requests share batches instead of each paying for a blocking flush.
    (confluent-kafka's own experimental AIOProducer buffers in Python and checks its buffer at
    most every 100 ms, which would add that much latency to every lone request.)

    Two lanes, like Nagle's algorithm: a request that arrives while no other is waiting for the
    broker is sent at once (linger 0); requests that arrive while others wait are lingered for a
    few milliseconds and stored in one batch, one storage write for many tasks (measured here:
    the accept rate more than doubled, while a lone request pays no linger at all).
    """

    BATCH_LINGER_MS = 5
    METADATA_REFRESH_S = 30.0
    # While librdkafka reports every broker down, the metadata thread probes this often, so that
    # requests are refused at once during an outage and accepted again as soon as it ends.
    DOWN_PROBE_S = 1.0
    # The request waits this much longer than librdkafka's own delivery timeout for its verdict.
    VERDICT_MARGIN_S = 2.0

    def __init__(self, settings: Settings) -> None:
        def lane(linger_ms: int) -> Callable[[], Producer]:
            return lambda: make_producer(settings, linger_ms=linger_ms)

        self._delivery_timeout_s = tuning(settings).delivery_timeout_ms / 1000
        # Since when librdkafka has said that no broker is reachable (None: reachable, as far as
        # we know). A message produced meanwhile can only sit in librdkafka's queue: not stored.
        self._brokers_down_since: float | None = None
        _ALL_BROKERS_DOWN_LISTENERS.append(self._on_all_brokers_down)
        self._express = _Lane("express", lane(0))
        self._batch = _Lane("batch", lane(self.BATCH_LINGER_MS))
        self._waiting = 0  # requests waiting for the broker (touched on the event loop only)
        self._spreader = PartitionSpreader()
        self._stopping = threading.Event()
        self._probe_now = threading.Event()  # wakes the metadata thread (an outage, or stopping)
        self._metadata = threading.Thread(target=self._refresh_metadata, name="kafka-metadata", daemon=True)
        self._metadata.start()

    def _on_all_brokers_down(self) -> None:
        if self._brokers_down_since is None:
            self._brokers_down_since = time.monotonic()
        self._probe_now.set()  # the metadata thread may be in its 30 s wait: probe every second now

    def _refresh_metadata(self) -> None:
        while True:
            try:
                topics = self._batch.producer.list_topics(timeout=5).topics
                self._brokers_down_since = None  # a broker answered
                self._spreader.partition_counts = {
                    name: len(metadata.partitions) for name, metadata in topics.items() if metadata.error is None
                }
            except KafkaException as exc:
                logger.debug("no topic metadata yet: %s", exc)
            if self._brokers_down_since is not None:
                wait_s = self.DOWN_PROBE_S
            else:
                wait_s = self.METADATA_REFRESH_S if self._spreader.partition_counts else 1.0
            self._probe_now.wait(wait_s)
            self._probe_now.clear()
            if self._stopping.is_set():
                return

    async def send(self, topic: str, key: str, value: bytes) -> None:
        """Store one message; raises BrokerUnavailable when it was not stored, OutcomeUnknown when
        it was sent but no verdict came in time (it may be stored)."""
        if self._brokers_down_since is not None:
            raise BrokerUnavailable("no broker is reachable")  # nothing is sent: nothing stored
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()
        lane = self._batch if self._waiting else self._express
        producer = lane.producer

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None and is_fatal(error):
                lane.mark_broken(producer)
            lane.report(delivered, error)

        try:
            producer.produce(
                topic, key=key.encode(), value=value, partition=self._spreader.next(topic), on_delivery=on_delivery
            )
        except BufferError as exc:
            raise BrokerUnavailable("producer queue is full; the broker is not keeping up") from exc
        self._waiting += 1
        try:
            async with asyncio.timeout(self._delivery_timeout_s + self.VERDICT_MARGIN_S):
                await delivered
        except TimeoutError as exc:
            raise OutcomeUnknown(f"no verdict from the broker within {self._delivery_timeout_s:.0f} s") from exc
        finally:
            self._waiting -= 1

    def close(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._probe_now.set()
        with contextlib.suppress(ValueError):
            _ALL_BROKERS_DOWN_LISTENERS.remove(self._on_all_brokers_down)
        self._express.close(timeout_s)
        self._batch.close(timeout_s)


# Delivery errors after which the message may be stored all the same: it was sent (or may have
# been) and the answer was lost or late, or the leader wrote it but could not replicate it in time.
_OUTCOME_UNKNOWN_ERRORS = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._TRANSPORT,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def delivery_failure(error: KafkaError) -> BrokerUnavailable:
    """What a delivery error means for the message: not stored, or perhaps stored."""
    if error.code() in _OUTCOME_UNKNOWN_ERRORS:
        return OutcomeUnknown(f"the broker's verdict was lost: {error}")
    return BrokerUnavailable(f"broker refused the message: {error}")


def _settle_all(verdicts: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, error in verdicts:
        if future.done():
            continue  # its request timed out or was cancelled
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(delivery_failure(error))


def dead_letter(producer: SyncProducer, settings: Settings, message: Message, reason: str) -> None:
    """Park a message that cannot be processed, with its origin and the reason, then move on."""
    key = (message.key() or b"unknown").decode("utf-8", "replace")
    envelope = {
        "reason": reason,
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "key": key,
        "value": (message.value() or b"").decode("utf-8", "replace"),
    }
    producer.send(settings.kafka_dead_letter_topic, key, json.dumps(envelope).encode())
    logger.error("dead-lettered %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), reason)
