"""Development helpers: a real webhook receiver for trying the service and for its tests.

python -m indextts_api.devtools --port 9000     # prints every webhook it receives
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    answered: int = 200  # the status code the receiver answered with

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class WebhookReceiver:
    """An HTTP server on loopback that records POSTs. ``script(path, codes, delay_s)`` makes it answer
    the next requests to ``path`` with those status codes, after a delay (a slow receiver)."""

    host: str = "127.0.0.1"
    port: int = 0
    echo: bool = False
    received: list[ReceivedWebhook] = field(default_factory=list)
    status_codes: dict[str, list[int]] = field(default_factory=dict)
    delays_s: dict[str, float] = field(default_factory=dict)

    def script(self, path: str, codes: list[int] | None = None, delay_s: float = 0.0) -> None:
        with self._lock:
            self.status_codes[path] = list(codes or [])
            self.delays_s[path] = delay_s

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    scripted = receiver.status_codes.get(self.path)
                    code = scripted.pop(0) if scripted else 200
                    delay = receiver.delays_s.get(self.path, 0.0)
                time.sleep(delay)
                hook = ReceivedWebhook(self.path, dict(self.headers.items()), body, time.time(), code)
                with receiver._lock:
                    receiver.received.append(hook)
                    receiver._lock.notify_all()
                if receiver.echo:
                    print(json.dumps({"path": hook.path, "status": code, "body": hook.payload}), flush=True)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def wait_for(
        self, task_uuid: str, timeout_s: float = 60.0, count: int = 1, delivered: bool = True
    ) -> list[ReceivedWebhook]:
        """The requests received for ``task_uuid`` once ``count`` of them were answered 2xx (or, with
        ``delivered=False``, once there are ``count`` of them at all); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                hooks = [h for h in self.received if h.payload.get("task_uuid") == task_uuid]
                counted = [h for h in hooks if 200 <= h.answered < 300] if delivered else hooks
                if len(counted) >= count:
                    return counted if delivered else hooks
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no webhook for task {task_uuid} within {timeout_s:.0f} s")
                self._lock.wait(remaining)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the webhooks the service sends")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    receiver = WebhookReceiver(args.host, args.port, echo=True).start()
    print(f"listening for webhooks on {receiver.url('/')}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
