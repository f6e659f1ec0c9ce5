"""The one small interface every engine implements; the TTS worker knows nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from indextts_api.schemas import TaskParams


class EngineUnavailable(RuntimeError):
    """The engine cannot be loaded here (missing package, checkpoints or auxiliary models)."""


class SynthesisError(RuntimeError):
    """Synthesis of one task failed; the task fails, the worker goes on."""


@dataclass(frozen=True)
class SynthesisJob:
    task_uuid: str
    text: str
    speaker_prompt: Path
    emotion_prompt: Path | None
    params: TaskParams


@dataclass(frozen=True)
class SynthesisOutcome:
    audio_seconds: float
    sample_rate: int
    ignored: list[str] = field(default_factory=list)  # request features this engine could not honour


class Engine(Protocol):
    name: str
    model_version: str

    def synthesize(self, job: SynthesisJob, output_path: Path) -> SynthesisOutcome:
        """Write a WAV file of ``job.text`` to ``output_path``. One call at a time per instance."""
        ...

    def close(self) -> None: ...
