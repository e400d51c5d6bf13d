"""The one error model: every failure a user can see is a `BdLoraError` with a `kind`, and one table (`STATUS`) maps
each kind to its gRPC code, HTTP status and OpenAI error type. Errors cross the runtime boundary as these values
(never as message strings), and every front end (serving/kserve/, serving/openai/, the production Python models)
answers from the same table. Every message is a single line naming the problem."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"  # the request (or a command's argument) is wrong: do not retry as is
    NOT_FOUND = "not_found"  # no such model or adapter (or an adapter no longer cached)
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    TOO_LARGE = "too_large"  # a request body over the limit, refused before it is read
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a queue, stream or adapter cache is full: retry later
    UNIMPLEMENTED = "unimplemented"
    UNAVAILABLE = "unavailable"  # shutting down, or a rank lost: retry elsewhere
    INTERNAL = "internal"


@dataclass(frozen=True)
class Status:
    grpc: str  # grpc.StatusCode member name
    http: int
    openai_type: str  # the OpenAI error type the openai client maps the HTTP status to


STATUS: dict[ErrorKind, Status] = {
    ErrorKind.INVALID_ARGUMENT: Status("INVALID_ARGUMENT", 400, "BadRequestError"),
    ErrorKind.NOT_FOUND: Status("NOT_FOUND", 404, "NotFoundError"),
    ErrorKind.UNAUTHENTICATED: Status("UNAUTHENTICATED", 401, "AuthenticationError"),
    ErrorKind.PERMISSION_DENIED: Status("PERMISSION_DENIED", 403, "PermissionDeniedError"),
    ErrorKind.TOO_LARGE: Status("RESOURCE_EXHAUSTED", 413, "BadRequestError"),
    ErrorKind.RESOURCE_EXHAUSTED: Status("RESOURCE_EXHAUSTED", 429, "RateLimitError"),
    ErrorKind.UNIMPLEMENTED: Status("UNIMPLEMENTED", 501, "InternalServerError"),
    ErrorKind.UNAVAILABLE: Status("UNAVAILABLE", 503, "ServiceUnavailableError"),
    ErrorKind.INTERNAL: Status("INTERNAL", 500, "InternalServerError"),
}


class BdLoraError(Exception):
    """Base class: the CLI prints `str(err)` on one line and exits 2; a front end answers `STATUS[err.kind]`.
    `param` names the request field the error is about, where there is one (OpenAI's `param`)."""

    kind = ErrorKind.INVALID_ARGUMENT

    def __init__(self, message: str, param: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.param = param

    @property
    def status(self) -> Status:
        return STATUS[self.kind]


class ModelError(BdLoraError):
    """A base model that cannot be loaded or sharded."""


class RequestError(BdLoraError):
    """A single request that cannot be served; other requests are unaffected."""


class AdapterError(RequestError):
    """An adapter (a PEFT directory, or weights sent with a request) that cannot be served."""


class InputError(RequestError):
    """A bad value of one named input; an ensemble reports it under the name its client used."""

    def __init__(self, name: str, reason: str):
        self.input, self.reason = name, reason
        super().__init__(f"{name} {reason}", param=name)


class NotFoundError(RequestError):
    """A model (Triton model name, OpenAI model) or an adapter this server does not serve."""

    kind = ErrorKind.NOT_FOUND


ModelNotFound = NotFoundError


class AdapterNotCachedError(NotFoundError):
    """A lora_task_id sent without weights that the host LoRA cache does not hold (never sent, or evicted).
    The message is TensorRT-LLM's (PeftCacheManager::addRequestPeft, PeftTaskNotCachedException), so clients
    that resend weights on it work against both servers."""

    def __init__(self, task_id: int):
        super().__init__(f"LoRA task {task_id} not found in cache. Please send LoRA weights with request")
        self.task_id = task_id


class PermissionDeniedError(RequestError):
    kind = ErrorKind.PERMISSION_DENIED


class UnauthenticatedError(RequestError):
    kind = ErrorKind.UNAUTHENTICATED


class BodyTooLargeError(RequestError):
    kind = ErrorKind.TOO_LARGE


class AdapterCacheFullError(RequestError):
    """No room in the host LoRA cache: everything it holds is pinned or in use by requests that have not finished.
    Starts with TensorRT-LLM's wording (PeftCacheManager: "PEFT Cache is full. Could not store taskId=...")."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class ServerBusyError(RequestError):
    """The request queue is full: retry later. The message starts with Triton core's queue-full wording ("Exceeds
    maximum queue size", scheduler_utils.cc `RequestQueue::Enqueue`)."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class UnimplementedError(RequestError):
    kind = ErrorKind.UNIMPLEMENTED


class ServerUnavailableError(RequestError):
    """The server is shutting down (or cannot serve now): go elsewhere."""

    kind = ErrorKind.UNAVAILABLE


class InternalError(BdLoraError):
    """Something failed that no request asked for: the request that met it fails alone, as INTERNAL."""

    kind = ErrorKind.INTERNAL


class ServerFailedError(InternalError):
    """The engine stopped (a rank died, a collective failed): every pending request fails with this."""


def as_error(err: BaseException, context: str = "internal error") -> BdLoraError:
    """`err` itself when it is one of ours, else an INTERNAL error with the exception's type and first line."""
    if isinstance(err, BdLoraError):
        return err
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return InternalError(f"{context}: {type(err).__name__}: {first}" if first else f"{context}: {type(err).__name__}")
