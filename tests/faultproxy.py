"""A fault-injecting TCP proxy for the tests: a broker whose answers are late, or that goes away.

On a real Kafka cluster a broker failover looks, from a client, like this: acks=all writes are
stored but their answers come 9-10.5 s late, connections to the old coordinator die, and new
connections to it fail for a while. This proxy sits between the clients and a broker and plays
those faults on demand:

- ``stall(seconds)``: upstream->client bytes (the broker's responses) are read and held, then
  delivered in order when the stall ends. Requests still reach the broker, so what it stores is
  stored: only the client's knowledge of it is late.
- ``drop_all()``: every current connection is reset (a dead coordinator's sockets).
- ``refuse_new(seconds)`` / ``blackhole_new(seconds)``: new connections are reset at once (a port
  nobody listens on), or accepted and never answered (a host that is gone).

(Toxiproxy does this too, but it is a Go server, not installed here; its Python package is only
a client for it.)

One thread runs a selector over every socket, so all socket work happens there and the control
methods only set state (``drop_all`` waits until the loop has done it). Every wait is bounded:
the loop wakes every ``_TICK_S``, upstream connects time out, ``close()`` joins with a timeout.
"""

from __future__ import annotations

import contextlib
import enum
import math
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_TICK_S = 0.02  # how late a stall's end (or a mode change) is noticed, at most
_READ_BYTES = 65536
# Bytes held per direction before the proxy stops reading (the kernel's buffers then push back).
_HOLD_LIMIT = 16 * 1024 * 1024
_CONNECT_TIMEOUT_S = 2.0
_CLOSE_TIMEOUT_S = 5.0


class NewConnections(enum.Enum):
    FORWARD = "forward"
    REFUSE = "refuse"  # accepted, then reset at once: like a port nobody listens on
    BLACKHOLE = "blackhole"  # accepted, read and never answered: like a host that is gone


