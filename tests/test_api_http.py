"""The HTTP contract of the API: auth, validation errors, health, OpenAPI."""

from __future__ import annotations

import httpx
import pytest

from indextts_api.devtools import WebhookReceiver
from tests.conftest import Service


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
