"""Lifecycle errors; the CRI layer maps each to its gRPC status code."""


class PodError(Exception):
    """Base class; the message is what the kubelet will see."""


class NotFound(PodError):
    pass


class InvalidArgument(PodError):
    pass


class AlreadyExists(PodError):
    pass


class FailedPrecondition(PodError):
    pass


class DeadlineExceeded(PodError):
    pass


class Unavailable(PodError):
    pass
