"""Errors the service turns into JSON answers: `{"error": {"code": ..., "message": ...}}`.

`code` is short and stable (clients branch on it); `message` is for a person.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the service refuses, with the HTTP status and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str, **extra: object) -> dict:
    return {"error": {"code": code, "message": message, **extra}}
