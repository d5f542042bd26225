"""The OpenAI-compatible gateway."""

from tts_server.api.app import create_app

__all__ = ["create_app"]
