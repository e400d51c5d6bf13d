"""Operational logging for `serve` (Python's `logging`, on stderr): one access line per request, adapter
registration and eviction, failures.

Every line is `TIME LEVEL LOGGER key=value ...` (logfmt): TIME is UTC ISO 8601 with milliseconds; a value with
spaces, quotes or `=` is JSON-quoted. Access lines (logger `trtllm_bdlora.access`, level INFO) carry, per
executor request (one per batch row and returned sequence, as TensorRT-LLM counts them):

    id          the client's request id ("" when it sent none)     seq         the runtime's own request number
    model       the model the client called (ensemble, tensorrt_llm, tensorrt_llm_bls, ...)
    adapter     lora_task_id, or "-"                               tokens_in   prompt tokens
    tokens_out  generated tokens                                   queue_ms    arrival to first scheduled
    compute_ms  first scheduled to finished                        outcome     length | end_id | stop_words |
                                                                               cancelled | error | rejected
    error       the one-line error (error and rejected only)
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "trtllm_bdlora"
LEVELS = ("debug", "info", "warning", "error", "critical")
access = logging.getLogger(f"{LOGGER}.access")


def kv(**fields) -> str:
    """`key=value` pairs on one line; values that would be ambiguous are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _UtcFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


class _Switches(logging.Filter):
    """Triton's log_info / log_warning / log_error switches, on the package's handler: each turns one level off or on
    (ERROR covers CRITICAL); DEBUG records are made only at verbose level 1 and above (the logger's level)."""

    def __init__(self):
        super().__init__()
        self.on = {logging.INFO: True, logging.WARNING: True, logging.ERROR: True}

    def filter(self, record: logging.LogRecord) -> bool:
        for level in (logging.ERROR, logging.WARNING, logging.INFO):
            if record.levelno >= level:
                return self.on[level]
        return True


_SWITCHES = _Switches()
_VERBOSE = [0]


def configure_logging(level: str = "info") -> None:
    """Send the package's log records at `level` and above to stderr, one line each."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_SWITCHES)
    logger.addHandler(handler)
    logger.propagate = False
    threshold = logging.getLevelName(level.upper())
    set_log_switches(info=threshold <= logging.INFO, warning=threshold <= logging.WARNING,
                     error=threshold <= logging.ERROR, verbose=1 if threshold <= logging.DEBUG else 0)


def log_switches() -> dict:
    """The run-time switches, as Triton's logging extension names them, plus `log_access` (the access lines)."""
    return {"log_info": _SWITCHES.on[logging.INFO], "log_warning": _SWITCHES.on[logging.WARNING],
            "log_error": _SWITCHES.on[logging.ERROR], "log_verbose_level": _VERBOSE[0], "log_access": not access.disabled}


def set_log_switches(info: bool | None = None, warning: bool | None = None, error: bool | None = None,
                     verbose: int | None = None, access_lines: bool | None = None) -> None:
    """Change what the package logs from now on (None: unchanged)."""
    for level, on in ((logging.INFO, info), (logging.WARNING, warning), (logging.ERROR, error)):
        if on is not None:
            _SWITCHES.on[level] = on
    if verbose is not None:
        _VERBOSE[0] = verbose
    lowest_on = min((level for level, on in _SWITCHES.on.items() if on), default=logging.CRITICAL + 1)
    logging.getLogger(LOGGER).setLevel(logging.DEBUG if _VERBOSE[0] > 0 else lowest_on)  # no record made to be dropped
    if access_lines is not None:
        access.disabled = not access_lines


def log_request(request, model: str, outcome: str, error: str | None = None) -> None:
    """The access line of one finished (or refused) executor request."""
    if not access.isEnabledFor(logging.INFO):
        return
    times, now = request.times_ns, time.time_ns()
    arrival = times.get("arrival", now)
    scheduled = times.get("first_scheduled")
    queue_ns = (scheduled if scheduled is not None else now) - arrival
    compute_ns = now - scheduled if scheduled is not None else 0
    fields = dict(id=request.id if request.id is not None else "", seq=request.index, model=model,
                  adapter=request.adapter, tokens_in=len(request.prompt_ids), tokens_out=len(request.output_ids),
                  queue_ms=queue_ns / 1e6, compute_ms=compute_ns / 1e6, outcome=outcome)
    if error:
        fields["error"] = error
    access.info(kv(**fields))
