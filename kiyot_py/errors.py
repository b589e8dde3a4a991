"""The kinds of failure a CRI client can tell apart, shared by every room.

Each kind maps to one gRPC status code (`kiyot_py.cri.errors`, the one place that
maps them). Rooms below the CRI layer raise their own subclasses of these kinds (a
provider's capacity error is a ResourceExhausted, an agent's 404 a NotFound), so that
no room reads another's status codes and the message is always the source's own.
"""


class KiyotError(Exception):
    """Base class; the message is what the kubelet will see."""


class NotFound(KiyotError):
    pass


class InvalidArgument(KiyotError):
    pass


class AlreadyExists(KiyotError):
    pass


class FailedPrecondition(KiyotError):
    pass


class DeadlineExceeded(KiyotError):
    pass


class Unavailable(KiyotError):
    pass


class ResourceExhausted(KiyotError):
    pass


class PermissionDenied(KiyotError):
    pass
