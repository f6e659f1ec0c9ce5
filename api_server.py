#!/usr/bin/env python3
"""The specification's entry point: API + workers in one process tree (same as `indextts-api all`).

python api_server.py [--host 127.0.0.1] [--port 7861] [--model_dir ./checkpoints] [--fp16]
                     [--deepspeed] [--cuda_kernel] [--tts-workers 1] [--upload-workers 1] [--engine auto]
"""

import sys
from pathlib import Path

try:
    from indextts_api.cli import main
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from indextts_api.cli import main

if __name__ == "__main__":
    sys.exit(main(["all", *sys.argv[1:]], prog="api_server.py"))
