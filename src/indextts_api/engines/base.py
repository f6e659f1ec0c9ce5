"""The one small interface every engine implements; the TTS worker knows nothing else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

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


# Called with each piece of audio as soon as it is synthesized (16-bit mono samples, sample rate),
# for interactive requests; it may raise (a canceled task) to stop the synthesis there.
OnSegment = Callable[[npt.NDArray[np.int16], int], None]


class Engine(Protocol):
    name: str
    model_version: str

    def synthesize(self, job: SynthesisJob, output_path: Path, on_segment: OnSegment | None = None) -> SynthesisOutcome:
        """Write a WAV file of ``job.text`` to ``output_path``, handing each segment to ``on_segment``
        as it is ready. One call at a time per instance."""
        ...

    def close(self) -> None: ...
