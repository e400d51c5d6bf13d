"""Repeated events on one line per interval: a hostile client can make a connection error (or an unexpected
exception) happen thousands of times a second, and the log must stay readable and small."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

LOG_INTERVAL_S = 30.0
log = logging.getLogger("trtllm_bdlora.edge")


class EventLog:
    """Counts events by kind; the first of a kind is logged at once, later ones at most once per interval, with
    how many happened since the last line."""

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval, clock
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()

    def note(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            now = self.clock()
            if now - self.last.get(kind, -self.interval) < self.interval:
                return
            count = self.counts.pop(kind)
            self.last[kind] = now
        self.logger.log(level, message if count == 1 else f"{message} ({count} times in the last {self.interval:g} s)")


class RepeatFilter(logging.Filter):
    """For loggers of libraries that log every failed connection (uvicorn's "Invalid HTTP request", asyncio's
    accept errors): the first record of a message passes, the same message again only once per interval, with
    the count of those held back."""

    def __init__(self, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self.last: dict[tuple[str, str], float] = {}
        self.held: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        with self.lock:
            now = self.clock()
            if now - self.last.get(key, -self.interval) < self.interval:
                self.held[key] = self.held.get(key, 0) + 1
                return False
            self.last[key] = now
            held = self.held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.interval:g} s, not shown)"
        return True


THROTTLED_LOGGERS = ("uvicorn.error", "asyncio", log.name)


def throttle_library_logs(names: tuple[str, ...] = THROTTLED_LOGGERS) -> None:
    """Put one RepeatFilter on each logger (once)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
