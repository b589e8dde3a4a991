"""Lifecycle errors → gRPC status codes, and the UNIMPLEMENTED answer for the rest."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from kiyot_py import errors

CODES: dict[type[errors.KiyotError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def _code(exc: errors.KiyotError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.UNKNOWN


def rpc(method):
    """Turn lifecycle errors raised by a servicer method into their status codes."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.KiyotError as exc:
                await context.abort(_code(exc), str(exc))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except errors.KiyotError as exc:
            await context.abort(_code(exc), str(exc))
    return unary


def answer_unimplemented(servicer_class: type, service: Any, why: dict[str, str] | None = None) -> type:
    """Every RPC of `service` the class does not define answers UNIMPLEMENTED by name, with
    the reason `why` gives for it, if any."""
    for method in service.methods:
        if method.name in servicer_class.__dict__:
            continue

        def make(name: str) -> Callable[..., Any]:
            reason = (why or {}).get(name, "yet")

            async def unimplemented(self: Any, request: Any, context: Any) -> None:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED, f"{service.name}.{name} is not implemented by kiyot-py {reason}"
                )
            unimplemented.__name__ = name
            return unimplemented

        setattr(servicer_class, method.name, make(method.name))
    return servicer_class
