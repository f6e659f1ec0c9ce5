"""The one-at-a-time consumer loop of the TTS worker, and helpers both loops share.

One message at a time per process: the handler runs in a thread while the loop keeps polling, so
a synthesis of many minutes never exceeds max.poll.interval.ms and never costs the worker its
group membership. The offset is committed only after the handler returned, i.e. after the step's
effect is durable.

While the handler runs, the loop reads ahead: what arrives is held here, in order, up to
MAX_HELD messages, and only then are the partitions paused. (Pausing after one message made
librdkafka drop the rest of what it had fetched and fetch every partition again after each task:
with the embedded Tansu that was a LIST and a GET of the object store per partition per task,
most of the broker's work during a backlog.) With a ``prefetch`` function the loop runs it on the
next held message while the current one is handled (the TTS worker fetches the next prompt and
checks the next task's audio while the engine works).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message, TopicPartition

from indextts_api.kafka import Consumer
from indextts_api.workers.failures import TRANSIENT, FailurePolicy, Retrying, describe

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
# Messages read ahead while the handler works, before the partitions are paused. They are this
# worker's anyway (its partitions), uncommitted, and dropped on revoke for the new owner to read.
MAX_HELD = 64
# On stop, how long to wait for the broker to acknowledge what was handled before committing.
STOP_ACK_WAIT_S = 20.0
COMMIT_INTERVAL_S = 1.0
# A message counts as produced while this worker held its partition only if its timestamp is this
# much later than the assignment: more than the clock difference between NTP-synchronized hosts,
# and than the time a replaced owner may go on fetching before it notices (a session, 6 s).
TENURE_MARGIN_S = 30.0


# A handler returns None when its effect is durable on return, or a future that completes when
# it is (the TTS worker's result, once the broker acknowledged it): the loop goes on to the next
# message meanwhile and commits in order, each offset only after its acknowledgement.
Handler = Callable[[Message], Future[None] | None]
# What to do with a message whose handling failed for good (failures.py decides when): fail the
# task (a failure webhook), dead-letter it. Same return contract as a Handler.
GiveUp = Callable[[Message, BaseException], Future[None] | None]
Prefetch = Callable[[Message], None]
_DURABLE: Future[None] = Future()
_DURABLE.set_result(None)


PartitionKey = tuple[str, int]


def partition_of(message: Message) -> PartitionKey:
    """(topic, partition) of a consumed message."""
    return str(message.topic()), int(message.partition() or 0)


def position_of(message: Message, next_one: bool = False) -> TopicPartition:
    """The message's own offset (to rewind to it) or the one after it (to commit it)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None  # set on consumed messages
    return TopicPartition(topic, partition, offset + 1 if next_one else offset)


def restart_fetching(
    consumer: Consumer, partitions: list[TopicPartition], role: str, delivering: set[PartitionKey]
) -> None:
    """Resume ``partitions`` and make librdkafka fetch at once.

    librdkafka only notices a resume at its broker thread's next wake-up (~0.6 s measured here);
    a seek to the current position restarts the fetch at once (14 ms). The position is where the
    next unread message is, so this seek never skips or repeats one; if it fails, fetching simply
    resumes a little later.

    Only partitions in ``delivering`` (they gave this consumer a message since they were assigned)
    are sought: a partition assigned a moment ago may still be looking up its committed offset, and
    a seek then (seen in the soak test, after a SIGKILLed worker's partitions moved) left it never
    fetching again, its tasks never processed. Those are only resumed.
    """
    if not partitions:
        return
    consumer.resume(partitions)
    ready = [tp for tp in partitions if (tp.topic, tp.partition) in delivering]
    if not ready:
        return
    try:
        for position in consumer.position(ready):
            if position.offset >= 0:
                consumer.seek(position)
    except KafkaException as exc:
        logger.debug("%s could not restart fetching at once: %s", role, exc)


def is_real_message(message: Message | None, role: str) -> bool:
    if message is None:
        return False
    error = message.error()
    if error is None:
        return True
    if error.code() != KafkaError._PARTITION_EOF:
        logger.warning("%s consumer error: %s", role, error)
    return False


