"""OpenAI-compatible serving: the HTTP app, the engine loop, constrained generation, metrics."""
from dsv32.serve.app import create_app

__all__ = ["create_app"]
