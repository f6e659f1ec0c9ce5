"""Pure logic: URL rules, text segmentation, prompt path confinement, settings, signatures, validation."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from dotenv import dotenv_values
from pydantic import ValidationError
from standardwebhooks import Webhook

from indextts_api.config import Settings
from indextts_api.engines.piper import ignored_features
from indextts_api.engines.segments import approx_tokens, split_text
from indextts_api.prompts import PromptError, resolve_local_prompt
from indextts_api.schemas import TaskCreate, TaskParams, check_http_url, describe_validation_error
from indextts_api.storage import audio_key, public_url
from indextts_api.webhooks import secret_bytes, signature_headers
from tests.conftest import ROOT


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


# --- storage URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"s3_bucket_name": "b", "s3_region": "eu-west-1"}, "https://b.s3.eu-west-1.amazonaws.com/k.wav"),
        (
            {"s3_bucket_name": "b", "s3_endpoint_url": "https://acc.r2.cloudflarestorage.com/"},
            "https://acc.r2.cloudflarestorage.com/k.wav",
        ),
        ({"s3_bucket_name": "b", "s3_endpoint_url": "http://localhost:9000"}, "http://localhost:9000/b/k.wav"),
        (
            {"s3_bucket_name": "b", "s3_endpoint_url": "http://localhost:9000", "s3_public_url": "https://cdn.x/a/"},
            "https://cdn.x/a/k.wav",
        ),
    ],
    ids=["aws", "r2", "minio", "public-url"],
)
def test_public_url_follows_the_spec_rules(values: dict[str, object], expected: str) -> None:
    assert public_url(settings(**values), "k.wav") == expected


def test_audio_key_uses_prefix() -> None:
    assert audio_key(settings(), "u") == "u.wav"
    assert audio_key(settings(s3_key_prefix="/tts/out/"), "u") == "tts/out/u.wav"


# --- text segmentation -------------------------------------------------------------------------------


def test_split_text_keeps_every_word_and_respects_the_limit() -> None:
    sentence = "The quick brown fox jumps over the lazy dog, again and again, without any rest at all."
    text = " ".join([sentence] * 40) + " " + " ".join(["word"] * 300)
    segments = split_text(text, 30)
    assert " ".join(segments).split() == text.split()
    assert all(approx_tokens(segment) <= 30 for segment in segments)
    assert len(segments) > 40


def test_split_text_counts_cjk_characters() -> None:
    text = "你好世界。" * 50
    segments = split_text(text, 20)
    assert "".join(segments) == text
    assert all(approx_tokens(segment) <= 20 for segment in segments)


# --- prompt confinement --------------------------------------------------------------------------------


@pytest.fixture
def prompt_root(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    (root / "voices").mkdir(parents=True)
    (root / "voices" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "secret.wav").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.wav", root / "escape.wav")
    os.symlink(root / "voices" / "a.wav", root / "alias.wav")
    return root


def test_prompt_inside_the_directory_resolves(prompt_root: Path) -> None:
    assert resolve_local_prompt(prompt_root, "voices/a.wav") == (prompt_root / "voices" / "a.wav").resolve()
    assert resolve_local_prompt(prompt_root, "alias.wav") == (prompt_root / "voices" / "a.wav").resolve()


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("../secret.wav", "must be relative"),
        ("voices/../../secret.wav", "must be relative"),
        ("escape.wav", "outside the prompt directory"),
        ("voices", "not a file"),
        ("nope.wav", "does not exist"),
    ],
)
def test_prompt_outside_the_directory_is_refused(prompt_root: Path, reference: str, reason: str) -> None:
    with pytest.raises(PromptError, match=reason):
        resolve_local_prompt(prompt_root, reference)
    with pytest.raises(PromptError):
        resolve_local_prompt(prompt_root, str(prompt_root.parent / "secret.wav"))


# --- request validation ----------------------------------------------------------------------------------

VALID = {"spk_audio_prompt": "a.wav", "text": "hi", "hook_url": "https://example.com/h"}


@pytest.mark.parametrize(
    "change",
    [
        {"spk_audio_prompt": "file:///etc/passwd"},
        {"spk_audio_prompt": "/etc/passwd"},
        {"spk_audio_prompt": "a/../../b.wav"},
        {"spk_audio_prompt": "gopher://x/y"},
        {"hook_url": "https://user:pw@example.com/h"},
        {"hook_url": "/relative"},
        {"text": ""},
        {"params": {"top_k": 101}},
        {"params": {"emo_weight": -0.1}},
        {"params": {"vec3": 1.5}},
        {"params": {"do_sample": "yes"}},
        {"params": {"num_beams": 2.5}},
        {"extra": 1},
    ],
)
def test_task_create_rejects(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TaskCreate.model_validate({**VALID, **change})


def test_url_check_names_each_caller_field_and_returns_the_url_unchanged() -> None:
    # The verdict is remembered per URL; the field name in the message is each caller's own.
    url = "http://voices..example.com/voice.wav"
    for what in ("hook_url", "spk_audio_prompt", "hook_url"):
        with pytest.raises(ValueError, match=rf"^{what} host 'voices\.\.example\.com' has an empty label$"):
            check_http_url(url, what)
    for usable in ("https://BÜCHER.example:8443/a%20b.wav", "http://[2606:4700:4700::1111]/a.wav"):
        assert check_http_url(usable, "hook_url") == usable


def test_task_params_defaults_match_the_spec() -> None:
    params = TaskParams()
    assert (params.emo_weight, params.temperature, params.top_p, params.top_k) == (0.65, 0.8, 0.8, 30)
    assert (params.max_text_tokens_per_segment, params.do_sample, params.num_beams) == (120, True, 3)
    assert (params.repetition_penalty, params.max_mel_tokens) == (10.0, 1500)
    assert params.emotion_vector == [0.0] * 8


def test_validation_messages_name_field_and_rule() -> None:
    assert describe_validation_error({"loc": ("body", "text"), "type": "missing"}) == "text: required field is missing"
    assert (
        describe_validation_error({"loc": ("body", "params", "x"), "type": "extra_forbidden"})
        == "params.x: unknown field"
    )


def test_piper_reports_only_what_it_ignored() -> None:
    assert ignored_features(TaskParams()) == ["voice cloning"]
    ignored = ignored_features(TaskParams(emo_control_method=2, temperature=1.2))
    assert ignored == ["voice cloning", "emotion control (method 2)", "sampling parameters: temperature"]


# --- settings ----------------------------------------------------------------------------------------------


def test_embedded_mode_is_derived_from_what_is_unset() -> None:
    embedded = settings()
    assert embedded.fully_embedded and embedded.private_urls_allowed and embedded.presign_urls
    external = settings(kafka_bootstrap_servers="k:9092", s3_bucket_name="b", s3_endpoint_url="")
    assert not external.kafka_embedded and not external.s3_embedded
    assert not external.private_urls_allowed and not external.presign_urls
    assert external.s3_endpoint_url is None  # the spec's `S3_ENDPOINT_URL=` means AWS


def test_placeholder_password_is_rejected() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        settings(api_password="your_password")


def test_config_example_documents_every_setting_and_only_settings() -> None:
    example = dotenv_values(ROOT / "config.env.example")
    assert set(example) == {name.upper() for name in Settings.model_fields}
    # Its values parse (the credential placeholders aside: the service refuses those on purpose).
    values = {name.lower(): value for name, value in example.items() if value}
    parsed = settings(**{**values, "api_password": "a-real-password"})
    assert parsed.kafka_topic_partitions == 12 and parsed.webhook_retry_delays_s[0] == 10.0


def test_to_env_round_trips() -> None:
    original = settings(api_password="s3cret-value", tts_workers=3, fp16=True, kafka_bootstrap_servers="k:1")
    copy = Settings(_env_file=None, **{k.lower(): v for k, v in original.to_env().items()})  # type: ignore[call-arg]
    assert copy == original


# --- webhook signatures --------------------------------------------------------------------------------------


def test_signature_verifies_with_the_standard_webhooks_library() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    body = json.dumps({"task_uuid": "u", "status": "success"}).encode()
    import time

    headers = signature_headers(secret_bytes(secret), "msg_u_success", int(time.time()), body)
    assert Webhook(secret).verify(body, headers) == {"task_uuid": "u", "status": "success"}


# --- task partitions, prompt path checks, engine threads --------------------------------------------


def test_partition_spreader_fills_one_partition_per_batch_then_goes_round_robin() -> None:
    from indextts_api.kafka import PartitionSpreader

    spreader = PartitionSpreader(batch_messages=3, batch_s=60.0)
    assert spreader.next("tasks") == -1  # partition count unknown: librdkafka hashes the key
    spreader.partition_counts = {"tasks": 4}
    chosen = [spreader.next("tasks") for _ in range(12)]
    batches = [chosen[i : i + 3] for i in range(0, 12, 3)]
    assert all(len(set(batch)) == 1 for batch in batches), chosen
    assert sorted(batch[0] for batch in batches) == [0, 1, 2, 3], chosen  # every partition its turn


def test_partition_spreader_moves_on_after_its_time_window() -> None:
    from indextts_api.kafka import PartitionSpreader

    spreader = PartitionSpreader(batch_messages=1000, batch_s=0.0)
    spreader.partition_counts = {"tasks": 3}
    first, second = spreader.next("tasks"), spreader.next("tasks")
    assert second == (first + 1) % 3


def test_local_prompt_check_refuses_escapes_and_remembers_briefly(tmp_path: Path) -> None:
    from indextts_api.prompts import LocalPromptCheck

    (tmp_path / "voice.wav").write_bytes(b"RIFF")
    check = LocalPromptCheck(tmp_path, ttl_s=60.0)
    assert check.error_for("voice.wav") is None
    assert check.error_for("../etc/passwd") is not None
    assert check.error_for("missing.wav") is not None
    (tmp_path / "voice.wav").unlink()
    assert check.error_for("voice.wav") is None  # remembered for ttl_s; the worker checks again
    assert LocalPromptCheck(tmp_path, ttl_s=0.0).error_for("voice.wav") is not None


def test_piper_threads_share_the_cores_among_the_workers() -> None:
    cores = os.cpu_count() or 1
    assert settings(piper_threads=3).piper_threads_per_engine == 3
    assert settings(tts_workers=1).piper_threads_per_engine == cores
    assert settings(tts_workers=cores * 2).piper_threads_per_engine == 1


# --- Kafka replication warnings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "min_insync", "brokers", "warned"),
    [
        (1, 1, 1, None),  # one broker (the embedded one): nothing to fail over to
        (1, 1, 3, "1 replica"),
        (3, 3, 3, "writes stop"),
        (2, 2, 3, "writes stop"),
        (3, 1, 3, "min.insync.replicas=1"),
        (3, 2, 3, None),  # the usual production setting survives one broker
    ],
)
def test_replication_that_cannot_survive_a_broker_is_named(
    replicas: int, min_insync: int, brokers: int, warned: str | None
) -> None:
    from indextts_api.kafka import replication_problem

    problem = replication_problem("tts_tasks", replicas, min_insync, brokers)
    if warned is None:
        assert problem is None
    else:
        assert problem is not None and warned in problem and "tts_tasks" in problem
