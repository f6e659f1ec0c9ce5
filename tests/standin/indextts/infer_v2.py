"""A recording stand-in for ``indextts.infer_v2.IndexTTS2`` (upstream index-tts).

The signatures are those of ``indextts2-inference`` 2.1.1 (the version ``.[indextts]`` pins), so a
call that the real model would reject (a misspelt or missing keyword, a positional mix-up) fails
here too. Every call is appended as one JSON object (with a ``"call"`` key) to the file named by
``INDEXTTS_STANDIN_RECORD``, for the tests to read. The real class itself runs in
``tests/test_indextts2_real.py``; this one is for checking the exact arguments of each call.

``infer`` behaves like the real one where the adapter depends on it: it reads the prompt files
(so a path that is not readable audio fails); with ``output_path=None`` it returns
``(22050, int16 array of shape (samples, 1))``, with a path it writes a WAV there and returns the
path; ``stream_return=True`` returns a generator of ``[1, samples]`` float segments. If
``INDEXTTS_STANDIN_RAISE_MARKER`` is set and the text contains it, ``infer`` raises
``RuntimeError("CUDA out of memory")``, to test engine failures.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import soundfile

RECORD_ENV = "INDEXTTS_STANDIN_RECORD"
RAISE_MARKER_ENV = "INDEXTTS_STANDIN_RAISE_MARKER"
SAMPLE_RATE = 22050  # the real model's output rate
OUTPUT_SECONDS = 1.5
# Upstream's de-emphasis of emotions that give strange results:
# [happy, angry, sad, afraid, disgusted, melancholic, surprised, calm]
EMO_BIAS = (0.9375, 0.875, 1.0, 1.0, 0.9375, 0.9375, 0.6875, 0.5625)
EMO_SUM_MAX = 0.8

_record_lock = threading.Lock()


def _record(call: str, **fields: Any) -> None:
    """Append one call as a JSON line; no record file configured means nothing is recorded."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = json.dumps({"call": call, "pid": os.getpid(), **fields}, default=repr)
    with _record_lock, open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


def _check_audio(path: Any, what: str) -> None:
    """The real model loads prompts with librosa from a file path: it must be a readable audio file."""
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a path string, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} does not exist: {path}")
    info = soundfile.info(path)  # raises on anything that is not audio
    if info.frames <= 0:
        raise ValueError(f"{what} has no audio frames: {path}")


class IndexTTS2:
    def __init__(
        self,
        model_dir: str | None = None,
        cfg_path: str | None = None,
        use_fp16: bool = False,
        device: str | None = None,
        use_cuda_kernel: bool | None = None,
        use_deepspeed: bool = False,
        use_accel: bool = False,
        use_torch_compile: bool = False,
        language: str | None = None,
        attn_backend: str | None = None,
    ) -> None:
        self.cfg_path = cfg_path
        self.model_dir = model_dir
        self.use_fp16 = use_fp16
        self.device = device
        self.use_cuda_kernel = use_cuda_kernel
        self.use_deepspeed = use_deepspeed
        _record(
            "__init__",
            cfg_path=cfg_path,
            model_dir=model_dir,
            use_fp16=use_fp16,
            device=device,
            use_cuda_kernel=use_cuda_kernel,
            use_deepspeed=use_deepspeed,
            use_accel=use_accel,
            use_torch_compile=use_torch_compile,
            language=language,
            attn_backend=attn_backend,
        )

    def normalize_emo_vec(self, emo_vector: list[float], apply_bias: bool = True) -> list[float]:
        """As upstream: optional bias per emotion, then the sum capped at 0.8."""
        given = list(emo_vector)
        vector = list(given)
        if apply_bias:
            vector = [value * bias for value, bias in zip(vector, EMO_BIAS, strict=False)]
        total = sum(vector)
        if total > EMO_SUM_MAX:
            scale = EMO_SUM_MAX / total
            vector = [value * scale for value in vector]
        _record("normalize_emo_vec", emo_vector=given, apply_bias=apply_bias, result=vector)
        return vector

    def infer(
        self,
        spk_audio_prompt: str,
        text: str,
        output_path: str | None,
        emo_audio_prompt: str | None = None,
        emo_alpha: float = 1.0,
        emo_vector: list[float] | None = None,
        use_emo_text: bool = False,
        emo_text: str | None = None,
        use_random: bool = False,
        interval_silence: int = 200,
        verbose: bool = False,
        max_text_tokens_per_segment: int = 120,
        stream_return: bool = False,
        quick_streaming_tokens: int = 0,
        **generation_kwargs: Any,
    ) -> Any:
        # Recorded first, so a test can see the arguments of a call that then fails.
        _record(
            "infer",
            spk_audio_prompt=spk_audio_prompt,
            text=text,
            output_path=output_path,
            emo_audio_prompt=emo_audio_prompt,
            emo_alpha=emo_alpha,
            emo_vector=emo_vector,
            use_emo_text=use_emo_text,
            emo_text=emo_text,
            use_random=use_random,
            interval_silence=interval_silence,
            verbose=verbose,
            max_text_tokens_per_segment=max_text_tokens_per_segment,
            # Type names too: JSON cannot tell an int from a float that the adapter passed.
            max_text_tokens_per_segment_type=type(max_text_tokens_per_segment).__name__,
            stream_return=stream_return,
            quick_streaming_tokens=quick_streaming_tokens,
            generation_kwargs=generation_kwargs,
            generation_kwargs_types={key: type(value).__name__ for key, value in generation_kwargs.items()},
        )
        _check_audio(spk_audio_prompt, "spk_audio_prompt")
        if emo_audio_prompt is not None:
            _check_audio(emo_audio_prompt, "emo_audio_prompt")
        marker = os.environ.get(RAISE_MARKER_ENV)
        if marker and marker in text:
            raise RuntimeError("CUDA out of memory")
        t = np.arange(int(OUTPUT_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
        tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        if stream_return:
            return iter([tone[np.newaxis, :].astype(np.float32)])
        if output_path is None:
            return SAMPLE_RATE, (tone * 32767).astype(np.int16)[:, np.newaxis]
        directory = os.path.dirname(output_path)
        if directory:
            os.makedirs(directory, exist_ok=True)  # as the real one does
        soundfile.write(output_path, tone.astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        return output_path
