"""Serving: an OpenAI-compatible API over the engine (`leanseek serve`)."""

from .app import create_app

__all__ = ["create_app"]
