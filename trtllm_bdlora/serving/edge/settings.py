"""The edge's settings (`serve` flags: config.EdgeSettings, set in cli/serve.py) and the file-descriptor budget they
need.

Defaults follow what the servers users compare against do: uvicorn's (so vLLM's) 5 s keep-alive, nginx's 1000
requests per connection, Triton's 64 MiB HTTP body limit; a request head must arrive within 10 s and its body within
60 s (uvicorn and Triton set neither: an idle or slow client holds its connection for ever)."""

from __future__ import annotations

import resource

from trtllm_bdlora.config import API_KEY_ENV, EdgeSettings, split_keys, split_origins  # noqa: F401 (the edge's names)
from trtllm_bdlora.errors import BdLoraError

DEFAULT_MAX_CONNECTIONS = 1000
HEALTH_RESERVE = 8  # connections an HTTP listener accepts beyond its cap, for health requests only
METRICS_MAX_CONNECTIONS = 64  # the metrics listener's own cap (a scraper needs one or two)
FD_HEADROOM = 512  # descriptors rank 0 needs besides its clients' connections (model files, ranks' sockets, pipes)
CAPPED_LISTENERS = 3  # KServe HTTP, OpenAI and KServe gRPC take --max-connections each


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
