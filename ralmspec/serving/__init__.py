"""OpenAI-compatible HTTP serving of ralmspec (aiohttp): see ralmspec.serving.app and docs/serving.md."""

from ralmspec.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
