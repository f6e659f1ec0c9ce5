"""The TTS worker's consumer loop against the real broker: order, read-ahead, prefetch, commits."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import Message, TopicPartition

from indextts_api import kafka
from indextts_api.config import Settings
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.workers.concurrent import ConcurrentConsumerLoop
from indextts_api.workers.consumer import PartitionTenure, PausingConsumerLoop
from indextts_api.workers.failures import FailurePolicy, PermanentError, TransientError

BACKLOG = 40
PARTITIONS = 4
LOOP_TIMEOUT_S = 60


def backlog_topic(infra: EmbeddedInfra, partitions: int, messages: int) -> tuple[Settings, str, str]:
    """A new topic holding ``messages`` messages, and a new consumer group: (settings, topic, group)."""
    topic = f"loop-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        _env_file=None,
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        kafka_profile="embedded",
        kafka_task_topic=topic,
        kafka_topic_partitions=partitions,
    )
    kafka.ensure_topics(settings)
    producer = kafka.SyncProducer(settings)
    for index in range(messages):
        producer.send(topic, f"task-{index}", str(index).encode())
    producer.close()
    return settings, topic, f"{topic}-group"


def never_gives_up(message: Message, failure: BaseException) -> None:
    """The give-up step of loops whose handlers do not fail for good."""
    raise AssertionError(f"gave up {message.offset()}: {failure}")


def run_until_stopped(loop: PausingConsumerLoop, stop: threading.Event) -> bool:
    """Run ``loop`` until its handler sets ``stop`` (at most LOOP_TIMEOUT_S); whether it then exited."""
    runner = threading.Thread(target=loop.run)
    runner.start()
    runner.join(LOOP_TIMEOUT_S)
    stop.set()
    runner.join(30)
    return not runner.is_alive()


def committed_offsets(settings: Settings, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset of each partition, read by a new consumer of the group."""
    checker = kafka.make_consumer(settings, group)
    try:
        committed = checker.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        checker.close()
    return {tp.partition: tp.offset for tp in committed}


def test_backlog_is_read_ahead_prefetched_handled_in_order_and_committed(infra: EmbeddedInfra) -> None:
    settings, topic, group = backlog_topic(infra, PARTITIONS, BACKLOG)

    handled: list[tuple[int, int]] = []  # (partition, offset) in handling order
    prefetched: set[tuple[int, int]] = set()
    held_while_busy: list[int] = []
    stop = threading.Event()
    consumer = kafka.make_consumer(settings, group)
    loop: PausingConsumerLoop

    def where(message: Message) -> tuple[int, int]:
        return int(message.partition() or 0), int(message.offset() or 0)

    def handle(message: Message) -> None:
        time.sleep(0.02)  # the engine at work: the loop polls meanwhile
        held_while_busy.append(len(loop._held))
        handled.append(where(message))
        if len(handled) == BACKLOG:
            stop.set()

    def prefetch(message: Message) -> None:
        prefetched.add(where(message))

    loop = PausingConsumerLoop(consumer, topic, handle, stop, "test-loop", give_up=never_gives_up, prefetch=prefetch)
    assert run_until_stopped(loop, stop)

    assert len(handled) == BACKLOG == len(set(handled)), "every message handled exactly once"
    for partition in range(PARTITIONS):
        offsets = [offset for p, offset in handled if p == partition]
        assert offsets == sorted(offsets), f"partition {partition} handled out of order"
    # The loop read ahead instead of one message at a time ...
    assert max(held_while_busy) > 1
    # ... and the next task's prefetch ran for nearly every task (not for the very first one).
    assert len(prefetched & set(handled)) >= BACKLOG - PARTITIONS

    # What was handled is committed: a new consumer of the group would start at the end.
    per_partition = {p: sum(1 for q, _ in handled if q == p) for p in range(PARTITIONS)}
    assert committed_offsets(settings, group, topic, PARTITIONS) == per_partition


