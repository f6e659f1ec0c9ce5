"""A consumer loop that handles several messages at once and still commits only what is done.

Used where the work is I/O (uploads, webhooks): a slow S3 request or a slow webhook receiver
occupies one slot, not the worker. Offsets are committed per partition up to the first message
that is not finished, so a crash never skips an unfinished message (at-least-once). A failed
message is retried with backoff, or given up, as failures.py decides: no message holds a slot
longer than its bounded retries (transient outages excepted: they hold every slot alike).

A ``due_at`` function makes it a scheduler: a message that is not due yet is held and its
partition paused until it is (the webhook retry topics hold messages in due order).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import Message, TopicPartition

from indextts_api.kafka import Consumer
from indextts_api.workers.consumer import (
    POLL_INTERVAL_S,
    OffsetCommitter,
    PartitionKey,
    is_real_message,
    partition_of,
    position_of,
    restart_fetching,
)
from indextts_api.workers.failures import TRANSIENT, FailurePolicy, Retrying, describe

logger = logging.getLogger(__name__)

Handler = Callable[[Message], None]
GiveUp = Callable[[Message, BaseException], None]  # fail the task for good, dead-letter it


class _PartitionProgress:
    """Offsets of one partition in flight and finished, to find what may be committed."""

    def __init__(self) -> None:
        self.in_flight: list[int] = []  # in consumption order, hence ascending
        self.done: set[int] = set()

    def committable(self) -> int | None:
        """The offset to commit (next to read), if the oldest messages are finished."""
        last_done: int | None = None
        while self.in_flight and self.in_flight[0] in self.done:
            last_done = self.in_flight.pop(0)
            self.done.discard(last_done)
        return None if last_done is None else last_done + 1


class ConcurrentConsumerLoop:
    def __init__(
        self,
        consumer: Consumer,
        topics: list[str],
        handler: Handler,
        stop: threading.Event,
        role: str,
        concurrency: int,
        *,
        give_up: GiveUp,
        policy: FailurePolicy | None = None,
        due_at: Callable[[Message], float | None] | None = None,
    ) -> None:
        self._consumer = consumer
        self._topics = topics
        self._handler = handler
        self._give_up = give_up
        self._policy = policy or FailurePolicy()
        self._stop = stop
        self._role = role
        self._concurrency = max(1, concurrency)
        self._due_at = due_at
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix=f"{role}-handler")
        self._lock = threading.Lock()
        self._progress: dict[PartitionKey, _PartitionProgress] = {}
        self._running = 0
        self._saturated = False
        self._committer = OffsetCommitter(consumer, role)
        # Partitions paused until their next message is due: that message, held here, and its time.
        self._waiting: dict[PartitionKey, tuple[float, Message]] = {}

    # --- rebalancing ---------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s assigned %d partitions", self._role, len(partitions))
        if self._saturated and partitions:
            consumer.pause(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s revoked %d partitions", self._role, len(partitions))
        self._commit_finished()
        with self._lock:
            for tp in partitions:
                # Unfinished messages there will be redelivered to the new owner.
                self._progress.pop((tp.topic, tp.partition), None)
                self._waiting.pop((tp.topic, tp.partition), None)

    # --- main loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                self._resume_due_partitions()
                message = self._consumer.poll(POLL_INTERVAL_S)
                self._commit_finished(asynchronous=True)
                if not is_real_message(message, self._role):
                    continue
                assert message is not None
                if self._defer_if_not_due(message):
                    continue
                self._start(message)
        finally:
            # Let running handlers finish (they stop retrying once the stop event is set), then
            # commit what finished and leave the group.
            self._pool.shutdown(wait=True)
            self._commit_finished()
            self._consumer.close()
            logger.info("%s stopped", self._role)

    def _start(self, message: Message) -> None:
        key = partition_of(message)
        with self._lock:
            self._progress.setdefault(key, _PartitionProgress()).in_flight.append(int(message.offset() or 0))
            self._running += 1
            if self._running >= self._concurrency and not self._saturated:
                self._saturated = True
                self._consumer.pause(self._consumer.assignment())
        future = self._pool.submit(self._handle_until_done, message)

        def on_done(done: Future[None]) -> None:
            self._finished(message, done)

        future.add_done_callback(on_done)

    def _handle_until_done(self, message: Message) -> None:
        failures = 0
        failure: BaseException | None = None  # set once the message is given up
        retrying = Retrying(self._role)
        try:
            while True:
                try:
                    if failure is None:
                        self._handler(message)
                    else:
                        self._give_up(message, failure)
                    return
                except Exception as exc:  # failures.py decides what each kind means
                    if self._stop.is_set():
                        raise  # not finished, so not committed: redelivered after the restart
                    retrying.failed(exc)
                    where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
                    decision = self._policy.decide(exc, failures, giving_up=failure is not None)
                    if decision.action == "give_up":
                        logger.error("%s gives up %s: %s", self._role, where, describe(exc))
                        failure, failures = exc, 0
                        continue
                    if decision.action == "skip":
                        logger.error("%s skips %s, which it could not fail: %s", self._role, where, describe(exc))
                        return
                    failures += 1
                    logger.warning(
                        "%s will retry %s in %.0f s: %s",
                        self._role,
                        where,
                        decision.delay_s,
                        describe(exc),
                        exc_info=not isinstance(exc, TRANSIENT),
                    )
                    if self._stop.wait(decision.delay_s):
                        raise
        finally:
            retrying.done()

    def _finished(self, message: Message, future: Future[None]) -> None:
        key = partition_of(message)
        with self._lock:
            self._running -= 1
            if future.exception() is None and key in self._progress:
                self._progress[key].done.add(int(message.offset() or 0))

    def _commit_finished(self, asynchronous: bool = False) -> None:
        """Commit what finished: from the main loop ``asynchronously`` (see OffsetCommitter), on
        revoke and stop at once."""
        with self._lock:
            for (topic, partition), progress in self._progress.items():
                next_offset = progress.committable()
                if next_offset is not None:
                    self._committer.mark(topic, partition, next_offset)
            unsaturate = self._saturated and self._running < self._concurrency
            if unsaturate:
                self._saturated = False
        if asynchronous:
            self._committer.flush()
        else:
            self._committer.flush(now=True, wait=True)
        if unsaturate:
            self._resume([tp for tp in self._consumer.assignment() if (tp.topic, tp.partition) not in self._waiting])

    # --- scheduling ------------------------------------------------------------------------------------

    def _defer_if_not_due(self, message: Message) -> bool:
        """Hold a message that is not due yet and pause its partition until it is (no seek: a
        failed seek would skip the message and a later commit would pass over it)."""
        if self._due_at is None:
            return False
        due = self._due_at(message)
        if due is None or due <= time.time():
            return False
        position = position_of(message)
        self._consumer.pause([position])
        with self._lock:
            self._waiting[(position.topic, position.partition)] = (due, message)
        return True

    def _resume_due_partitions(self) -> None:
        if not self._waiting or self._saturated:
            return  # while saturated, due partitions stay listed and are resumed afterwards
        now = time.time()
        with self._lock:
            due = [(key, message) for key, (when, message) in self._waiting.items() if when <= now]
            for key, _ in due:
                del self._waiting[key]
        for _, message in due:
            self._start(message)
        restart_fetching(
            self._consumer,
            [TopicPartition(topic, partition) for (topic, partition), _ in due],
            self._role,
            self._delivering(),
        )

    def _resume(self, partitions: list[TopicPartition]) -> None:
        restart_fetching(self._consumer, partitions, self._role, self._delivering())

    def _delivering(self) -> set[PartitionKey]:
        """Partitions that gave a message since they were assigned (their progress is tracked)."""
        with self._lock:
            return set(self._progress)
