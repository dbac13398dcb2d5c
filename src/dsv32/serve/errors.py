"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Everything a request can get wrong is raised as an `APIError` and answered by one handler, so no
client ever sees a traceback or a framework's own error format.
"""
from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def validation_param(loc: tuple) -> str | None:
    """`("body", "messages", 0, "role")` -> `"messages[0].role"`; None for the body itself."""
    parts = [p for p in loc if p != "body"]
    # pydantic adds the union member it tried ("str", "list[int]", ...) to the location; drop those
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "dict")))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None
