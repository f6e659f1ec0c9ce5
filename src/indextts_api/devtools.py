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

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class WebhookReceiver:
    """An HTTP server on loopback that records POSTs; ``status_codes`` scripts its answers in turn."""

    host: str = "127.0.0.1"
    port: int = 0
    status_codes: list[int] = field(default_factory=list)
    echo: bool = False
    received: list[ReceivedWebhook] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                hook = ReceivedWebhook(self.path, dict(self.headers.items()), self.rfile.read(length), time.time())
                with receiver._lock:
                    code = receiver.status_codes.pop(0) if receiver.status_codes else 200
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

    def wait_for(self, task_uuid: str, timeout_s: float = 60.0, count: int = 1) -> list[ReceivedWebhook]:
        """The webhooks received for ``task_uuid`` once there are ``count`` of them (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                hooks = [h for h in self.received if h.payload.get("task_uuid") == task_uuid]
                if len(hooks) >= count:
                    return hooks
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
