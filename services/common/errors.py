"""Domain errors that every service maps to the same gRPC status codes.

Domain code raises these (it never imports grpc); `services.common.server.handle_errors`
turns them into a status with the message, so a bad request never takes a service down.
"""


class StemlabError(Exception):
    """Base of the errors a person can act on."""


class NotFoundError(StemlabError, LookupError):
    """What the request names does not exist (gRPC NOT_FOUND)."""


class InvalidArgumentError(StemlabError, ValueError):
    """The request itself is wrong (gRPC INVALID_ARGUMENT)."""


class FailedPreconditionError(StemlabError):
    """The request is fine but the system is not in a state to do it (gRPC FAILED_PRECONDITION)."""


class PermissionDeniedError(StemlabError):
    """The request names something this service may not touch, e.g. a path outside the data root
    and the configured import roots (gRPC PERMISSION_DENIED)."""
