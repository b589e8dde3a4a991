"""Lifecycle errors → gRPC status codes, and the UNIMPLEMENTED answer for the rest."""

from __future__ import annotations

import functools
import inspect

import grpc

from kiyot_py.pods import errors

CODES: dict[type[errors.PodError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _code(exc: errors.PodError) -> grpc.StatusCode:
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
            except errors.PodError as exc:
                await context.abort(_code(exc), str(exc))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except errors.PodError as exc:
            await context.abort(_code(exc), str(exc))
    return unary


def answer_unimplemented(servicer_class: type, service) -> type:
    """Every RPC of `service` the class does not define answers UNIMPLEMENTED by name."""
    for method in service.methods:
        if method.name in servicer_class.__dict__:
            continue

        def make(name: str):
            async def unimplemented(self, request, context):
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED, f"{service.name}.{name} is not implemented by kiyot-py yet"
                )
            unimplemented.__name__ = name
            return unimplemented

        setattr(servicer_class, method.name, make(method.name))
    return servicer_class