def test_commits_wait_for_each_acknowledgement_and_a_failed_one_is_handled_again(infra: EmbeddedInfra) -> None:
    settings, topic, group = backlog_topic(infra, partitions=1, messages=10)

    failing_offset = 3
    handled: list[int] = []
    committed_when_handled_again: list[int] = []
    stop = threading.Event()
    checker = kafka.make_consumer(settings, group)

    def committed_offset() -> int:
        return int(checker.committed([TopicPartition(topic, 0)], timeout=10)[0].offset)

    def handle(message: Message) -> Future[None]:
        offset = int(message.offset() or 0)
        if offset == failing_offset and offset in handled:
            committed_when_handled_again.append(committed_offset())
        handled.append(offset)
        acknowledged: Future[None] = Future()

        def acknowledge() -> None:
            if offset == failing_offset and handled.count(offset) == 1:
                acknowledged.set_exception(kafka.BrokerUnavailable("broker refused the message (test)"))
            else:
                acknowledged.set_result(None)

        threading.Timer(0.05, acknowledge).start()  # the broker answers while the next one runs
        if len(set(handled)) == 10 and handled.count(failing_offset) == 2:
            stop.set()
        return acknowledged

    loop = PausingConsumerLoop(
        kafka.make_consumer(settings, group), topic, handle, stop, "test-acks", give_up=never_gives_up
    )
    try:
        assert run_until_stopped(loop, stop)
        assert handled.count(failing_offset) == 2, handled
        # Later messages were handled before the failure was known, but nothing past the failed
        # message was committed until it was handled again ...
        assert committed_when_handled_again and committed_when_handled_again[0] <= failing_offset
        # ... and everything is committed in the end (the stop waits for the last acknowledgements).
        assert committed_offset() == 10
    finally:
        checker.close()


def test_nothing_of_a_partition_revoked_mid_task_is_committed(infra: EmbeddedInfra) -> None:
    """The loop's own revoke callback, called while a task runs (as librdkafka would call it from a
    poll): the task and the earlier one still waiting for its acknowledgement belong to the new
    owner now, so neither may be committed, even when both succeed afterwards."""
    settings, topic, group = backlog_topic(infra, partitions=1, messages=3)
    stop = threading.Event()
    consumer = kafka.make_consumer(settings, group)
    first_acknowledged: Future[None] = Future()
    handled: list[int] = []
    loop: PausingConsumerLoop

    def handle(message: Message) -> Future[None] | None:
        offset = int(message.offset() or 0)
        handled.append(offset)
        if offset == 0:
            return first_acknowledged  # the broker has not stored its result yet
        loop._on_revoke(consumer, [TopicPartition(topic, 0)])  # the partition moves meanwhile
        threading.Timer(0.1, first_acknowledged.set_result, (None,)).start()
        stop.set()
        return None  # this task's effect is durable: yet it is no longer this worker's to commit

    loop = PausingConsumerLoop(consumer, topic, handle, stop, "test-revoke", give_up=never_gives_up)
    assert run_until_stopped(loop, stop)
    assert handled == [0, 1]

    committed = committed_offsets(settings, group, topic, 1)[0]
    assert committed < 0, f"offset {committed} committed for a revoked partition"


def test_tenure_tells_tasks_queued_while_assigned_from_possible_redeliveries(infra: EmbeddedInfra) -> None:
    """Messages queued before the loop got the partition may be redeliveries; those queued after
    it are its own; after the partitions are revoked nothing counts as its own."""
    settings, topic, group = backlog_topic(infra, PARTITIONS, 4)  # task-0..3, queued before it joins
    tenure = PartitionTenure(margin_s=0)
    verdicts: dict[str, bool] = {}
    last: list[Message] = []
    stop = threading.Event()

    def handle(message: Message) -> None:
        verdicts[(message.key() or b"").decode()] = tenure.produced_during(message)
        last[:] = [message]
        if len(verdicts) == 4:
            producer = kafka.SyncProducer(settings)
            for index in range(4):
                producer.send(topic, f"new-{index}", b"queued while assigned")
            producer.close()
        if len(verdicts) == 8:
            stop.set()

    loop = PausingConsumerLoop(
        kafka.make_consumer(settings, group), topic, handle, stop, "tenure-test", give_up=never_gives_up, tenure=tenure
    )
    assert run_until_stopped(loop, stop), "the loop did not stop"
    assert verdicts == {**{f"task-{i}": False for i in range(4)}, **{f"new-{i}": True for i in range(4)}}
    assert not tenure.produced_during(last[0]), "the partition was given up on close"


# --- failures: what is retried, what is given up, for how long (failures.py) -----------------------


