"""A broker failover on the operator's own Kafka: the API never answers wrongly, consumer groups
keep their partitions.

What a client sees while a Kafka cluster fences a dead broker is played by a fault-injecting proxy
(``tests/faultproxy.py``) between the clients and a Tansu broker of this module's own: acks=all
writes are stored but acknowledged late (9-10.5 s on a real cluster: the proxy holds the broker's
responses), the coordinator's connections die (the proxy resets them) and new connections fail
for a while (the proxy refuses them).

The broker advertises the proxy's address, so every connection a client makes after bootstrap
(to "each broker", here the one) goes through the proxy too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from indextts_api import kafka
from indextts_api.config import Settings
from indextts_api.infra.embedded import EmbeddedCredentials, EmbeddedInfra, start_tansu
from indextts_api.infra.process import ChildProcess, free_port, wait_for_port
from indextts_api.storage import make_s3_client
from tests.conftest import API_PASSWORD, API_USER, api_role, own_topics
from tests.faultproxy import FaultProxy

# The bucket of the session's SeaweedFS where this module's broker keeps its topics (not the
# session broker's "tansu" bucket: two brokers on one bucket would share topics and groups).
BROKER_BUCKET = "tansu-failover"
START_TIMEOUT_S = 60.0
# How late acks=all answers come while a real cluster fences a dead broker is 9-10.5 s; this is
# longer than the API's old 8 s give-up and shorter than the 30 s delivery timeout.
FAILOVER_STALL_S = 12.0
# How long a group coordinator takes to move to another broker when one dies (~10 s).
COORDINATOR_MOVE_S = 10.0


# --- a broker behind the proxy -------------------------------------------------------------------


@dataclass
class ProxiedBroker:
    """A Tansu broker that clients reach only through ``proxy``."""

    proxy: FaultProxy
    process: ChildProcess

    def settings(self, **values: object) -> Settings:
        """Client settings for this broker: the operator's-Kafka profile unless told otherwise."""
        values = {"kafka_bootstrap_servers": self.proxy.address, "kafka_profile": "kafka", **values}
        return Settings(_env_file=None, **values)


def _create_bucket(infra: EmbeddedInfra, bucket: str) -> None:
    settings = Settings(_env_file=None, **{key.lower(): value for key, value in infra.settings_env().items()})
    client = make_s3_client(settings)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("failover")


@pytest.fixture(scope="module")
def broker(workdir: Path, infra: EmbeddedInfra) -> Iterator[ProxiedBroker]:
    """This module's broker, stored in the session's S3 server, reached through a fault proxy."""
    _create_bucket(infra, BROKER_BUCKET)
    port = free_port()
    with FaultProxy("127.0.0.1", port) as proxy:
        process = start_tansu(infra, port, advertised_port=proxy.port, bucket=BROKER_BUCKET, log_dir=workdir)
        try:
            wait_for_port("127.0.0.1", port, START_TIMEOUT_S, process.proc)
            yield ProxiedBroker(proxy, process)
        finally:
            process.stop(grace_s=10)


@pytest.fixture
def proxy(broker: ProxiedBroker) -> Iterator[FaultProxy]:
    """The broker's proxy, forwarding everything again after each test, whatever it left."""
    yield broker.proxy
    broker.proxy.resume()
    broker.proxy.forward_new()


def create_topic(settings: Settings, topic: str, timeout_s: float = 30.0) -> None:
    admin = AdminClient(kafka.client_config(settings))
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)], request_timeout=timeout_s)
    futures[topic].result(timeout=timeout_s)


