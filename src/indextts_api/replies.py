"""The reply topic: what goes back to the API host that holds a client's connection.

Workers never reach API hosts: a TTS worker produces an interactive task's audio to the reply
topic as each segment is synthesized (raw 16-bit mono PCM, at most MAX_CHUNK_BYTES a message), then
``done`` or ``error``; the upload worker announces a waited-for task's outcome (``finished``, for
``Prefer: wait``). Messages are keyed by task id, so one task's replies stay in order on one
partition. Every API process reads every partition from the end (``ReplyHub``) and hands each
reply to the request waiting for it, if it is one of its own; an API host that dies loses only its
own connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, KafkaException, TopicPartition

from indextts_api import kafka
from indextts_api.config import Settings

logger = logging.getLogger(__name__)

ReplyKind = Literal["audio", "done", "error", "finished"]
# Kafka's default message.max.bytes is 1 MB; a segment of speech can be longer than that.
MAX_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Reply:
    task_uuid: str
    kind: ReplyKind
    sample_rate: int = 0
    seq: int = 0  # audio: its number in the task's stream
    pcm: bytes = b""  # audio: 16-bit little-endian mono samples
    info: dict[str, Any] | None = None  # done, error, finished: a JSON document

    def samples(self) -> npt.NDArray[np.int16]:
        return np.frombuffer(self.pcm, dtype="<i2")


class ReplySender:
    """Produces replies (idempotent producer: a task's replies are stored once and in order)."""

    def __init__(self, settings: Settings, producer: kafka.SyncProducer) -> None:
        self._topic = settings.kafka_reply_topic
        self._producer = producer

    def audio(self, task_uuid: str, samples: npt.NDArray[np.int16], sample_rate: int, seq: int) -> int:
        """Send ``samples`` as messages numbered from ``seq``; returns the next number. A task
        synthesized again (a redelivery) numbers from 0 again, so its receiver skips what it has."""
        data = np.ascontiguousarray(samples, dtype="<i2").tobytes()
        for start in range(0, len(data), MAX_CHUNK_BYTES):
            headers: kafka.Headers = {"kind": b"audio", "rate": str(sample_rate).encode(), "seq": str(seq).encode()}
            self._producer.submit(self._topic, task_uuid, data[start : start + MAX_CHUNK_BYTES], headers)
            seq += 1
        return seq

    def info(self, task_uuid: str, kind: ReplyKind, document: dict[str, Any]) -> Future[None]:
        return self._producer.submit(self._topic, task_uuid, json.dumps(document).encode(), {"kind": kind.encode()})


def parse_reply(key: bytes | None, value: bytes | None, headers: Any) -> Reply | None:
    """A reply message, or None for one that is not (logged by the caller as skipped)."""
    fields: dict[str, bytes] = {
        name: item if isinstance(item, bytes) else str(item or "").encode() for name, item in (headers or [])
    }
    kind = fields.get("kind", b"").decode("ascii", "replace")
    if key is None or kind not in ("audio", "done", "error", "finished"):
        return None
    task_uuid = key.decode("ascii", "replace")
    if kind == "audio":
        try:
            rate, seq = int(fields.get("rate", b"0")), int(fields.get("seq", b"0"))
        except ValueError:
            return None
        return Reply(task_uuid, "audio", sample_rate=rate, seq=seq, pcm=value or b"")
    try:
        info = json.loads(value or b"{}")
    except ValueError:
        return None
    return Reply(task_uuid, kind, info=info if isinstance(info, dict) else {})  # type: ignore[arg-type]


class ReplyHub:
    """One per API process: reads the reply topic from the end, on every partition, and hands each
    reply to the request that waits for its task (an asyncio queue on the API's event loop)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Reply]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self.ready = threading.Event()

    def start(self) -> ReplyHub:
        self._thread = threading.Thread(target=self._run, name="reply-hub", daemon=True)
        self._thread.start()
        return self

    def expect(self, task_uuid: str) -> asyncio.Queue[Reply]:
        """A queue that receives the replies of ``task_uuid`` (register before queuing the task)."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        with self._lock:
            self._waiting[task_uuid] = (asyncio.get_running_loop(), queue)
        return queue

    def forget(self, task_uuid: str) -> None:
        with self._lock:
            self._waiting.pop(task_uuid, None)

    def _assign_from_end(self, consumer: Consumer) -> None:
        """Every partition of the reply topic, from its current end: replies produced after this
        returns are seen (the API queues a task only once the hub is ready)."""
        topic = self._settings.kafka_reply_topic
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        if not partitions:
            raise KafkaException(f"reply topic {topic} has no partitions")
        assignment = []
        for partition in partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            assignment.append(TopicPartition(topic, partition, high))
        consumer.assign(assignment)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                consumer = Consumer(
                    {
                        **kafka.client_config(self._settings),
                        # A group of its own, never joined (assign, no commits): every API process
                        # reads every reply.
                        "group.id": f"reply-hub-{uuid.uuid4().hex}",
                        "enable.auto.commit": False,
                        "fetch.wait.max.ms": 20,
                        "fetch.queue.backoff.ms": 1,
                    }
                )
                self._consumer = consumer
                self._assign_from_end(consumer)
            except KafkaException as exc:
                logger.warning("reply hub cannot read %s yet: %s", self._settings.kafka_reply_topic, exc)
                self._stop.wait(1.0)
                continue
            self.ready.set()
            try:
                self._consume(consumer)
            finally:
                consumer.close()
            return

    def _consume(self, consumer: Consumer) -> None:
        while not self._stop.is_set():
            message = consumer.poll(0.1)
            if message is None:
                continue
            if message.error():
                logger.debug("reply hub: %s", message.error())
                continue
            reply = parse_reply(message.key(), message.value(), message.headers())
            if reply is None:
                continue
            with self._lock:
                waiter = self._waiting.get(reply.task_uuid)
            if waiter is not None:
                loop, queue = waiter
                with contextlib.suppress(RuntimeError):  # the API's loop is closing: nobody waits
                    loop.call_soon_threadsafe(queue.put_nowait, reply)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
