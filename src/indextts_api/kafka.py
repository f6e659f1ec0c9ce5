"""The one Kafka wrapper: client configuration, topic creation, producers and consumers.

Every role builds its clients here, so the delivery guarantees (idempotent producer, acks=all,
manual commits, earliest offset for new groups) and the latency tuning live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from indextts_api.config import Settings

logger = logging.getLogger(__name__)

Consumer = _Consumer

# Tansu (and small clusters) need a short session for a quick first group join: with
# librdkafka's 45 s default the first join took ~23 s there, with these ~3 s (DESIGN.md).
SESSION_TIMEOUT_MS = 6000
# A third of the session, Kafka's usual ratio. Tansu stores every heartbeat as an S3 write (4 ms
# of its CPU and 4 ms of SeaweedFS's each, measured): at 500 ms the three idle consumers cost
# 6 writes/s. Joins and rebalances took as long at 2000 as at 500 ms (3.1 s first join, 11.1 s
# for a second member; a member leaving 3.9 s instead of 3.4 s).
HEARTBEAT_INTERVAL_MS = 2000


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge a message in time."""


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


def _log_client_error(error: KafkaError) -> None:
    # librdkafka reconnects by itself; an outage is reported, once per kind every few seconds.
    now = time.monotonic()
    if now - _last_reported.get(error.code(), -_REPORT_EVERY_S) >= _REPORT_EVERY_S:
        _last_reported[error.code()] = now
        logger.warning("kafka client: %s", error)


def make_producer(
    settings: Settings, *, linger_ms: int = 1, message_timeout_ms: int = 15000, idempotent: bool = True
) -> Producer:
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
            "message.timeout.ms": message_timeout_ms,
            "error_cb": _log_client_error,
        }
    )


# How long the broker may hold a fetch that finds nothing. Tansu answers an empty fetch only after
# this wait and does not wake it when a message arrives, so it is also the consumer's pick-up
# latency (half of it on average); each fetch costs the broker a read of every partition fetched.
LOW_LATENCY_FETCH_WAIT_MS = 20
# For consumers whose messages are due seconds from now (webhook retries): a fraction of the load.
RELAXED_FETCH_WAIT_MS = 500


def make_consumer(settings: Settings, group_id: str, fetch_wait_ms: int = LOW_LATENCY_FETCH_WAIT_MS) -> Consumer:
    """A consumer with manual commits that starts a new group at the earliest offset."""
    return Consumer(
        {
            **client_config(settings),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A group that starts fresh must see tasks queued before any worker joined.
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "fetch.wait.max.ms": fetch_wait_ms,
            "fetch.queue.backoff.ms": 5,
            "error_cb": _log_client_error,
        }
    )


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create the task, result, dead-letter and webhook retry topics if they do not exist."""
    admin = make_admin(settings)
    wanted = [
        settings.kafka_task_topic,
        settings.kafka_result_topic,
        settings.kafka_dead_letter_topic,
        *settings.webhook_retry_topics,
    ]
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [name for name in wanted if name not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=settings.kafka_topic_partitions,
                replication_factor=settings.kafka_replication_factor,
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


class SyncProducer:
    """A producer for worker threads (idempotent unless told otherwise): ``submit`` returns a
    future the broker's acknowledgement completes, ``send`` waits for it."""

    def __init__(self, settings: Settings, *, idempotent: bool = True) -> None:
        self._served = _ServedProducer("producer", lambda: make_producer(settings, idempotent=idempotent))

    def submit(self, topic: str, key: str, value: bytes) -> Future[None]:
        """Produce one message; the future completes once it is stored, or fails with BrokerUnavailable
        (within the producer's message timeout, 15 s)."""
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
            producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            raise BrokerUnavailable(f"cannot produce to {topic}: {exc}") from exc
        return acknowledged

    def send(self, topic: str, key: str, value: bytes, timeout_s: float = 30.0) -> None:
        """Produce one message and block until it is stored, or raise BrokerUnavailable."""
        try:
            self.submit(topic, key, value).result(timeout=timeout_s)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no acknowledgement from the broker for {topic} within {timeout_s:.0f} s") from exc

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

    # The broker's verdict (ack or failure) comes within MESSAGE_TIMEOUT_MS, so a request never
    # answers 503 for a task that is then stored after all.
    MESSAGE_TIMEOUT_MS = 8000
    BATCH_LINGER_MS = 5
    METADATA_REFRESH_S = 30.0

    def __init__(self, settings: Settings) -> None:
        def lane(linger_ms: int) -> Callable[[], Producer]:
            return lambda: make_producer(settings, linger_ms=linger_ms, message_timeout_ms=self.MESSAGE_TIMEOUT_MS)

        self._express = _Lane("express", lane(0))
        self._batch = _Lane("batch", lane(self.BATCH_LINGER_MS))
        self._waiting = 0  # requests waiting for the broker (touched on the event loop only)
        self._spreader = PartitionSpreader()
        self._stopping = threading.Event()
        self._metadata = threading.Thread(target=self._refresh_metadata, name="kafka-metadata", daemon=True)
        self._metadata.start()

    def _refresh_metadata(self) -> None:
        while True:
            try:
                topics = self._batch.producer.list_topics(timeout=5).topics
                self._spreader.partition_counts = {
                    name: len(metadata.partitions) for name, metadata in topics.items() if metadata.error is None
                }
            except KafkaException as exc:
                logger.debug("no topic metadata yet: %s", exc)
            if self._stopping.wait(self.METADATA_REFRESH_S if self._spreader.partition_counts else 1.0):
                return

    async def send(self, topic: str, key: str, value: bytes, timeout_s: float = 12.0) -> None:
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
            async with asyncio.timeout(timeout_s):
                await delivered
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no acknowledgement from the broker within {timeout_s:.0f} s") from exc
        finally:
            self._waiting -= 1

    def close(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._express.close(timeout_s)
        self._batch.close(timeout_s)


def _settle_all(verdicts: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, error in verdicts:
        if future.done():
            continue  # its request timed out or was cancelled
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(BrokerUnavailable(f"broker refused the message: {error}"))


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
