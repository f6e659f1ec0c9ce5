"""Import torchaudio on a host whose torch has no CUDA, beside a torchaudio wheel linked against CUDA.

PyPI's torchaudio (2.11, the only release that accepts torch 2.13) ships compiled extensions built
against CUDA torch; beside the CPU build of torch, loading them fails (``libc10_cuda.so: cannot open
shared object file``) and with it ``import torchaudio``. IndexTTS2 uses only torchaudio's pure-Python
parts (resampling, Kaldi fbank), which need no extension. torchaudio itself treats a missing
extension as "not available" and goes on: here an extension that cannot be loaded is treated the
same way. Where the extension loads (a CUDA host), nothing is changed.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)


def import_torchaudio() -> ModuleType:
    """``torchaudio``, with its compiled extension if it loads, else without it."""
    try:
        return importlib.import_module("torchaudio")
    except OSError as exc:
        reason = exc
    # Forget the half-imported package, then load its extension loader with a tolerant _load_lib.
    for name in [name for name in sys.modules if name == "torchaudio" or name.startswith("torchaudio.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        raise ImportError("torchaudio is not installed") from reason
    loader_path = Path(spec.origin).parent / "_extension" / "utils.py"
    loader_spec = importlib.util.spec_from_file_location("torchaudio._extension.utils", loader_path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"torchaudio's extension loader is not at {loader_path}") from reason
    loader = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(loader)
    load_library = loader._load_lib

    def load_if_loadable(name: str) -> bool:
        try:
            return bool(load_library(name))
        except OSError:
            return False

    loader._load_lib = load_if_loadable  # type: ignore[attr-defined]
    sys.modules["torchaudio._extension.utils"] = loader
    torchaudio = importlib.import_module("torchaudio")
    logger.warning(
        "torchaudio %s: its compiled extension does not load beside this torch (%s); "
        "using its pure-Python parts only, which is all IndexTTS2 needs",
        getattr(torchaudio, "__version__", "?"),
        reason,
    )
    return torchaudio