def read_topic(settings: Settings, topic: str, timeout_s: float = 20.0) -> list[bytes]:
    """Every message's value in ``topic`` (one partition), from its start to its end."""
    consumer = Consumer(
        {
            **kafka.client_config(settings),
            "group.id": f"reader-{uuid.uuid4()}",  # assign() below: the group is never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                return values
            assert error is None, error
            values.append(message.value() or b"")
        raise TimeoutError(f"{topic} not read to its end within {timeout_s} s (got {len(values)})")
    finally:
        consumer.close()


def produce_one(settings: Settings, topic: str, value: bytes) -> None:
    producer = kafka.SyncProducer(settings)
    try:
        producer.send(topic, "key", value)
    finally:
        producer.close()


def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout_s} s")
        time.sleep(0.05)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP server on loopback that echoes what each client sends; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        with ThreadPoolExecutor(4) as pool:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    pool.submit(echo, server.accept()[0])

    def echo(connection: socket.socket) -> None:
        connection.settimeout(5)
        with connection, contextlib.suppress(OSError):
            while data := connection.recv(4096):
                connection.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stopping.set()
        thread.join(10)
        server.close()


def exchange(port: int, data: bytes, timeout_s: float = 2.0) -> bytes:
    """Send ``data`` on a new connection and read the echo: b"" if the connection was reset or
    closed, TimeoutError if nothing came."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(data)
            received = b""
            while len(received) < len(data) and (chunk := sock.recv(4096)):
                received += chunk
            return received
    except ConnectionResetError:  # on loopback the reset may come before connect() returns
        return b""


@pytest.mark.timeout(30)
def test_the_proxy_plays_each_fault() -> None:
    """Forwarding, a stall (bytes held, then delivered in order), drop_all (the client's
    connection reset), refused and blackholed new connections, each back to normal after."""
    with echo_server() as upstream, FaultProxy("127.0.0.1", upstream) as proxy:
        assert exchange(proxy.port, b"plain") == b"plain"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            proxy.stall(0.5)
            started = time.monotonic()
            for part in (b"one ", b"two ", b"three"):
                held.sendall(part)
            received = b""
            while len(received) < len(b"one two three"):
                received += held.recv(4096)
            assert received == b"one two three"
            assert 0.5 <= time.monotonic() - started < 1.5
            proxy.drop_all()
            with pytest.raises(ConnectionResetError):
                held.recv(4096)
        proxy.refuse_new(0.5)
        assert exchange(proxy.port, b"refused") == b""
        time.sleep(0.6)
        proxy.blackhole_new()
        with pytest.raises(TimeoutError):
            exchange(proxy.port, b"blackholed", timeout_s=0.5)
        proxy.forward_new()
        assert exchange(proxy.port, b"back") == b"back"
        assert proxy.accepted == 5


@pytest.mark.timeout(60)
def test_a_stall_delays_the_acknowledgement_by_its_length(broker: ProxiedBroker, proxy: FaultProxy) -> None:
    """The proxy's stall is what the tests below take it for: the broker stores at once, the
    producer hears of it ``stall`` seconds later, in order, and nothing is doubled."""
    settings = broker.settings()
    topic = "failover_probe"
    create_topic(settings, topic)
    producer = kafka.SyncProducer(settings)
    try:
        producer.send(topic, "warm", b"warm")  # connections and metadata in place
        started = time.monotonic()
        producer.send(topic, "quick", b"quick")
        quick_s = time.monotonic() - started
        proxy.stall(3.0)
        started = time.monotonic()
        producer.send(topic, "late", b"late")
        late_s = time.monotonic() - started
    finally:
        producer.close()
    assert quick_s < 1.0
    assert 3.0 <= late_s < 3.0 + 1.0, late_s
    assert read_topic(settings, topic) == [b"warm", b"quick", b"late"]


# --- POST /generate while the broker's answers are late ------------------------------------------

TASK = {
    # Public-looking URLs: with external infrastructure the API refuses internal ones. No worker
    # reads these topics, so they are never fetched.
    "spk_audio_prompt": "https://voices.example.com/speaker.wav",
    "text": "A task queued while the cluster fails over.",
    "hook_url": "https://hooks.example.com/tts",
}
HTTP_TIMEOUT_S = 60.0  # longer than any verdict the API may wait for (30 s and its margin)
# Once the broker answers again, the API accepts tasks again within this (it probes every second).
BACK_IN_S = 5.0


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: httpx.Headers
    seconds: float  # how long the request took
    at: float  # when the answer came (time.monotonic())


def post_task(client: httpx.Client) -> Answer:
    started = time.monotonic()
    response = client.post("/generate", json=TASK)
    now = time.monotonic()
    return Answer(response.status_code, response.json(), response.headers, now - started, now)


def post_until_accepted(client: httpx.Client, timeout_s: float) -> tuple[Answer, list[Answer]]:
    """POST every 0.2 s until a task is accepted: that answer, and the refusals before it."""
    deadline = time.monotonic() + timeout_s
    refused: list[Answer] = []
    while time.monotonic() < deadline:
        answer = post_task(client)
        if answer.status == 200:
            return answer, refused
        refused.append(answer)
        time.sleep(0.2)
    raise TimeoutError(f"no task accepted within {timeout_s} s; {len(refused)} refusals, the last {refused[-1:]}")


@dataclass(frozen=True)
class ApiUnderTest:
    base_url: str
    client: httpx.Client
    settings: Settings  # for reading its task topic back
    task_topic: str

    def post_together(self, count: int) -> list[Answer]:
        """``count`` POSTs at once, each on a connection of its own (the API batches them)."""

        def post(_: int) -> Answer:
            with httpx.Client(base_url=self.base_url, auth=self.client.auth, timeout=HTTP_TIMEOUT_S) as client:
                return post_task(client)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(post, range(count)))

    def task_uuids(self) -> list[str]:
        """The task ids in the task topic, in order, as often as each is stored."""
        return [json.loads(value)["task_uuid"] for value in read_topic(self.settings, self.task_topic)]


@contextlib.contextmanager
def api_behind_proxy(
    workdir: Path, infra: EmbeddedInfra, broker: ProxiedBroker, name: str, **env: str
) -> Iterator[ApiUnderTest]:
    """An API-only process whose broker is the proxied one, with the operator's-Kafka profile, on
    topics of its own that no worker reads; S3 is the session's. One task is queued first, so that
    its producer's connections and metadata are in place before a fault."""
    topics = own_topics(name.replace("-", "_"))
    with (
        api_role(
            workdir,
            infra,
            name,
            KAFKA_BOOTSTRAP_SERVERS=broker.proxy.address,
            KAFKA_PROFILE="kafka",
            KAFKA_TOPIC_PARTITIONS="1",
            **topics,
            **env,
        ) as base_url,
        httpx.Client(base_url=base_url, auth=(API_USER, API_PASSWORD), timeout=HTTP_TIMEOUT_S) as client,
    ):
        warm = post_task(client)
        assert warm.status == 200, warm
        yield ApiUnderTest(base_url, client, broker.settings(), topics["KAFKA_TASK_TOPIC"])


@pytest.mark.timeout(90)
def test_post_waits_out_a_stall_longer_than_the_old_timeout(
    workdir: Path, infra: EmbeddedInfra, broker: ProxiedBroker, proxy: FaultProxy
) -> None:
    """Acknowledgements 12 s late: the API used to give up at 8 s and answer 503 "nothing was
    queued" for tasks that were stored. Now it waits (delivery timeout 30 s) and answers 200 when
    the broker's answer comes, a lone request and the batch behind it alike; each task is stored
    once."""
    with api_behind_proxy(workdir, infra, broker, "failover-stall") as api:
        proxy.stall(FAILOVER_STALL_S)
        stall_ends = time.monotonic() + FAILOVER_STALL_S
        # One request alone (the producer's express lane), then three while it waits (batched).
        with ThreadPoolExecutor(1) as pool:
            lone = pool.submit(post_task, api.client)
            time.sleep(0.5)
            batched = api.post_together(3)
            answers = [lone.result(), *batched]
        stored = api.task_uuids()
    for answer in answers:
        assert answer.status == 200, answer
        assert stall_ends - 0.1 <= answer.at < stall_ends + 3, answer  # when the broker's answer came
        assert stored.count(answer.body["task_uuid"]) == 1
    assert len(stored) == 1 + len(answers)  # and the warm-up task


@pytest.mark.timeout(90)
def test_post_answers_504_queued_unknown_when_the_verdict_is_later_than_the_timeout(
    workdir: Path, infra: EmbeddedInfra, broker: ProxiedBroker, proxy: FaultProxy
) -> None:
    """Answers later than the delivery timeout (4 s here, an 8 s stall): the task was sent and the
    broker stored it, only its answer is late. The API must not say "nothing was queued" (503): it
    answers 504 with "queued": "unknown", the task's id and a Retry-After, within its timeout. When
    the broker answers again, tasks are accepted again."""
    with api_behind_proxy(workdir, infra, broker, "failover-unknown", KAFKA_DELIVERY_TIMEOUT_MS="4000") as api:
        proxy.stall(8.0)
        answer = post_task(api.client)
        wait_until("the stall over", lambda: not proxy.stalled, 10)
        over = time.monotonic()
        after, refused = post_until_accepted(api.client, 30)
        back_in_s = time.monotonic() - over
        stored = api.task_uuids()
    assert answer.status == 504, answer
    assert answer.body["queued"] == "unknown" and answer.body["error"], answer
    assert int(answer.headers["Retry-After"]) > 0
    assert 4.0 <= answer.seconds < 8.0, answer  # its own timeout, not the stall's end
    # The proxy passed the request on, so the broker stored it: a 503 would have been false.
    assert stored.count(answer.body["task_uuid"]) == 1
    assert stored.count(after.body["task_uuid"]) == 1
    assert len(stored) == 3, "a refusal was stored"  # the warm-up task, the 504's and the 200's
    assert {a.status for a in refused} <= {503}, refused
    assert back_in_s < BACK_IN_S, f"503 for {back_in_s:.1f} s after the broker answered again ({len(refused)})"


@pytest.mark.timeout(90)
def test_post_answers_503_only_when_nothing_was_sent(
    workdir: Path, infra: EmbeddedInfra, broker: ProxiedBroker, proxy: FaultProxy
) -> None:
    """The other side: with the broker unreachable (connections reset, new ones refused) a task
    cannot reach it, so 503 "nothing was queued" is true, and it comes at once. Once the broker is
    reachable again, tasks are accepted again within seconds."""
    with api_behind_proxy(workdir, infra, broker, "failover-down") as api:
        proxy.refuse_new()
        proxy.drop_all()
        time.sleep(1.0)  # librdkafka reports every broker down once its reconnects are refused
        answer = post_task(api.client)
        proxy.forward_new()
        back = time.monotonic()
        _, refused = post_until_accepted(api.client, 40)
        back_in_s = time.monotonic() - back
        stored = api.task_uuids()
    assert answer.status == 503, answer
    assert answer.seconds < 1.0, answer
    assert {a.status for a in refused} <= {503}, refused
    assert len(stored) == 2, "a refusal was stored"  # the warm-up task and the one accepted after
    assert back_in_s < BACK_IN_S, f"503 for {back_in_s:.1f} s after the broker was back ({len(refused)} refusals)"


# --- consumer groups while the coordinator moves -------------------------------------------------

# A group's first join on Tansu takes about half the session timeout (23 s at 45 s, 3 s at 6 s).
JOIN_TIMEOUT_S = 45.0


@dataclass
class GroupMember:
    """A consumer of one topic, polled in a thread of its own, that records every rebalance
    callback: when it was given partitions and when it had them taken away or lost them."""

    consumer: Consumer
    topic: str
    started: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)  # "<seconds since start> s assigned|revoked|lost <n>"
    received: list[bytes] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> GroupMember:
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._recorder("assigned"),
            on_revoke=self._recorder("revoked"),
            on_lost=self._recorder("lost"),  # a session given up: partitions lost, not handed over
        )
        self._thread = threading.Thread(target=self._poll, name=f"member-{self.topic}", daemon=True)
        self._thread.start()
        return self

    def _recorder(self, what: str) -> Callable[[Consumer, list[TopicPartition]], None]:
        def record(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            # Cooperative rebalancing calls back with no partitions when nothing changes for us;
            # closing the consumer revokes its partitions, which is no loss either.
            if partitions and not self._stopping.is_set():
                self.events.append(f"{time.monotonic() - self.started:.1f} s {what} {len(partitions)}")

        return record

    def _poll(self) -> None:
        while not self._stopping.is_set():
            message = self.consumer.poll(0.1)  # the rebalance callbacks run in here, on this thread
            if message is not None and message.error() is None:
                self.received.append(message.value() or b"")

    def assignments(self) -> int:
        return sum(" assigned " in event for event in self.events)

    def losses(self) -> list[str]:
        return [event for event in self.events if " assigned " not in event]

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        self.consumer.close()


@contextlib.contextmanager
def group_member(settings: Settings, topic: str) -> Iterator[GroupMember]:
    """The one member of a new consumer group, built as the workers build theirs, once it holds
    its partition."""
    create_topic(settings, topic)
    member = GroupMember(kafka.make_consumer(settings, f"failover-{uuid.uuid4()}"), topic).start()
    try:
        wait_until("assigned a partition", lambda: member.assignments() > 0, JOIN_TIMEOUT_S)
        yield member
    finally:
        member.close()


@pytest.mark.timeout(120)
def test_kafka_profile_keeps_its_partitions_while_the_coordinator_moves(
    broker: ProxiedBroker, proxy: FaultProxy
) -> None:
    """The operator's-Kafka profile (45 s session): the coordinator answers 10 s late, then its
    connections are reset and new ones refused for 10 s; the member keeps its partition through
    both (no revoke, no loss) and consumes a message produced afterwards."""
    settings = broker.settings()
    assert kafka.tuning(settings).session_timeout_ms > 2 * COORDINATOR_MOVE_S * 1000
    with group_member(settings, "failover_group_kafka") as member:
        proxy.stall(COORDINATOR_MOVE_S)
        time.sleep(COORDINATOR_MOVE_S + 1)
        assert member.losses() == [], member.events
        proxy.refuse_new(COORDINATOR_MOVE_S)
        proxy.drop_all()
        time.sleep(COORDINATOR_MOVE_S + 1)
        produce_one(settings, member.topic, b"after the move")
        wait_until("consumed after the move", lambda: b"after the move" in member.received, 20)
        assert member.losses() == [], member.events
        assert member.assignments() == 1, member.events


@pytest.mark.timeout(90)
def test_embedded_profile_loses_its_partitions_while_the_coordinator_moves(
    broker: ProxiedBroker, proxy: FaultProxy
) -> None:
    """The contrast case, and why the embedded profile must not be used for an operator's Kafka:
    with its 6 s session the same 10 s of late answers cost the member its partition (librdkafka
    gives the session up after 6 s without a heartbeat answer); every worker of a group would lose
    its partitions at once and the group would rebalance from scratch."""
    settings = broker.settings(kafka_profile="embedded")
    assert kafka.tuning(settings).session_timeout_ms < COORDINATOR_MOVE_S * 1000
    with group_member(settings, "failover_group_embedded") as member:
        proxy.stall(COORDINATOR_MOVE_S)
        wait_until("lost its partition", lambda: bool(member.losses()), COORDINATOR_MOVE_S)
        proxy.resume()
        wait_until("given its partition again", lambda: member.assignments() > 1, 20)  # by joining anew


# --- the profile in force ------------------------------------------------------------------------


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)


