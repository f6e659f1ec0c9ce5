"""One real IndexTTS2 synthesis that records, for every decoding step of the package's GPT, how many
input positions it was given. Run in a subprocess by ``test_indextts2_real.py`` (the real engine
never runs in pytest's process):

    python tests/kv_cache_probe.py MODEL_DIR CACHE_DIR PROMPT_WAV OUTPUT_WAV MAX_MEL_TOKENS

With the KV cache in use, the first step sees the whole conditioning prompt and every later step
exactly one new position; without it, every step recomputes the whole sequence (quadratic).
Prints the positions as a JSON list on its last line.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from indextts_api.engines import indextts2
from indextts_api.engines.base import SynthesisJob
from indextts_api.schemas import TaskParams


def main() -> None:
    model_dir, cache_dir, prompt, output = (Path(arg) for arg in sys.argv[1:5])
    max_mel_tokens = int(sys.argv[5])
    options = indextts2.EngineOptions(model_dir, cache_dir, device="cpu", language="en", warmup=False)
    engine = indextts2.IndexTTS2Engine(options)
    from indextts.gpt.model_v2 import GPT2InferenceModel

    positions: list[int] = []
    forward = GPT2InferenceModel.forward

    @functools.wraps(forward)  # generate() checks its keyword arguments against forward's signature
    def recording_forward(self: Any, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        positions.append(int(input_ids.shape[1]))
        return forward(self, input_ids, *args, **kwargs)

    GPT2InferenceModel.forward = recording_forward  # type: ignore[method-assign]
    params = TaskParams(emo_control_method=0, max_mel_tokens=max_mel_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reaching max_mel_tokens warns; it is what the probe asks for
        engine.synthesize(SynthesisJob("kv-cache-probe", "Hello world.", prompt, None, params), output)
    print(json.dumps(positions))


if __name__ == "__main__":
    main()
