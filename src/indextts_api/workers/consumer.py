"""The consumer loop both worker roles share.

One message at a time per process: the partitions are paused while the handler runs in a thread,
and the loop keeps polling, so a synthesis of many minutes never exceeds max.poll.interval.ms
and never costs the worker its group membership. The offset is committed only after the handler
returned, i.e. after the step's effect is durable.

With a ``prefetch`` function the loop takes one message ahead before pausing and runs
``prefetch`` on it while the current one is handled (the TTS worker fetches the next prompt
while the engine works); that message is handled next, or handed back if anything goes wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from indextts_api.kafka import Consumer

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class TransientError(Exception):
    """The step could not complete now (broker or storage down): retry the same message later."""


Handler = Callable[[Message], None]


def position_of(message: Message, next_one: bool = False) -> TopicPartition:
    """The message's own offset (to rewind to it) or the one after it (to commit it)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None  # set on consumed messages
    return TopicPartition(topic, partition, offset + 1 if next_one else offset)


class PausingConsumerLoop:
    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        handler: Handler,
        stop: threading.Event,
        role: str,
        prefetch: Handler | None = None,
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._handler = handler
        self._prefetch = prefetch
        self._stop = stop
        self._role = role
        self._busy = False
        self._lookahead: Message | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-handler")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-prefetch")
        self._failures = 0

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s assigned %s", self._role, [p.partition for p in partitions])
        if self._busy and partitions and (self._prefetch is None or self._lookahead is not None):
            # Cooperative rebalancing adds partitions while we work: they must wait too.
            consumer.pause(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s revoked %s", self._role, [p.partition for p in partitions])
        if self._lookahead is not None and any(
            p.topic == self._lookahead.topic() and p.partition == self._lookahead.partition() for p in partitions
        ):
            self._lookahead = None  # its new owner will handle it

    def run(self) -> None:
        self._consumer.subscribe([self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                message, self._lookahead = self._lookahead, None
                if message is None:
                    message = self._consumer.poll(POLL_INTERVAL_S)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        logger.warning("%s consumer error: %s", self._role, error)
                    continue
                self._process(message)
        finally:
            self._executor.shutdown(wait=True)
            self._prefetcher.shutdown(wait=True)
            self._consumer.close()  # leaves the group at once: partitions move without waiting a session
            logger.info("%s stopped", self._role)

    def _process(self, message: Message) -> None:
        self._busy = True
        if self._prefetch is None:
            self._consumer.pause(self._consumer.assignment())
        try:
            future: Future[None] = self._executor.submit(self._handler, message)
            while not future.done():
                polled = self._consumer.poll(POLL_INTERVAL_S)  # keeps the membership alive
                if polled is None or polled.error():
                    continue
                if self._prefetch is not None and self._lookahead is None:
                    self._lookahead = polled
                    self._consumer.pause(self._consumer.assignment())
                    self._prefetcher.submit(self._prefetch_quietly, polled)
                else:
                    # Fetched before the pause took effect: hand it back for later.
                    self._consumer.seek(position_of(polled))
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - any failure here means: retry this message
                self._hand_back_lookahead()
                self._retry_later(message, exc)
                return
            self._failures = 0
            self._commit(message)
        finally:
            self._busy = False
            self._resume()

    def _prefetch_quietly(self, message: Message) -> None:
        assert self._prefetch is not None
        try:
            self._prefetch(message)
        except Exception:  # the real handling reports whatever went wrong
            logger.debug("%s prefetch failed", self._role, exc_info=True)

    def _hand_back_lookahead(self) -> None:
        lookahead, self._lookahead = self._lookahead, None
        if lookahead is not None:
            try:
                self._consumer.seek(position_of(lookahead))
            except KafkaException as exc:
                logger.warning("%s could not hand back a prefetched message: %s", self._role, exc)

    def _resume(self) -> None:
        assignment = self._consumer.assignment()
        self._consumer.resume(assignment)
        # librdkafka only notices a resume at its broker thread's next wake-up (~0.6 s measured
        # here); a seek to the current position restarts the fetch at once (14 ms).
        try:
            for position in self._consumer.position(assignment):
                if position.offset >= 0:
                    self._consumer.seek(position)
        except KafkaException as exc:
            logger.debug("%s could not restart fetching: %s", self._role, exc)

    def _commit(self, message: Message) -> None:
        try:
            self._consumer.commit(offsets=[position_of(message, next_one=True)], asynchronous=False)
        except KafkaException as exc:
            # Usually a rebalance took the partition away: the new owner gets the message again,
            # and processing is idempotent by task_uuid.
            logger.warning(
                "%s could not commit %s[%d]@%d: %s",
                self._role,
                message.topic(),
                message.partition(),
                message.offset(),
                exc,
            )

    def _retry_later(self, message: Message, exc: Exception) -> None:
        delay = RETRY_BACKOFF_S[min(self._failures, len(RETRY_BACKOFF_S) - 1)]
        self._failures += 1
        logger.warning(
            "%s will retry %s[%d]@%d in %.0f s: %s",
            self._role,
            message.topic(),
            message.partition(),
            message.offset(),
            delay,
            exc,
            exc_info=not isinstance(exc, TransientError),
        )
        try:
            self._consumer.seek(position_of(message))
        except KafkaException as seek_error:
            logger.warning("%s could not rewind: %s", self._role, seek_error)
        # Wait without losing the group membership; a stop request ends the wait.
        waited = 0.0
        while waited < delay and not self._stop.is_set():
            self._consumer.poll(POLL_INTERVAL_S)
            waited += POLL_INTERVAL_S
