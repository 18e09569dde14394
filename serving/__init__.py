"""OpenAI-compatible HTTP serving of ralmspec (aiohttp): see serving.app and docs/serving.md."""

from serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
