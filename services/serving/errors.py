"""Errors of the model server's domain code, each carrying the canonical status code name.

The gRPC and REST layers map ``code`` to a gRPC status or an HTTP status; the domain code itself
never imports grpc.
"""


class ServableError(Exception):
    """A request the model server cannot answer; ``code`` is a canonical status name."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServableError):
    code = "NOT_FOUND"


class InvalidArgument(ServableError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServableError):
    code = "FAILED_PRECONDITION"


class Unimplemented(ServableError):
    code = "UNIMPLEMENTED"


class Internal(ServableError):
    code = "INTERNAL"


# Same table as TF Serving's ToHTTPStatusCode, so REST callers see the same numbers.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
