"""The HTTP API role (FastAPI): accepts tasks and queues them; never synthesizes."""

from indextts_api.api.app import create_app

__all__ = ["create_app"]
