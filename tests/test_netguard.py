"""SSRF rules: every internal address form is refused, at submission and at connection time."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from indextts_api import netguard
from indextts_api.httpclient import make_http_client
from indextts_api.infra.process import free_port
from tests.conftest import API_PASSWORD, API_USER

INTERNAL_URLS = [
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/x",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://100.64.0.1/",  # CGNAT
    "http://224.0.0.1/",
    "http://239.255.255.250/",  # multicast
    "http://0.0.0.0/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",  # unspecified, reserved, broadcast
    "http://2130706433/",
    "http://017700000001/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://127.1/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[ff02::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:c0a8:101::]/",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_known_internal_urls_are_refused_at_submission(url: str) -> None:
    assert netguard.known_internal_reason(url) is not None


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_urls_are_refused_at_connection(url: str) -> None:
    with (
        make_http_client(connect_timeout_s=1, read_timeout_s=1, allow_private=False) as client,
        pytest.raises(httpx.ConnectError, match=r"not a public address|is local"),
    ):
        client.get(url)


@pytest.mark.parametrize(
    "url", ["https://example.com/hook", "http://93.184.216.34/x", "http://[2606:2800:220:1::]/", "http://8.8.8.8/"]
)
def test_public_urls_pass_the_submission_check(url: str) -> None:
    assert netguard.known_internal_reason(url) is None


def test_names_resolving_inside_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # No DNS server can be reached here; the resolver's answer is stood in for, the rule is real.
    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        answers = {"rebind.example": ["93.184.216.34", "127.0.0.1"], "public.example": ["93.184.216.34"]}
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(netguard.socket, "getaddrinfo", resolver)
    with pytest.raises(netguard.ForbiddenAddress, match="non-public"):
        netguard.resolve_public("rebind.example", 80)
    # The checked address is the one connected to: no second lookup that could answer differently.
    assert netguard.resolve_public("public.example", 80) == "93.184.216.34"


class _Redirect(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def redirecting_server() -> Iterator[tuple[str, list[str]]]:
    """A real server on 127.0.0.2 redirecting to a real one on 127.0.0.1 that records if it is reached."""
    reached: list[str] = []

    class Inside(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reached.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    inside = ThreadingHTTPServer(("127.0.0.1", 0), Inside)
    handler = type("R", (_Redirect,), {"target": f"http://127.0.0.1:{inside.server_address[1]}/secret"})
    outside = ThreadingHTTPServer(("127.0.0.2", free_port("127.0.0.2")), handler)
    for server in (inside, outside):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{outside.server_address[1]}/voice.wav", reached
    for server in (inside, outside):
        server.shutdown()
        server.server_close()


def test_redirect_to_an_internal_address_is_refused(
    redirecting_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, reached = redirecting_server
    # 127.0.0.2 plays the public host (only that classification is changed); 127.0.0.1 stays internal.
    real_is_public = netguard.is_public
    monkeypatch.setattr(netguard, "is_public", lambda a: str(a) == "127.0.0.2" or real_is_public(a))
    with (
        make_http_client(connect_timeout_s=2, read_timeout_s=2, allow_private=False, max_redirects=3) as client,
        pytest.raises(httpx.ConnectError, match=r"127\.0\.0\.1 is not a public address"),
    ):
        client.get(url)
    assert reached == []


@pytest.mark.parametrize("url", INTERNAL_URLS)
@pytest.mark.parametrize("field", ["hook_url", "spk_audio_prompt", "emo_audio_prompt"])
def test_api_refuses_internal_urls_with_400(public_api: str, field: str, url: str) -> None:
    body: dict[str, object] = {
        "spk_audio_prompt": "https://voices.example.com/a.wav",
        "text": "hi",
        "hook_url": "https://hooks.example.com/h",
    }
    if field == "emo_audio_prompt":
        body["params"] = {"emo_control_method": 1, "emo_audio_prompt": url}
    else:
        body[field] = url
    response = httpx.post(f"{public_api}/generate", json=body, auth=(API_USER, API_PASSWORD), timeout=10)
    assert response.status_code == 400, response.text
    assert "only public URLs are allowed" in response.json()["error"]
