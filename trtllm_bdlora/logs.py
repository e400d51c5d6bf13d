"""Operational logging (Python's `logging`, on stderr): start-up phases with their durations, one access line per
request, adapter registration, unloading and eviction, failures. Everything `serve` prints goes through here, in
one format chosen by `--log-format`:

    kv    `TIME LEVEL LOGGER message key=value ...` (logfmt after the message; a value with spaces, quotes or `=`
          is JSON-quoted)
    json  one JSON object per line: {"time", "level", "logger", "message", key: value ...}

TIME is UTC ISO 8601 with milliseconds. Records carry their key=value fields apart from the message
(`log_event`), so both formats render them. Access lines (logger `trtllm_bdlora.access`, level INFO, no message)
carry, per executor request (one per batch row and returned sequence, as TensorRT-LLM counts them):

    id          the client's request id ("" when it sent none)     seq         the runtime's own request number
    model       the model the client called (ensemble, tensorrt_llm, tensorrt_llm_bls, ...)
    adapter     lora_task_id, or "-"                               tokens_in   prompt tokens
    tokens_out  generated tokens                                   queue_ms    arrival to first scheduled
    compute_ms  first scheduled to finished                        outcome     length | end_id | stop_words (a
                                                                               stop word or OpenAI stop string) |
                                                                               cancelled | error | rejected
    error       the one-line error (error and rejected only)

and one line per adapter load or unload through the OpenAI API, refused ones included:

    op          load_lora_adapter | unload_lora_adapter           name        the lora_name the client sent
    adapter     the lora_task_id it names, or "-"                  path        the lora_path sent (loads)
    outcome     loaded | unloaded | rejected                       error       the one-line error (rejected only)

Start-up lines (logger `trtllm_bdlora.startup`) name the phase and its `seconds`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from trtllm_bdlora.config import LogConfig

LOGGER = "trtllm_bdlora"
LEVELS = ("debug", "info", "warning", "error", "critical")
# other loggers whose records `serve` prints: uvicorn's server messages, asyncio's (accept errors), Python warnings
ADOPTED_LOGGERS = ("uvicorn", "asyncio", "py.warnings")
FIELDS = "fields"  # the LogRecord attribute holding a record's key=value fields
# the variables tqdm and huggingface_hub read (at import) to turn their progress bars off
PROGRESS_BAR_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
access = logging.getLogger(f"{LOGGER}.access")
startup = logging.getLogger(f"{LOGGER}.startup")


def kv(**fields) -> str:
    """`key=value` pairs on one line; values that would be ambiguous are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def log_event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    """One record: a short message and its key=value fields, kept apart so every format renders both."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={FIELDS: fields})


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
def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS, None)
        line = " ".join(part for part in (_utc(record), record.levelname, record.name, record.getMessage(),
                                          kv(**fields) if fields else "") if part)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _utc(record), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            if isinstance(value, float):
                value = round(value, 3)
            out.setdefault(key, value if value is None or isinstance(value, (bool, int, float, str)) else str(value))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


FORMATTERS = {"kv": KvFormatter, "json": JsonFormatter}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's last-resort handler does)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure_logging(config: LogConfig | str = "info", adopt: bool = False) -> None:
    """Send the package's records at the configured level and above to stderr, one line each in the configured
    format; with `adopt` (a command's process), uvicorn's records and Python's warnings too. Turns library progress
    bars off unless `progress_bars`: a log file gets no carriage-return bars (the variables reach the ranks this
    process starts)."""
    if isinstance(config, str):
        config = LogConfig(level=config)
    handler = StderrHandler()
    handler.setFormatter(FORMATTERS[config.format]())
    handler.addFilter(_SWITCHES)
    for name in (LOGGER, *(ADOPTED_LOGGERS if adopt else ())):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    threshold = logging.getLevelName(config.level.upper())
    set_log_switches(info=threshold <= logging.INFO, warning=threshold <= logging.WARNING,
                     error=threshold <= logging.ERROR, verbose=1 if threshold <= logging.DEBUG else 0)
    if adopt:
        logging.captureWarnings(True)
    if not config.progress_bars:
        for name, value in PROGRESS_BAR_ENV.items():
            os.environ.setdefault(name, value)


@contextmanager
def phase(name: str, quiet: bool = False, announce: bool = True, **fields) -> Iterator[dict]:
    """Log a start-up phase as it begins (unless not `announce`: a phase of a second or less) and when it ends,
    with its duration (at DEBUG when `quiet`: the ranks other than 0); the caller may add fields to the yielded
    dict for the closing line."""
    level = logging.DEBUG if quiet else logging.INFO
    if announce:
        log_event(startup, f"{name} ...", level, **fields)
    t0 = time.monotonic()
    done: dict = {}
    yield done
    log_event(startup, f"{name} done", level, seconds=round(time.monotonic() - t0, 2), **done)


def log_adapter_call(op: str, name: str | None, task_id: int | None, outcome: str, path: str | None = None,
                     error: str | None = None) -> None:
    """The access line of one adapter load or unload (OpenAI API), whatever its outcome."""
    fields = dict(op=op, name=name, adapter=task_id, path=path, outcome=outcome)
    if error:
        fields["error"] = error
    log_event(access, "", **fields)


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
    log_event(access, "", **fields)