def test_an_operators_kafka_gets_kafkas_defaults() -> None:
    tuned = kafka.tuning(settings(kafka_bootstrap_servers="x:9092"))
    assert (tuned.profile, tuned.session_timeout_ms, tuned.heartbeat_interval_ms) == ("kafka", 45_000, 3_000)
    assert (tuned.fetch_wait_max_ms, tuned.delivery_timeout_ms) == (500, 30_000)


@pytest.mark.parametrize("values", [{}, {"kafka_bootstrap_servers": "x:9092", "kafka_profile": "embedded"}])
def test_the_embedded_broker_gets_the_embedded_profile(values: dict[str, str]) -> None:
    """Auto with no KAFKA_BOOTSTRAP_SERVERS (the service starts its own broker), or asked for."""
    tuned = kafka.tuning(settings(**values))
    assert (tuned.profile, tuned.session_timeout_ms, tuned.heartbeat_interval_ms) == ("embedded", 6000, 2000)
    assert (tuned.fetch_wait_max_ms, tuned.delivery_timeout_ms) == (20, 30_000)


@pytest.mark.parametrize("profile", ["embedded", "kafka"])
def test_overrides_apply_to_either_profile(profile: str) -> None:
    tuned = kafka.tuning(
        settings(
            kafka_bootstrap_servers="x:9092",
            kafka_profile=profile,
            kafka_session_timeout_ms=20_000,
            kafka_heartbeat_interval_ms=4_000,
            kafka_fetch_wait_max_ms=0,  # zero is a value, not "unset"
            kafka_delivery_timeout_ms=60_000,
        )
    )
    assert tuned.profile == profile
    assert (tuned.session_timeout_ms, tuned.heartbeat_interval_ms) == (20_000, 4_000)
    assert (tuned.fetch_wait_max_ms, tuned.delivery_timeout_ms) == (0, 60_000)


def test_roles_pointed_at_the_embedded_servers_use_the_embedded_profile(tmp_path: Path) -> None:
    """`indextts-api infra` prints these settings for roles on other hosts: with them, a role talks
    to an embedded broker that it did not start, and must still tune for Tansu."""
    credentials = EmbeddedCredentials("access", "secret", "admin", "password")
    env = EmbeddedInfra(data_dir=tmp_path, credentials=credentials, kafka_port=9092).settings_env()
    assert env["KAFKA_PROFILE"] == "embedded"
    assert kafka.tuning(settings(**{key.lower(): value for key, value in env.items()})).profile == "embedded"
    # Without it, the same address is an operator's Kafka.
    assert kafka.tuning(settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])).profile == "kafka"