class PartitionTenure:
    """Since when this worker holds each of its partitions.

    A message produced well after this worker got its partition (by the message's timestamp) was
    never fetched by a previous owner: only this worker can have handled it. Anything older, and
    any message without a timestamp, may be a redelivery.
    """

    def __init__(self, margin_s: float = TENURE_MARGIN_S) -> None:
        self._margin_s = margin_s
        self._since: dict[PartitionKey, float] = {}

    def assigned(self, partitions: list[TopicPartition]) -> None:
        now = time.time()
        for partition in partitions:
            self._since[(partition.topic, partition.partition)] = now

    def revoked(self, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self._since.pop((partition.topic, partition.partition), None)

    def produced_during(self, message: Message) -> bool:
        """Whether ``message`` was produced while this worker held its partition (see above)."""
        since = self._since.get(partition_of(message))
        kind, stamp_ms = message.timestamp()
        if since is None or kind == TIMESTAMP_NOT_AVAILABLE or stamp_ms <= 0:
            return False
        return stamp_ms / 1000 > since + self._margin_s


class OffsetCommitter:
    """Finished offsets on their way to the broker, for both consumer loops.

    From the main loop they are sent asynchronously and at most every COMMIT_INTERVAL_S (each
    commit is a broker write, and polling never waits for it); on revoke and stop, at once and
    synchronously. A commit lost in a crash means a redelivery, which is idempotent by task_uuid:
    the audio is found in S3 and not synthesized again, the same object is uploaded again, and the
    webhook may be repeated.
    """

    def __init__(self, consumer: Consumer, role: str) -> None:
        self._consumer = consumer
        self._role = role
        self._pending: dict[PartitionKey, int] = {}  # (topic, partition) -> next offset to read
        self._last_sent = 0.0

    def mark(self, topic: str, partition: int, next_offset: int) -> None:
        self._pending[(topic, partition)] = next_offset

    def flush(self, *, now: bool = False, wait: bool = False) -> None:
        """Send what is pending if ``now`` or the interval has passed; ``wait`` for the broker."""
        sent_at = time.monotonic()
        if not self._pending or (not now and sent_at - self._last_sent < COMMIT_INTERVAL_S):
            return
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in self._pending.items()]
        self._pending = {}
        self._last_sent = sent_at
        try:
            if wait:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            # Usually a rebalance took the partitions away: the new owner gets the messages again.
            logger.warning("%s could not commit %s: %s (the messages will be redelivered)", self._role, offsets, exc)