class PoisonHandler:
    """Fails message 0 as told; the others succeed. Records handlings and give-ups."""

    def __init__(self, failure: Exception, stop: threading.Event, expected: int, give_up_fails: int = 0) -> None:
        self.failure = failure
        self.stop = stop
        self.expected = expected  # messages to see handled or given up before stopping
        self.give_up_fails = give_up_fails  # the give-up step raises this many times first
        self.attempts = 0
        self.handled: list[int] = []
        self.given_up: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def handle(self, message: Message) -> None:
        if message.value() == b"0":
            with self.lock:
                self.attempts += 1
            raise self.failure
        self._record(self.handled, int(message.value() or 0))

    def give_up(self, message: Message, failure: BaseException) -> None:
        if self.give_up_fails > 0:
            self.give_up_fails -= 1
            raise RuntimeError("the give-up step broke too")
        self._record(self.given_up, (int(message.value() or 0), type(failure).__name__))

    def _record(self, into: list[Any], item: Any) -> None:
        with self.lock:
            into.append(item)
            if len(self.handled) + len(self.given_up) >= self.expected:
                self.stop.set()


def run_poison(infra: EmbeddedInfra, failure: Exception, loop_kind: str) -> PoisonHandler:
    """Three messages on one partition, the first poisonous, through a loop with one unexpected retry."""
    settings, topic, group = backlog_topic(infra, 1, 3)
    stop = threading.Event()
    poison = PoisonHandler(failure, stop, expected=3)
    policy = FailurePolicy(unexpected_retries=1)
    consumer = kafka.make_consumer(settings, group)
    if loop_kind == "pausing":
        loop: Any = PausingConsumerLoop(
            consumer, topic, poison.handle, stop, "poison", give_up=poison.give_up, policy=policy
        )
    else:
        loop = ConcurrentConsumerLoop(
            consumer, [topic], poison.handle, stop, "poison", 2, give_up=poison.give_up, policy=policy
        )
    runner = threading.Thread(target=loop.run)
    runner.start()
    runner.join(LOOP_TIMEOUT_S)
    stop.set()
    runner.join(30)
    assert not runner.is_alive()
    assert committed_offsets(settings, group, topic, 1) == {0: 3}  # given up: committed past it
    return poison


@pytest.mark.parametrize("loop_kind", ["pausing", "concurrent"])
def test_unexpected_exception_is_retried_then_given_up(infra: EmbeddedInfra, loop_kind: str) -> None:
    started = time.monotonic()
    poison = run_poison(infra, KeyError("a bug"), loop_kind)
    assert poison.attempts == 2  # the first try and one retry
    assert poison.given_up == [(0, "KeyError")]
    assert sorted(poison.handled) == [1, 2]  # the messages behind it were not held up for good
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("loop_kind", ["pausing", "concurrent"])
def test_permanent_error_is_given_up_at_once(infra: EmbeddedInfra, loop_kind: str) -> None:
    poison = run_poison(infra, PermanentError("bad input"), loop_kind)
    assert poison.attempts == 1
    assert poison.given_up == [(0, "PermanentError")]
    assert sorted(poison.handled) == [1, 2]


def test_a_broken_give_up_step_is_retried_then_the_message_skipped(infra: EmbeddedInfra) -> None:
    """Even failing the task can fail; that too is bounded: the message is skipped, the loop goes on."""
    settings, topic, group = backlog_topic(infra, 1, 3)
    stop = threading.Event()
    poison = PoisonHandler(KeyError("a bug"), stop, expected=2, give_up_fails=10)
    loop = PausingConsumerLoop(
        kafka.make_consumer(settings, group),
        topic,
        poison.handle,
        stop,
        "poison",
        give_up=poison.give_up,
        policy=FailurePolicy(unexpected_retries=1),
    )
    assert run_until_stopped(loop, stop)
    assert poison.given_up == [] and sorted(poison.handled) == [1, 2]
    assert committed_offsets(settings, group, topic, 1) == {0: 3}


def test_transient_error_is_retried_until_it_passes(infra: EmbeddedInfra) -> None:
    settings, topic, group = backlog_topic(infra, 1, 2)
    stop = threading.Event()
    attempts: list[int] = []

    def handle(message: Message) -> None:
        if message.value() == b"0" and len(attempts) < 3:  # more failures than unexpected ones may have
            attempts.append(1)
            raise TransientError("S3 unavailable")
        if message.value() == b"1":
            stop.set()

    loop = PausingConsumerLoop(
        kafka.make_consumer(settings, group),
        topic,
        handle,
        stop,
        "transient",
        give_up=never_gives_up,
        policy=FailurePolicy(unexpected_retries=0),
    )
    assert run_until_stopped(loop, stop)
    assert len(attempts) == 3
