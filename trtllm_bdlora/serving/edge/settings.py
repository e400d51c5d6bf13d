"""The edge's settings (`serve` flags) and the file-descriptor budget they need.

Defaults follow what the servers users compare against do: uvicorn's (so vLLM's) 5 s keep-alive, nginx's 1000
requests per connection, Triton's 64 MiB HTTP body limit; a request head must arrive within 10 s and its body within
60 s (uvicorn and Triton set neither: an idle or slow client holds its connection for ever)."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass

from trtllm_bdlora.errors import BdLoraError

DEFAULT_MAX_CONNECTIONS = 1000
HEALTH_RESERVE = 8  # connections an HTTP listener accepts beyond its cap, for health requests only
METRICS_MAX_CONNECTIONS = 64  # the metrics listener's own cap (a scraper needs one or two)
FD_HEADROOM = 512  # descriptors rank 0 needs besides its clients' connections (model files, ranks' sockets, pipes)
CAPPED_LISTENERS = 3  # KServe HTTP, OpenAI and KServe gRPC take --max-connections each
API_KEY_ENV = "API_KEY"


@dataclass(frozen=True)
class EdgeSettings:
    max_connections: int | None = None  # per listener; None: DEFAULT_MAX_CONNECTIONS, lowered to fit `ulimit -n`
    header_timeout: float = 10.0  # a request head (gRPC: the HTTP/2 handshake) must arrive within this
    body_timeout: float = 60.0  # a request body must arrive within this of its head
    keep_alive_timeout: float = 5.0  # an idle HTTP/1.1 connection between requests
    max_keep_alive_requests: int = 1000  # requests on one HTTP/1.1 connection, then it is closed
    grpc_max_connection_idle: float = 300.0  # a gRPC connection without calls for this long is closed (GOAWAY); 0: never
    grpc_max_connection_age: float = 0.0  # a gRPC connection is closed after this long (GOAWAY); 0: never
    max_body_bytes: int = 64 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for flag, value in (("--max-connections", self.max_connections), ("--max-keep-alive-requests",
                            self.max_keep_alive_requests), ("--max-body-bytes", self.max_body_bytes)):
            if value is not None and value < 1:
                raise BdLoraError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--request-header-timeout", self.header_timeout), ("--request-body-timeout",
                            self.body_timeout), ("--keep-alive-timeout", self.keep_alive_timeout)):
            if not value > 0:
                raise BdLoraError(f"{flag} must be > 0 seconds, got {value}")
        for flag, value in (("--grpc-max-connection-idle", self.grpc_max_connection_idle),
                            ("--grpc-max-connection-age", self.grpc_max_connection_age)):
            if not value >= 0:
                raise BdLoraError(f"{flag} must be >= 0 seconds (0: never), got {value}")
        for key in self.api_keys:
            if not key or any(c.isspace() for c in key) or not key.isprintable():
                raise BdLoraError("--api-key / API_KEY: a key must be printable, without spaces, and not empty")
        for origin in self.allowed_origins:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise BdLoraError(f"--allowed-origins: {origin!r} is not an origin (scheme://host[:port], or *)")


def split_keys(values: list[str] | None, environ: dict[str, str] | os._Environ = os.environ) -> tuple[str, ...]:
    """--api-key values, else the API_KEY variable; either may hold several keys separated by commas."""
    texts = list(values or []) or ([environ[API_KEY_ENV]] if environ.get(API_KEY_ENV) else [])
    return tuple(k.strip() for text in texts for k in text.split(",") if k.strip())


def split_origins(values: list[str] | None) -> tuple[str, ...]:
    """--allowed-origins values: each a JSON list (vLLM's form) or origins separated by commas."""
    out: list[str] = []
    for text in values or []:
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise BdLoraError(f"--allowed-origins {text!r}: not a JSON list") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise BdLoraError(f"--allowed-origins {text!r}: a JSON list must hold strings")
            out += items
        else:
            out += [o.strip() for o in text.split(",") if o.strip()]
    return tuple(out)


def edge_settings(args) -> EdgeSettings:
    """The settings from `serve`'s parsed flags (API_KEY from the environment when no --api-key is given)."""
    defaults = EdgeSettings()

    def get(name: str, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return EdgeSettings(
        max_connections=getattr(args, "max_connections", None),
        header_timeout=get("request_header_timeout", defaults.header_timeout),
        body_timeout=get("request_body_timeout", defaults.body_timeout),
        keep_alive_timeout=get("keep_alive_timeout", defaults.keep_alive_timeout),
        max_keep_alive_requests=get("max_keep_alive_requests", defaults.max_keep_alive_requests),
        grpc_max_connection_idle=get("grpc_max_connection_idle", defaults.grpc_max_connection_idle),
        grpc_max_connection_age=get("grpc_max_connection_age", defaults.grpc_max_connection_age),
        max_body_bytes=get("max_body_bytes", defaults.max_body_bytes),
        api_keys=split_keys(getattr(args, "api_key", None)),
        allowed_origins=split_origins(getattr(args, "allowed_origins", None)))


HTTP_LISTENERS = 3  # KServe HTTP, OpenAI, metrics


def accept_burst(max_connections: int) -> int:
    """The listen backlog of an HTTP listener, which is also how many connections asyncio accepts in one go before
    the guard sees any of them: it bounds how far a burst of connections overshoots the cap."""
    return max(16, min(256, max_connections // 4))


def descriptors_needed(max_connections: int) -> int:
    """Open files rank 0 may need with every listener full (and a burst of new connections being turned away on
    each HTTP listener: accepted, then closed by the guard)."""
    return (CAPPED_LISTENERS * max_connections + 2 * HEALTH_RESERVE + METRICS_MAX_CONNECTIONS + HEALTH_RESERVE
            + HTTP_LISTENERS * 3 * accept_burst(max_connections) + FD_HEADROOM)


def connection_cap(requested: int | None, raise_limit: bool = False) -> int:
    """The per-listener connection cap: `requested`, or the default lowered to what the hard `ulimit -n` allows.
    A requested cap the hard limit cannot hold is a one-line error naming the flag. With `raise_limit`, the soft
    limit of this process is raised to what the cap needs (as vLLM raises it at start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
    fitting = max((c for c in range(1, DEFAULT_MAX_CONNECTIONS * 64 + 1) if descriptors_needed(c) <= ceiling), default=0)
    if requested is None:
        cap = max(16, min(DEFAULT_MAX_CONNECTIONS, fitting))
    elif descriptors_needed(requested) > ceiling:
        raise BdLoraError(f"--max-connections {requested} needs up to {descriptors_needed(requested)} open files, but "
                          f"`ulimit -n` allows {ceiling}: lower --max-connections (at most {fitting}) or raise the limit")
    else:
        cap = requested
    needed = descriptors_needed(cap)
    if raise_limit and soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, ceiling), hard))
    return cap