class PausingConsumerLoop:
    """One message at a time (the TTS worker), reading ahead: see the module docstring.

    Messages are never handed back with a seek (a seek can fail during a rebalance, and a
    skipped message would be committed over): the ones received while busy are held here, in
    order; a failed message is retried here, or given up, as failures.py decides.
    """

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        handler: Handler,
        stop: threading.Event,
        role: str,
        *,
        give_up: GiveUp,
        policy: FailurePolicy | None = None,
        prefetch: Prefetch | None = None,
        tenure: PartitionTenure | None = None,
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._handler = handler
        self._give_up = give_up
        self._policy = policy or FailurePolicy()
        self.retrying = Retrying(role)  # the current message, while it is being retried
        self._prefetch = prefetch
        self._tenure = tenure or PartitionTenure()  # kept up to date for the handler
        self._stop = stop
        self._role = role
        self._held: deque[Message] = deque()  # received, not handled yet, in order
        self._unacked: deque[tuple[Message, Future[None]]] = deque()  # handled, in order, not committed yet
        self._current: Message | None = None  # the message the handler works on
        self._current_revoked = False  # its partition was revoked meanwhile: never commit it
        self._delivering: set[PartitionKey] = set()  # partitions that gave a message since assigned
        self._committer = OffsetCommitter(consumer, role)
        self._paused = False
        self._prefetched: Message | None = None  # the last message given to ``prefetch``
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-handler")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-prefetch")

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s assigned %s", self._role, [p.partition for p in partitions])
        self._tenure.assigned(partitions)
        if self._paused and partitions:
            # Cooperative rebalancing adds partitions while we work: they must wait too.
            consumer.pause(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("%s revoked %s", self._role, [p.partition for p in partitions])
        self._tenure.revoked(partitions)
        self._committer.flush(now=True, wait=True)  # what we finished stays finished for the new owner
        revoked = {(p.topic, p.partition) for p in partitions}
        self._delivering -= revoked
        # Held messages of those partitions belong to their new owner (nothing was committed).
        self._held = deque(m for m in self._held if partition_of(m) not in revoked)
        # Being handled, or handled and not acknowledged yet: never committed by this worker, even
        # if the partition comes back (that commit would pass over the messages before it, which
        # the new owner may not have handled).
        current = self._current
        if current is not None and partition_of(current) in revoked:
            self._current_revoked = True
        self._unacked = deque(item for item in self._unacked if partition_of(item[0]) not in revoked)

    def run(self) -> None:
        self._consumer.subscribe([self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                if self._held:
                    self._process(self._held.popleft())
                    continue
                self._resume()
                message = self._consumer.poll(POLL_INTERVAL_S)
                self._settle()
                if is_real_message(message, self._role):
                    assert message is not None
                    self._process(message)
        finally:
            self._settle(wait_s=STOP_ACK_WAIT_S)
            self._executor.shutdown(wait=True)
            self._prefetcher.shutdown(wait=True)
            self._committer.flush(now=True, wait=True)
            self._consumer.close()  # leaves the group at once: partitions move without waiting a session
            logger.info("%s stopped", self._role)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._consumer.pause(self._consumer.assignment())

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            restart_fetching(self._consumer, self._consumer.assignment(), self._role, self._delivering)

    def _poll_while_busy(self, timeout_s: float = POLL_INTERVAL_S) -> None:
        """Keep the group membership alive; hold what arrives, up to MAX_HELD messages."""
        room = max(1, MAX_HELD - len(self._held))
        for message in self._consumer.consume(num_messages=room, timeout=timeout_s):
            if not is_real_message(message, self._role):
                continue
            self._delivering.add(partition_of(message))
            self._held.append(message)
        self._prefetch_next()
        if len(self._held) >= MAX_HELD:
            self._pause()

    def _prefetch_next(self) -> None:
        if self._prefetch is None or not self._held or self._held[0] is self._prefetched:
            return
        self._prefetched = self._held[0]
        self._prefetcher.submit(self._prefetch_quietly, self._prefetched)

    def _process(self, message: Message) -> None:
        self._delivering.add(partition_of(message))
        if len(self._held) < MAX_HELD // 2:
            self._resume()  # read ahead while this one runs (a no-op unless paused)
        self._prefetch_next()
        acknowledged = self._handle(message)
        if acknowledged is None:
            return  # stopping, or revoked meanwhile: not committed, so it is redelivered
        self._unacked.append((message, acknowledged))
        self._settle()

    def _handle(self, message: Message) -> Future[None] | None:
        """Run the handler until it succeeds; what completes when its effect is durable, or None
        when stopping or when the message's partition was revoked meanwhile."""
        self._current, self._current_revoked = message, False
        try:
            acknowledged = self._handle_until_done(message)
            return None if self._current_revoked else acknowledged
        finally:
            self._current = None

    def _handle_until_done(self, message: Message) -> Future[None] | None:
        failures = 0
        failure: BaseException | None = None  # set once the message is given up
        try:
            while True:
                if failure is None:
                    future = self._executor.submit(self._handler, message)
                else:
                    future = self._executor.submit(self._give_up, message, failure)
                while not future.done():
                    # Take what the broker has sent at once (the next task's prefetch then overlaps
                    # this one), then wake up the moment the handler is done (a blocking poll would
                    # sleep out its timeout: up to 100 ms of idle engine per task).
                    self._poll_while_busy(timeout_s=0)
                    wait([future], timeout=POLL_INTERVAL_S)
                try:
                    return future.result() or _DURABLE
                except Exception as exc:  # noqa: BLE001 - failures.py decides what each kind means
                    self.retrying.failed(exc)
                    decision = self._policy.decide(exc, failures, giving_up=failure is not None)
                    if decision.action == "give_up":
                        logger.error("%s gives up %s: %s", self._role, _where(message), describe(exc))
                        failure, failures = exc, 0
                        continue
                    if decision.action == "skip":
                        logger.error(
                            "%s skips %s, which it could not fail: %s", self._role, _where(message), describe(exc)
                        )
                        return _DURABLE
                    if not self._wait_before_retry(message, exc, decision.delay_s):
                        return None
                    failures += 1
        finally:
            self.retrying.done()

    def _settle(self, wait_s: float = 0.0) -> None:
        """Commit handled messages whose effect the broker acknowledged, oldest first; one whose
        acknowledgement failed is handled again before anything after it is committed."""
        while self._unacked:
            message, acknowledged = self._unacked[0]
            if not acknowledged.done():
                wait([acknowledged], timeout=wait_s)
                if not acknowledged.done():
                    return
            error = acknowledged.exception()
            if error is not None:
                if self._stop.is_set():
                    return  # neither it nor what follows is committed: all are redelivered
                logger.warning(
                    "%s: the effect of %s[%s]@%s was not stored (%s); handling it again",
                    self._role,
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    error,
                )
                again = self._handle(message)
                if again is None:
                    if self._stop.is_set():
                        return
                    continue  # revoked meanwhile: the revoke took it out of the queue
                self._unacked[0] = (message, again)
                continue
            self._unacked.popleft()
            self._commit(message)

    def _wait_before_retry(self, message: Message, exc: Exception, delay: float) -> bool:
        logger.warning(
            "%s will retry %s in %.0f s: %s",
            self._role,
            _where(message),
            delay,
            describe(exc),
            exc_info=not isinstance(exc, TRANSIENT),
        )
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self._stop.is_set() or self._current_revoked:
                return False
            self._poll_while_busy()
        return not self._stop.is_set() and not self._current_revoked

    def _prefetch_quietly(self, message: Message) -> None:
        assert self._prefetch is not None
        try:
            self._prefetch(message)
        except Exception:  # the real handling reports whatever went wrong
            logger.debug("%s prefetch failed", self._role, exc_info=True)

    def _commit(self, message: Message) -> None:
        position = position_of(message, next_one=True)
        self._committer.mark(position.topic, position.partition, position.offset)
        self._committer.flush(now=not self._held)  # idle after this one: send it now


def _where(message: Message) -> str:
    """``topic[partition]@offset`` of a consumed message, for the logs."""
    return f"{message.topic()}[{message.partition()}]@{message.offset()}"