@dataclass(eq=False)
class _Pair:
    """One client connection and its upstream connection (None when blackholed)."""

    client: socket.socket
    upstream: socket.socket | None
    to_client: bytearray = field(default_factory=bytearray)
    to_upstream: bytearray = field(default_factory=bytearray)
    upstream_eof: bool = False  # the broker closed: close the client once what it sent is delivered


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer's kernel would, not a polite FIN."""
    with contextlib.suppress(OSError):  # already broken: closing is all there is left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards each connection to ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stalled_until = 0.0  # monotonic time; math.inf: until resume()
        self._mode = NewConnections.FORWARD
        self._mode_until = math.inf
        self._drop_requests: list[threading.Event] = []
        self._pairs: list[_Pair] = []
        self._selector = selectors.DefaultSelector()
        self._registered: dict[socket.socket, int] = {}  # what each socket is registered for
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.port}", daemon=True)
        self.accepted = 0  # connections accepted so far, whatever became of them

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    # ---- faults (callable from any thread) ----

    def stall(self, seconds: float | None = None) -> None:
        """Hold the broker's responses for ``seconds`` from now (None: until ``resume()``)."""
        with self._lock:
            self._stalled_until = math.inf if seconds is None else time.monotonic() + seconds

    def resume(self) -> None:
        """Deliver held responses now, in order, and stop holding."""
        with self._lock:
            self._stalled_until = 0.0

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    def refuse_new(self, seconds: float | None = None) -> None:
        """Reset new connections for ``seconds`` (None: until ``forward_new()``); current ones go on."""
        self._set_mode(NewConnections.REFUSE, seconds)

    def blackhole_new(self, seconds: float | None = None) -> None:
        """Accept new connections and never answer them (they stay so after ``seconds``, as a
        client's connection to a vanished host does until its own timeout gives up on it)."""
        self._set_mode(NewConnections.BLACKHOLE, seconds)

    def forward_new(self) -> None:
        self._set_mode(NewConnections.FORWARD, None)

    @property
    def new_connections(self) -> NewConnections:
        """What happens to a connection made now."""
        with self._lock:
            return NewConnections.FORWARD if time.monotonic() >= self._mode_until else self._mode

    def _set_mode(self, mode: NewConnections, seconds: float | None) -> None:
        with self._lock:
            self._mode = mode
            self._mode_until = math.inf if seconds is None else time.monotonic() + seconds

    def drop_all(self, timeout_s: float = 2.0) -> None:
        """Reset every current connection; returns once the proxy's thread has done it."""
        done = threading.Event()
        with self._lock:
            self._drop_requests.append(done)
        if not done.wait(timeout_s):
            raise TimeoutError("the proxy did not drop its connections in time")

    # ---- lifecycle ----

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(_CLOSE_TIMEOUT_S)
        else:  # never started: the loop will not close them
            self._selector.close()
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- the loop (the proxy's thread only) ----

    def _run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                self._handle_requests()
                self._update_interest()
                for key, events in self._selector.select(_TICK_S):
                    self._on_ready(key.fileobj, events)  # type: ignore[arg-type]
        finally:
            for pair in list(self._pairs):
                self._close_pair(pair)
            self._selector.close()
            self._listener.close()

    def _handle_requests(self) -> None:
        with self._lock:
            drops, self._drop_requests = self._drop_requests, []
            if time.monotonic() >= self._mode_until:
                self._mode, self._mode_until = NewConnections.FORWARD, math.inf
        if drops:
            for pair in list(self._pairs):
                self._close_pair(pair)
            for done in drops:
                done.set()

    def _update_interest(self) -> None:
        """What each socket waits for now: reads while there is room, writes while bytes wait
        (and, towards a client, only while not stalled)."""
        stalled = self.stalled
        for pair in list(self._pairs):
            if pair.upstream_eof and not pair.to_client and not stalled:
                self._close_pair(pair)
                continue
            client_events = selectors.EVENT_READ if len(pair.to_upstream) < _HOLD_LIMIT else 0
            if pair.to_client and not stalled:
                client_events |= selectors.EVENT_WRITE
            self._want(pair.client, client_events)
            if pair.upstream is not None:
                upstream_events = 0
                if not pair.upstream_eof and len(pair.to_client) < _HOLD_LIMIT:
                    upstream_events |= selectors.EVENT_READ
                if pair.to_upstream:
                    upstream_events |= selectors.EVENT_WRITE
                self._want(pair.upstream, upstream_events)

    def _want(self, sock: socket.socket, events: int) -> None:
        current = self._registered.get(sock, 0)
        if events == current:
            return
        if current == 0:
            self._selector.register(sock, events)
        elif events == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events)
        if events:
            self._registered[sock] = events
        else:
            self._registered.pop(sock, None)

    def _on_ready(self, sock: socket.socket, events: int) -> None:
        if sock is self._listener:
            self._accept()
            return
        pair = next((p for p in self._pairs if sock in (p.client, p.upstream)), None)
        if pair is None:
            return  # closed earlier in this round
        try:
            if events & selectors.EVENT_READ:
                self._read(pair, sock)
            if events & selectors.EVENT_WRITE and pair in self._pairs:
                self._write(pair, sock)
        except OSError:
            self._close_pair(pair)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        mode = self.new_connections
        if mode is NewConnections.REFUSE:
            _reset(client)
            return
        upstream = None
        if mode is NewConnections.FORWARD:
            try:
                upstream = socket.create_connection(self.upstream, timeout=_CONNECT_TIMEOUT_S)
            except OSError:
                _reset(client)  # the broker is down: the client sees what it would see without us
                return
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pairs.append(_Pair(client, upstream))

    def _read(self, pair: _Pair, sock: socket.socket) -> None:
        data = sock.recv(_READ_BYTES)
        if sock is pair.client:
            if not data:
                self._close_pair(pair)  # the client left: nothing more to deliver to it
            elif pair.upstream is not None:  # a blackholed client's bytes go nowhere
                pair.to_upstream += data
        elif data:
            pair.to_client += data
        else:
            pair.upstream_eof = True

    def _write(self, pair: _Pair, sock: socket.socket) -> None:
        pending = pair.to_client if sock is pair.client else pair.to_upstream
        del pending[: sock.send(pending)]

    def _close_pair(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            if self._registered.pop(sock, 0):
                self._selector.unregister(sock)
            _reset(sock)
        self._pairs.remove(pair)
