"""Schemathesis against /openapi.json: generated requests never get a 5xx or an undocumented answer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from indextts_api.infra.embedded import EmbeddedInfra
from tests.conftest import API_PASSWORD, API_USER, api_role


@pytest.fixture(scope="module")
def fuzzed_api(session_dir: Path, infra: EmbeddedInfra) -> Iterator[str]:
    """The API role on topics of its own (no worker reads them), public URLs only, as in production."""
    with api_role(
        session_dir,
        infra,
        "fuzz-api",
        ALLOW_PRIVATE_URLS="false",
        KAFKA_TASK_TOPIC="fuzz_tasks",
        KAFKA_INTERACTIVE_TOPIC="fuzz_interactive",
        KAFKA_REPLY_TOPIC="fuzz_replies",
        # No worker reads the topics: an interactive request answers 504 (documented) after this.
        INTERACTIVE_TIMEOUT_S="0.5",
        KAFKA_RESULT_TOPIC="fuzz_results",
        KAFKA_DEAD_LETTER_TOPIC="fuzz_dead_letters",
        KAFKA_WEBHOOK_RETRY_TOPIC="fuzz_webhook_retries",
        KAFKA_TOPIC_PARTITIONS="1",
        PROMPT_DIR=str(session_dir / "fuzz-prompts"),
    ) as base_url:
        yield base_url


# Semantic rules beyond the schema (a blank text, a prompt path outside the prompt directory, a
# private hook URL) are refused with a documented 400, so "every schema-valid request is accepted"
# is not a property of this API; these are the checks that must always hold.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


SPEECH = "/v1/audio/speech"


def run_schemathesis(api: str, tmp_path: Path, checks: str, max_examples: int, *selection: str) -> None:
    # The schemathesis CLI (its pytest plugin does not support this pytest's node ids).
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{api}/openapi.json",
            "--auth",
            f"{API_USER}:{API_PASSWORD}",
            "--checks",
            checks,
            "--max-examples",
            str(max_examples),
            "--request-timeout",
            "30",
            "--seed",
            "20261125",
            "--no-color",
            *selection,
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
        check=False,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.timeout(600)
def test_generated_requests_get_documented_answers(fuzzed_api: str, tmp_path: Path) -> None:
    run_schemathesis(fuzzed_api, tmp_path, CHECKS, 150, "--exclude-path", SPEECH)


@pytest.mark.timeout(300)
def test_generated_speech_requests_get_documented_answers(fuzzed_api: str, tmp_path: Path) -> None:
    """No worker reads this API's topics, so a valid interactive request ends in its documented 504
    (no audio in time): every check but "no 5xx" holds there."""
    checks = CHECKS.replace("not_a_server_error,", "")
    run_schemathesis(fuzzed_api, tmp_path, checks, 25, "--include-path", SPEECH)
