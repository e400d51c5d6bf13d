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
    ALREADY_EXISTS = "already_exists"  # a name taken (a shared-memory region registered twice)
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
    ErrorKind.ALREADY_EXISTS: Status("ALREADY_EXISTS", 400, "BadRequestError"),  # HTTP 400 as Triton answers it
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


class AlreadyExistsError(RequestError):
    kind = ErrorKind.ALREADY_EXISTS


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


class LostRankError(ServerUnavailableError):
    """A rank of the TP group died or stopped responding (no heartbeat for --rank-timeout): this server can serve
    nothing more and is going away. Pending and new requests get this, retryable elsewhere (UNAVAILABLE / 503).
    `detail` (the lost rank's PID and host, the collective's error) is for the server's log only."""

    def __init__(self, message: str, param: str | None = None, detail: str | None = None):
        super().__init__(message, param)
        self.detail = detail


class InternalError(BdLoraError):
    """Something failed that no request asked for: the request that met it fails alone, as INTERNAL. `detail` (the
    exception's type and first line) is for the server's log only: clients never see exception names or paths."""

    kind = ErrorKind.INTERNAL

    def __init__(self, message: str, param: str | None = None, detail: str | None = None):
        super().__init__(message, param)
        self.detail = detail


class ServerFailedError(InternalError):
    """The engine stopped (a rank died, a collective failed): every pending request fails with this."""


def as_error(err: BaseException, context: str = "internal error") -> BdLoraError:
    """`err` itself when it is one of ours, else an INTERNAL error saying only `context` to the client; the
    exception's type and first line go to the server's log (`log_text`)."""
    if isinstance(err, BdLoraError):
        return err
    text = str(err).strip()
    first = " ".join(text.splitlines()[0].split()) if text else ""
    return InternalError(context, detail=f"{type(err).__name__}: {first}" if first else type(err).__name__)


def log_text(err: BdLoraError) -> str:
    """An error as the server's log records it: the client's message, plus what only the log may show."""
    detail = getattr(err, "detail", None)
    return f"{err}: {detail}" if detail else str(err)


# Host paths a client must not see (the adapter root, the model directory, --adapter directories), each with the
# name it is shown by instead: set once by `serve` (hide_path) before it answers anyone.
_HIDDEN_PATHS: dict[str, str] = {}


def hide_path(path: str, shown_as: str) -> None:
    """From now on, `public_text` shows the absolute `path` (and everything under it) as `shown_as`."""
    path = str(path).rstrip("/")
    if path.startswith("/") and len(path) > 1:
        _HIDDEN_PATHS[path] = shown_as


def public_text(text: str) -> str:
    """`text` as a client may see it: every hidden path replaced by its public name (longest first)."""
    for path in sorted(_HIDDEN_PATHS, key=len, reverse=True):
        if path in text:
            text = text.replace(path, _HIDDEN_PATHS[path])
    return text
