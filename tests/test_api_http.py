"""The HTTP contract of the API: auth, validation errors, health, OpenAPI."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra
from tests.conftest import API_PASSWORD, API_USER, Service, api_role, own_topics


@pytest.fixture
def valid(receiver: WebhookReceiver) -> dict[str, object]:
    """A valid body; accepted tasks are synthesized, so their webhooks go to a receiver that answers 200."""
    return {"spk_audio_prompt": "example.wav", "text": "Hello there.", "hook_url": receiver.url("/api-tests")}


def test_health_has_the_spec_fields(service: Service) -> None:
    response = httpx.get(f"{service.base_url}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert isinstance(body["timestamp"], int)
    assert body["model_version"]
    assert body["engine"]["name"] == "piper"


@pytest.mark.parametrize(
    "auth",
    [None, ("tester", "wrong-password"), ("someone-else", "correct-horse-battery-staple")],
    ids=["no-credentials", "wrong-password", "wrong-user"],
)
def test_generate_requires_basic_auth(service: Service, auth: tuple[str, str] | None, valid: dict[str, object]) -> None:
    response = httpx.post(f"{service.base_url}/generate", json=valid, auth=auth, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert response.json() == {"error": "Authentication required"}


@pytest.mark.parametrize("missing", ["spk_audio_prompt", "text", "hook_url"])
def test_each_missing_required_field_is_400(api: httpx.Client, missing: str, valid: dict[str, object]) -> None:
    body = {key: value for key, value in valid.items() if key != missing}
    response = api.post("/generate", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": f"{missing}: required field is missing"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "body:"), (b'"text"', "body:")],
    ids=["not-json", "array", "string"],
)
def test_body_that_is_not_a_json_object_is_400(api: httpx.Client, content: bytes, expected: str) -> None:
    response = api.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert expected in response.json()["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": "   "}, "text"),
        ({"hook_url": "not a url"}, "hook_url"),
        ({"hook_url": "ftp://example.com/hook"}, "hook_url"),
        ({"spk_audio_prompt": "/etc/passwd"}, "spk_audio_prompt"),
        ({"spk_audio_prompt": "../secrets.wav"}, "spk_audio_prompt"),
        ({"spk_audio_prompt": "file:///etc/passwd"}, "spk_audio_prompt"),
        ({"spk_audio_prompt": "missing.wav"}, "spk_audio_prompt"),
        ({"params": {"temprature": 0.5}}, "params.temprature"),
        ({"params": {"temperature": 5}}, "params.temperature"),
        ({"params": {"emo_control_method": "1"}}, "params.emo_control_method"),
    ],
)
def test_invalid_values_are_400_naming_the_field(
    api: httpx.Client, change: dict[str, object], field: str, valid: dict[str, object]
) -> None:
    response = api.post("/generate", json={**valid, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_unknown_param_lists_accepted_keys(api: httpx.Client, valid: dict[str, object]) -> None:
    response = api.post("/generate", json={**valid, "params": {"temprature": 0.5}})
    assert "accepted keys in params:" in response.json()["error"]
    assert "temperature" in response.json()["error"]


def test_oversized_body_is_413(api: httpx.Client, valid: dict[str, object]) -> None:
    response = api.post("/generate", json={**valid, "text": "a" * 300_000})
    assert response.status_code == 413
    assert "error" in response.json()


def test_openapi_and_docs_are_served(service: Service) -> None:
    spec = httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()
    assert {"/health", "/generate"} <= set(spec["paths"])
    assert httpx.get(f"{service.base_url}/docs", timeout=10).status_code == 200


# Every range of the spec's params, at the edge (accepted) and just past it (400).
RANGE_EDGES: list[tuple[str, object, object]] = [
    ("emo_control_method", 0, -1),
    ("emo_control_method", 3, 4),
    ("emo_weight", 0.0, -0.01),
    ("emo_weight", 1.0, 1.01),
    ("temperature", 0.1, 0.09),
    ("temperature", 2.0, 2.01),
    ("top_p", 0.0, -0.01),
    ("top_p", 1.0, 1.01),
    ("top_k", 0, -1),
    ("top_k", 100, 101),
    ("max_text_tokens_per_segment", 1, 0),
    ("max_text_tokens_per_segment", 600, 601),
    ("num_beams", 1, 0),
    ("num_beams", 10, 11),
    ("repetition_penalty", 0.01, 0.0),
    ("repetition_penalty", 100.0, 100.1),
    ("max_mel_tokens", 1, 0),
    ("max_mel_tokens", 1815, 1816),
    ("length_penalty", -2.0, -2.1),
    ("length_penalty", 2.0, 2.1),
    *[(f"vec{i}", edge, bad) for i in range(1, 9) for edge, bad in ((0.0, -0.1), (1.0, 1.1))],
]


@pytest.mark.parametrize(("field", "edge", "beyond"), RANGE_EDGES, ids=[f"{f}={b}" for f, _, b in RANGE_EDGES])
def test_param_ranges_edges_accepted_and_beyond_refused(
    api: httpx.Client, field: str, edge: object, beyond: object, valid: dict[str, object]
) -> None:
    accepted = api.post("/generate", json={**valid, "params": {field: edge}})
    assert accepted.status_code == 200, accepted.text
    refused = api.post("/generate", json={**valid, "params": {field: beyond}})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith(f"params.{field}:")


WRONG_TYPES: list[tuple[str, object]] = [
    ("emo_control_method", 1.0),
    ("emo_control_method", True),
    ("temperature", "0.8"),
    ("top_k", 30.5),
    ("do_sample", 1),
    ("do_sample", "true"),
    ("emo_random", 0),
    ("num_beams", "3"),
    ("vec1", [0.5]),
    ("emo_text", 3),
    ("emo_audio_prompt", 5),
    ("max_mel_tokens", None),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_wrong_types_are_400_not_coerced(
    api: httpx.Client, field: str, value: object, valid: dict[str, object]
) -> None:
    response = api.post("/generate", json={**valid, "params": {field: value}})
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"params.{field}:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text", 42),
        ("text", None),
        ("hook_url", ["http://x"]),
        ("spk_audio_prompt", {"url": "x"}),
        ("params", "temperature=1"),
        ("params", [1]),
    ],
)
def test_wrong_top_level_types_are_400(api: httpx.Client, field: str, value: object, valid: dict[str, object]) -> None:
    response = api.post("/generate", json={**valid, field: value})
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}:")


@pytest.mark.parametrize(
    "reference",
    [
        "/etc/passwd",
        "../outside-secret.wav",
        "voices/../../outside-secret.wav",
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "escape.wav",
        "./../outside-secret.wav",
        "..",
        "C:\\windows\\win.ini",
    ],
)
@pytest.mark.parametrize("field", ["spk_audio_prompt", "emo_audio_prompt"])
def test_path_attacks_are_400(api: httpx.Client, field: str, reference: str, valid: dict[str, object]) -> None:
    body = (
        {**valid, field: reference}
        if field == "spk_audio_prompt"
        else {**valid, "params": {"emo_control_method": 1, "emo_audio_prompt": reference}}
    )
    response = api.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert "prompt" in response.json()["error"]


def test_text_longer_than_the_limit_is_400(api: httpx.Client, valid: dict[str, object]) -> None:
    response = api.post("/generate", json={**valid, "text": "a" * 10_001})
    assert response.status_code == 400
    assert response.json()["error"] == "text: text is longer than 10000 characters"


def test_all_params_at_once_are_accepted(api: httpx.Client, valid: dict[str, object]) -> None:
    params = {
        "emo_control_method": 2,
        "emo_audio_prompt": "tone.wav",
        "emo_weight": 0.5,
        "emo_text": "happy",
        "emo_random": True,
        "temperature": 1.1,
        "top_p": 0.9,
        "top_k": 0,
        "max_text_tokens_per_segment": 80,
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.2,
        "length_penalty": 0.5,
        "max_mel_tokens": 1000,
        **{f"vec{i}": 0.1 * i for i in range(1, 9)},
    }
    response = api.post("/generate", json={**valid, "params": params})
    assert response.status_code == 200, response.text


def _with_reference(valid: dict[str, object], field: str, value: str) -> dict[str, object]:
    """``valid`` with ``value`` as ``field``: hook_url, spk_audio_prompt or params.emo_audio_prompt."""
    if field == "params.emo_audio_prompt":
        return {**valid, "params": {"emo_control_method": 1, "emo_audio_prompt": value}}
    return {**valid, field: value}


URL_FIELDS = ["hook_url", "spk_audio_prompt", "params.emo_audio_prompt"]

# URLs the HTTP client cannot build or whose host can never resolve: refused at submission.
UNUSABLE_URLS: dict[str, str] = {
    "cr-lf": "https://voices.example.com/a\r\nX-Injected: 1",
    "lf": "https://voices.example.com/a\n.wav",
    "tab": "https://voices.example.com/a\t.wav",
    "nul": "https://voices.example.com/a\x00.wav",
    "del": "https://voices.example.com/a\x7f.wav",
    "escape": "https://voices.example.com/a\x1b.wav",
    "c1-control": "https://voices.example.com/a\x85.wav",
    "space": "https://voices.example.com/a b.wav",
    "space-in-host": "https://voices example.com/a.wav",
    "ideographic-space": "https://voices.example.com/a\u3000.wav",
    "empty-label": "http://voices..example.com/voice.wav",
    "leading-dot": "http://.example.com/voice.wav",
    "label-over-63": f"https://{'a' * 64}.example.com/a.wav",
    "host-over-253": f"https://{'.'.join(['a' * 60] * 5)}.com/a.wav",
    "idna-invalid": "https://☃.example.com/a.wav",
    "idna-joiner": "https://x\u200d.example.com/a.wav",
    "bad-a-label": "https://xn--zz.example.com/a.wav",
    "percent-in-host": "https://voic%65s.example.com/a.wav",
    "port-0": "https://voices.example.com:0/a.wav",
    "port-65536": "https://voices.example.com:65536/a.wav",
    "port-99999": "https://voices.example.com:99999/a.wav",
    "port-name": "https://voices.example.com:http/a.wav",
    "port-signed": "https://voices.example.com:+443/a.wav",
    "port-fullwidth": "https://voices.example.com:４４３/a.wav",
    "bad-ipv4": "http://999.1.1.1/a.wav",
    "bad-ipv6": "http://[2606:zz::1]/a.wav",
    "open-bracket": "http://[2606:4700::1/a.wav",
    "ipvfuture": "http://[v1.x]/a.wav",
    "lone-surrogate": "https://voices.example.com/\ud800.wav",
    "credentials": "https://user:secret@voices.example.com/a.wav",
}


@pytest.mark.parametrize("url", UNUSABLE_URLS.values(), ids=UNUSABLE_URLS.keys())
@pytest.mark.parametrize("field", URL_FIELDS)
def test_unusable_urls_are_400_naming_the_field(
    api: httpx.Client, field: str, url: str, valid: dict[str, object]
) -> None:
    # json.dumps escapes what httpx's json= could not encode (a lone surrogate).
    body = json.dumps(_with_reference(valid, field, url))
    response = api.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


# Representative URLs that must stay accepted, on the API that allows public addresses only.
USABLE_URLS: dict[str, str] = {
    "idn": "http://bücher.example/a.wav",
    "idn-a-label": "http://xn--bcher-kva.example/a.wav",
    "idn-uppercase": "https://BÜCHER.example/a.wav",
    "port-8080": "https://voices.example.com:8080/a.wav",
    "absolute-name": "https://voices.example.com./a.wav",
    "underscore": "https://my_voices.example.com/a.wav",
    "query-fragment-escape": "https://voices.example.com/a%20b.wav?v=1&w=%C3%A4#x",
    "unicode-path": "https://voices.example.com/stimme-ä.wav",
    "ipv4": "http://93.184.215.14/a.wav",
    "ipv6": "http://[2606:4700:4700::1111]:8443/a.wav",
    "max-label": f"https://{'a' * 63}.example.com/a.wav",
}


@pytest.mark.parametrize("url", USABLE_URLS.values(), ids=USABLE_URLS.keys())
@pytest.mark.parametrize("field", URL_FIELDS)
def test_usable_urls_are_accepted(public_api: str, field: str, url: str) -> None:
    body = _with_reference(
        {
            "spk_audio_prompt": "https://voices.example.com/a.wav",
            "text": "hi",
            "hook_url": "https://hooks.example.com/h",
        },
        field,
        url,
    )
    response = httpx.post(f"{public_api}/generate", json=body, auth=(API_USER, API_PASSWORD), timeout=10)
    assert response.status_code == 200, response.text


# Lone surrogates (JSON "\ud800") anywhere: valid JSON, but not Unicode text.
SURROGATE_BODIES: dict[str, tuple[str, bytes]] = {
    "text": ("text:", rb'{"text": "hi \ud800", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h"}'),
    "low-surrogate": (
        "text:",
        rb'{"text": "\udfff", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h"}',
    ),
    "raw-utf8-bytes": (
        "text:",
        b'{"text": "hi \xed\xa0\x80", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h"}',
    ),
    "spk_audio_prompt": (
        "spk_audio_prompt:",
        rb'{"text": "hi", "spk_audio_prompt": "voice\udc80.wav", "hook_url": "https://h.example/h"}',
    ),
    "hook_url": (
        "hook_url:",
        rb'{"text": "hi", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/\ud83d"}',
    ),
    "emo_text": (
        "params.emo_text:",
        rb'{"text": "hi", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h",'
        rb' "params": {"emo_control_method": 3, "emo_text": "\ud800"}}',
    ),
    "emo_audio_prompt": (
        "params.emo_audio_prompt:",
        rb'{"text": "hi", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h",'
        rb' "params": {"emo_audio_prompt": "\ud800.wav"}}',
    ),
    "unknown-key": (
        "body:",
        rb'{"text": "hi", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h", "\ud800": 1}',
    ),
    "unknown-param-key": (
        "params:",
        rb'{"text": "hi", "spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h",'
        rb' "params": {"x\udc00": 1}}',
    ),
}


@pytest.mark.parametrize(("field", "content"), SURROGATE_BODIES.values(), ids=SURROGATE_BODIES.keys())
def test_lone_surrogates_are_400(api: httpx.Client, field: str, content: bytes) -> None:
    response = api.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith(field)
    assert "not valid Unicode" in error


def test_a_surrogate_pair_is_ordinary_text(public_api: str) -> None:
    content = rb'{"text": "smile \ud83d\ude00", "spk_audio_prompt": "tone.wav", "hook_url": "https://h.example/h"}'
    response = httpx.post(
        f"{public_api}/generate",
        content=content,
        headers={"Content-Type": "application/json"},
        auth=(API_USER, API_PASSWORD),
        timeout=10,
    )
    assert response.status_code == 200, response.text


# Prompt paths a file system cannot look up (or that lead through a file): 400, never a 500.
UNUSABLE_PATHS: dict[str, str] = {
    "component-over-255-bytes": "a" * 256 + ".wav",
    "component-over-255-utf8-bytes": "ä" * 128 + ".wav",  # 132 characters, 260 bytes
    "path-over-1024-bytes": "voices/" * 150 + "a.wav",
    "through-a-file": "example.wav/x.wav",
    "through-a-file-deeper": "tone.wav/a/b/c.wav",
    "not-encodable": "voice\udc80.wav",
}


@pytest.mark.parametrize("path", UNUSABLE_PATHS.values(), ids=UNUSABLE_PATHS.keys())
@pytest.mark.parametrize("field", ["spk_audio_prompt", "params.emo_audio_prompt"])
def test_prompt_paths_the_file_system_cannot_look_up_are_400(
    api: httpx.Client, field: str, path: str, valid: dict[str, object]
) -> None:
    body = json.dumps(_with_reference(valid, field, path))
    response = api.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_chunked_body_over_the_limit_is_413(api: httpx.Client, valid: dict[str, object]) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield b'{"spk_audio_prompt": "example.wav", "hook_url": "https://h.example/h", "text": "'
        for _ in range(5):
            yield b"a" * 64 * 1024
        yield b'"}'

    response = api.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json() == {"error": f"request body larger than {256 * 1024} bytes"}


def test_chunked_body_under_the_limit_is_read(api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"spk_audio_prompt": "missing.wav", '
        yield b'"hook_url": "https://h.example/h", "text": "hi"}'

    response = api.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400  # read and validated: the prompt file is not there
    assert response.json()["error"].startswith("spk_audio_prompt:")


UNICODE_PASSWORD = "pässwörd-ünïcode"


@pytest.fixture(scope="module")
def unicode_password_api(session_dir: Path, infra: EmbeddedInfra) -> Iterator[str]:
    with api_role(
        session_dir, infra, "unicode-password-api", API_PASSWORD=UNICODE_PASSWORD, **own_topics("unicode_password")
    ) as base_url:
        yield base_url


def _queue_one(
    base_url: str, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"spk_audio_prompt": "https://voices.example.com/a.wav", "text": "hi", "hook_url": "https://h.example/h"}
    return httpx.post(f"{base_url}/generate", json=body, auth=auth, headers=headers, timeout=10)


def test_a_non_ascii_password_logs_in(unicode_password_api: str) -> None:
    response = _queue_one(unicode_password_api, auth=(API_USER, UNICODE_PASSWORD))  # httpx sends UTF-8
    assert response.status_code == 200, response.text


def test_a_non_ascii_password_sent_as_latin_1_logs_in(unicode_password_api: str) -> None:
    # What requests and other older clients send.
    token = base64.b64encode(f"{API_USER}:{UNICODE_PASSWORD}".encode("latin-1")).decode()
    response = _queue_one(unicode_password_api, headers={"Authorization": f"Basic {token}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "password", ["passwort-unicode", "pässwörd-ünïcodE", "pässwörd-ünïcode\u0308"], ids=["ascii", "case", "combining"]
)
def test_a_non_ascii_password_is_still_checked(unicode_password_api: str, password: str) -> None:
    response = httpx.post(f"{unicode_password_api}/generate", json={}, auth=(API_USER, password), timeout=10)
    assert response.status_code == 401
    assert response.json() == {"error": "Authentication required"}


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
        "Basic wö",
    ],
    ids=["empty", "not-base64", "no-colon", "binary", "non-ascii-header"],
)
def test_malformed_basic_credentials_are_401(service: Service, authorization: str) -> None:
    response = httpx.post(
        f"{service.base_url}/generate",
        json={},
        headers={"Authorization": authorization.encode()},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json() == {"error": "Authentication required"}
