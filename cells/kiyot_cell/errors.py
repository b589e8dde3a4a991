"""One exception type that maps to the JSON error bodies of API.md."""

from __future__ import annotations

from typing import ClassVar


class ApiError(Exception):
    """An error the HTTP layer turns into `{"error": code, "message": ...}`."""

    STATUS: ClassVar[dict[str, int]] = {
        "invalid": 400,
        "unauthorized": 401,
        "not_found": 404,
        "conflict": 409,
        "too_large": 413,
        "range": 416,
        "pull_failed": 422,
        "timeout": 504,
        "internal": 500,
    }

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else self.STATUS.get(code, 500)


def invalid(msg: str) -> ApiError:
    return ApiError("invalid", msg)


def not_found(msg: str) -> ApiError:
    return ApiError("not_found", msg)


def conflict(msg: str) -> ApiError:
    return ApiError("conflict", msg)
