"""HTTP listeners (uvicorn + h11) that hold under hostile clients.

uvicorn bounds neither the connections it accepts nor the time a client may take to send a request: a connection
that never sends a byte stays open for ever (its keep-alive timer only starts after a response), and so does a body
declared longer than it is. `GuardedH11Protocol` adds, per listener (`ConnectionGuard`):

- a cap on open connections: at the cap, a new connection replaces the connection idle the longest (no request
  in progress: a client that connected and sent nothing, or a keep-alive connection); when every connection is busy
  it is accepted into a small reserve that answers health requests only (503 to anything else), and beyond that
  closed at once. So the file descriptors a listener holds are bounded, and health answers while idle
  connections are more than the cap;
- a request-head timeout (from the connection, or from the first byte after a response: sending a byte now and
  then does not extend it), a whole-body timeout, uvicorn's keep-alive timeout, and a limit of requests per
  connection; a timed-out client gets 408 and the connection is closed;
- a body the application answered without reading (413) is dropped unread for a short linger, then the
  connection is closed (closing at once would reset it before the client reads the answer).

Refusals and timeouts are counted and logged once per interval (events.py), never one line per connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.edge.events import EventLog, throttle_library_logs
from trtllm_bdlora.serving.edge.settings import HEALTH_RESERVE, EdgeSettings, accept_burst

STOP_GRACE_S = 1  # at shutdown: how long open HTTP connections may take to finish
KERNEL_BACKLOG = 2048  # uvicorn's default listen backlog
LINGER_S = 2.0  # how long the rest of a refused body is read and dropped before the connection is closed
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 16\r\n" \
                   b"connection: close\r\n\r\nrequest too slow"
BUSY_BODY = b"server at its connection limit (--max-connections): only health requests are answered, retry later"


@dataclass(frozen=True)
class Limits:
    max_connections: int
    reserve: int
    header_timeout: float
    body_timeout: float
    max_requests: int


class ConnectionGuard:
    """The open connections of one listener (event-loop thread only): admitted up to the cap, oldest idle replaced
    beyond it, a reserve for health requests when all are busy, refused beyond that."""

    def __init__(self, name: str, limits: Limits, is_health: Callable[[str], bool], events: EventLog | None = None):
        self.name, self.limits, self.is_health = name, limits, is_health
        self.events = events or EventLog()
        self.normal: dict[GuardedH11Protocol, None] = {}  # insertion-ordered sets
        self.reserved: dict[GuardedH11Protocol, None] = {}
        self.idle: dict[GuardedH11Protocol, None] = {}  # admitted, no request in progress: oldest idle first

    @property
    def open(self) -> int:
        return len(self.normal) + len(self.reserved)

    def admit(self, conn: GuardedH11Protocol) -> str | None:
        """"normal", "reserve" (health only), or None (refused: close it)."""
        for place, members, limit in (("normal", self.normal, self.limits.max_connections),
                                      ("reserve", self.reserved, self.limits.reserve)):
            if len(members) >= limit:
                victim = next((c for c in self.idle if c in members), None)
                if victim is None:
                    continue
                self.release(victim)
                victim.evict()
                self.events.note(f"{self.name}:evict", f"{self.name}: at --max-connections "
                                 f"{self.limits.max_connections}: closed the connection idle the longest for a new one")
            members[conn] = None
            self.idle[conn] = None
            return place
        self.events.note(f"{self.name}:refuse", f"{self.name}: {self.open} connections open, all busy "
                         f"(--max-connections {self.limits.max_connections} + {self.limits.reserve} for health): "
                         "refused a new connection")
        return None

    def busy(self, conn: GuardedH11Protocol) -> None:
        self.idle.pop(conn, None)

    def rest(self, conn: GuardedH11Protocol) -> None:
        if conn in self.normal or conn in self.reserved:
            self.idle.pop(conn, None)
            self.idle[conn] = None  # now the most recently idle

    def release(self, conn: GuardedH11Protocol) -> None:
        for members in (self.normal, self.reserved, self.idle):
            members.pop(conn, None)


class HealthOnly:
    """The application for a connection in the reserve: health requests pass, anything else gets 503."""

    def __init__(self, app, is_health: Callable[[str], bool]):
        self.app, self.is_health = app, is_health

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] in ("GET", "HEAD") and self.is_health(scope["path"])):
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1"),
                                (b"content-length", str(len(BUSY_BODY)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": BUSY_BODY})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard, with request-head and body timeouts (module docstring)."""

    def __init__(self, guard: ConnectionGuard, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.admitted = self.draining = False
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.requests = 0
        self.seen_cycle = None

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport) -> None:
        place = self.guard.admit(self)
        if place is None:
            self.transport = transport
            transport.abort()
            return
        self.admitted = True
        super().connection_made(transport)
        if place == "reserve":
            self.app = HealthOnly(self.app, self.guard.is_health)
        self._arm("header", self.guard.limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if not self.admitted:
            return
        self.guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return  # the rest of a body that was answered without being read
        if self._idle() and "header" not in self.timers:  # the first byte of the next request
            self._arm("header", self.guard.limits.header_timeout, self._header_timeout)
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read (e.g. 413)
            self._drain()
            return
        self._track()  # a pipelined request may have started
        if self._idle():
            self.guard.rest(self)

    # what the guard asks -----------------------------------------------------------
    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._cancel_all()
        if not self.transport.is_closing():
            self.transport.close()

    # internals ----------------------------------------------------------------------
    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _track(self) -> None:
        """After h11 events: a new request head stops the head timer and starts the body timer."""
        cycle = self.cycle
        if cycle is not None and cycle is not self.seen_cycle:
            self.seen_cycle = cycle
            self._cancel("header")
            self.guard.busy(self)
            self.requests += 1
            if self.requests >= self.guard.limits.max_requests:
                cycle.keep_alive = False  # this response closes the connection
            if cycle.more_body:
                self._arm("body", self.guard.limits.body_timeout, self._body_timeout)
        if cycle is not None and not cycle.more_body:
            self._cancel("body")

    def _header_timeout(self) -> None:
        self.timers.pop("header", None)
        if self._idle() and not self.transport.is_closing():
            self.guard.events.note(f"{self.guard.name}:header", f"{self.guard.name}: closed a connection that sent no "
                                   f"complete request head within --request-header-timeout {self.guard.limits.header_timeout:g} s")
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    def _body_timeout(self) -> None:
        self.timers.pop("body", None)
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        self.guard.events.note(f"{self.guard.name}:body", f"{self.guard.name}: dropped a request whose body did not "
                               f"arrive within --request-body-timeout {self.guard.limits.body_timeout:g} s")
        if not cycle.response_started:
            self.transport.write(TIMEOUT_RESPONSE)
        cycle.disconnected = True  # the application reads a disconnect; whatever it sends goes nowhere
        cycle.message_event.set()
        self.transport.close()

    def _drain(self) -> None:
        self.draining = True
        self._cancel_all()
        self._unset_keepalive_if_required()
        self._arm("linger", LINGER_S, self.transport.close)

    def _arm(self, name: str, seconds: float, callback) -> None:
        self._cancel(name)
        self.timers[name] = self.loop.call_later(seconds, callback)

    def _cancel(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _cancel_all(self) -> None:
        for name in list(self.timers):
            self._cancel(name)


@dataclass(frozen=True)
class Listener:
    """What one HTTP listener is: its name in logs, which paths are health, its own connection cap (None: the
    --max-connections setting)."""

    name: str
    is_health: Callable[[str], bool]
    max_connections: int | None = None


class HttpServer:
    """uvicorn on its own thread, on a socket bound up front so a taken port fails `serve` at once, with a guard on
    its connections."""

    def __init__(self, app, host: str, port: int, settings: EdgeSettings | None = None, listener: Listener | None = None,
                 max_connections: int | None = None, flag: str | None = None):
        settings = settings or EdgeSettings()
        listener = listener or Listener(f"HTTP :{port}", lambda path: False)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            raise BdLoraError(f"cannot listen on {host}:{port} ({flag or listener.name}): {err.strerror}") from None
        cap = listener.max_connections or max_connections or settings.max_connections or 1000
        limits = Limits(cap, HEALTH_RESERVE, settings.header_timeout, settings.body_timeout, settings.max_keep_alive_requests)
        self.guard = ConnectionGuard(listener.name, limits, listener.is_health)

        def protocol(**kwargs):
            return GuardedH11Protocol(self.guard, **kwargs)

        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=STOP_GRACE_S,
            http=protocol, ws="none", timeout_keep_alive=settings.keep_alive_timeout, backlog=accept_burst(cap),
            log_config=None))  # uvicorn's records go to the handler logs.configure_logging gives them: serve's format
        throttle_library_logs()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"http-{port}")

    def start(self, timeout: float = 30.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        # asyncio accepts up to its backlog argument in one go (the burst the guard cannot see yet, kept small);
        # the kernel may hold more waiting connections, so a burst of them is not dropped (SYN retries of 1 s+)
        self.sock.listen(KERNEL_BACKLOG)
        return self

    def begin_stop(self) -> None:
        """Stop accepting; open connections get STOP_GRACE_S to finish."""
        self.server.should_exit = True

    def stop(self, timeout: float = STOP_GRACE_S + 2) -> None:
        self.begin_stop()
        self.thread.join(timeout)
        self.sock.close()
