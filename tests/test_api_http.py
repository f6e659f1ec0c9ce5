"""The HTTP contract of the API: auth, validation errors, health, OpenAPI."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Service

VALID = {
    "spk_audio_prompt": "example.wav",
    "text": "Hello there.",
    "hook_url": "http://127.0.0.1:9/hook",
}


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
def test_generate_requires_basic_auth(service: Service, auth: tuple[str, str] | None) -> None:
    response = httpx.post(f"{service.base_url}/generate", json=VALID, auth=auth, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert response.json() == {"error": "Authentication required"}


@pytest.mark.parametrize("missing", ["spk_audio_prompt", "text", "hook_url"])
def test_each_missing_required_field_is_400(api: httpx.Client, missing: str) -> None:
    body = {key: value for key, value in VALID.items() if key != missing}
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
def test_invalid_values_are_400_naming_the_field(api: httpx.Client, change: dict[str, object], field: str) -> None:
    response = api.post("/generate", json={**VALID, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_unknown_param_lists_accepted_keys(api: httpx.Client) -> None:
    response = api.post("/generate", json={**VALID, "params": {"temprature": 0.5}})
    assert "accepted keys in params:" in response.json()["error"]
    assert "temperature" in response.json()["error"]


def test_oversized_body_is_413(api: httpx.Client) -> None:
    response = api.post("/generate", json={**VALID, "text": "a" * 300_000})
    assert response.status_code == 413
    assert "error" in response.json()


def test_openapi_and_docs_are_served(service: Service) -> None:
    spec = httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()
    assert {"/health", "/generate"} <= set(spec["paths"])
    assert httpx.get(f"{service.base_url}/docs", timeout=10).status_code == 200
