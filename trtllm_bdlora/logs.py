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


def configure_logging(level: str = "info") -> None:
    """Send the package's log records at `level` and above to stderr, one line each."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


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
