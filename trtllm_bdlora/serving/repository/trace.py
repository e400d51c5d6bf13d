"""Triton's trace extension (`/v2/trace/setting`, `/v2/models/{m}/trace/setting`, gRPC TraceSetting): settings kept
and answered as Triton keeps and answers them (tracer.cc, http_server.cc HandleTrace; checked against tritonserver
2.51): one global setting and per-model overrides, each value a string (`trace_level` a list), `null` / an empty value
clears a model's override back to the global one; `trace_count` counts down as requests are traced.

What tracing does here: a KServe request to a model whose trace level is TIMESTAMPS, one in every `trace_rate`, while
`trace_count` is not 0, writes one line when it ends to the server's log (logger `trtllm_bdlora.trace`, level INFO):
a JSON object as Triton's trace file holds it, `{"id", "model_name", "model_version", "request_id", "timestamps":
[{"name", "ns"}, ...]}` with REQUEST_START, QUEUE_START (its inputs checked), COMPUTE_START (QUEUE_START plus the
time its executor requests waited in the runtime's queue), COMPUTE_END (its last response) and REQUEST_END, in
nanoseconds of the wall clock. Differences from Triton: the trace goes to the log, so TIMESTAMPS needs no trace
file (`trace_file` stays "", and, as in Triton, cannot be set over the network); TENSORS is refused (UNIMPLEMENTED);
`log_frequency` is kept and answered but lines are written as requests end; an unknown level or setting is
refused (Triton ignores it)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from trtllm_bdlora.errors import RequestError, UnimplementedError

log = logging.getLogger("trtllm_bdlora.trace")
DEFAULTS = {"trace_level": ("OFF",), "trace_rate": 1000, "trace_count": -1, "log_frequency": 0}
LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
UINT32_MAX, INT32_MAX = 2**32 - 1, 2**31 - 1


def _parse_int(key: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise RequestError(f"Unable to parse '{key}', got: {text}", param=key) from None
    if key == "trace_count" and value < low:
        raise RequestError(f"Unable to parse 'trace_count'. Expecting value >= {low}, got:{text}", param=key)
    if not low <= value <= high:
        raise RequestError(f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {text}", param=key)
    return value


def parse_update(changes: dict[str, list[str] | None]) -> dict[str, object]:
    """Setting name -> new value (None: clear), from each transport's values: a list of strings, or None to clear."""
    out: dict[str, object] = {}
    for key, values in changes.items():
        if key == "trace_file":
            raise UnimplementedError("trace file location can not be updated through network protocol")
        if key not in (*DEFAULTS, "trace_mode"):
            raise RequestError(f"unknown trace setting '{key}' (trace_level, trace_rate, trace_count, log_frequency)",
                               param=key)
        if values is None:
            out[key] = None
            continue
        if key == "trace_mode":
            if values != ["triton"]:
                raise RequestError(f"trace_mode must be 'triton', got {values}", param=key)
            continue
        if key == "trace_level":
            out[key] = _levels(values)
            continue
        if len(values) != 1:
            raise RequestError(f"expect only 1 value for '{key}'", param=key)
        low, high = (-1, INT32_MAX) if key == "trace_count" else (0, UINT32_MAX)
        out[key] = _parse_int(key, values[0], low, high)
    return out


def _levels(values: list[str]) -> tuple[str, ...]:
    for level in values:
        if level not in LEVELS:
            raise RequestError(f"unknown trace level '{level}' (OFF, TIMESTAMPS or TENSORS)", param="trace_level")
    if "OFF" in values:
        if len(values) != 1:
            raise RequestError("Expect only one trace level 'OFF' is specified", param="trace_level")
        return ("OFF",)
    if "TENSORS" in values:
        raise UnimplementedError("trace level TENSORS is not supported by this server (TIMESTAMPS is)")
    return ("TIMESTAMPS",) if values else ("OFF",)


@dataclass
class _Setting:
    values: dict[str, object] = field(default_factory=dict)
    seen: int = 0  # requests sampled against this setting's rate


class Tracer:
    def __init__(self, models):
        self.models = frozenset(models)
        self.global_ = _Setting(dict(DEFAULTS))
        self.overrides: dict[str, _Setting] = {}
        self._lock = threading.Lock()
        self._next_id = 0

    def _owner(self, model: str, key: str) -> _Setting:
        """The setting `key` of `model` is read from (and counted down in): its override, else the global one."""
        override = self.overrides.get(model)
        return override if override is not None and key in override.values else self.global_

    def settings(self, model: str = "") -> dict:
        """Triton's answer: the effective settings of `model` ("" for the global ones)."""
        with self._lock:
            values = {key: self._owner(model, key).values[key] for key in DEFAULTS}
        return {"trace_level": list(values["trace_level"]), "trace_rate": str(values["trace_rate"]),
                "trace_count": str(values["trace_count"]), "log_frequency": str(values["log_frequency"]),
                "trace_file": "", "trace_mode": "triton"}

    def update(self, model: str, changes: dict[str, list[str] | None]) -> dict:
        """Apply `changes` (parse_update's input) to `model`'s override, or to the global setting for ""; returns
        the effective settings."""
        parsed = parse_update(changes)
        with self._lock:
            target = self.global_ if not model else self.overrides.setdefault(model, _Setting())
            for key, value in parsed.items():
                if value is not None:
                    target.values[key] = value
                elif model:
                    target.values.pop(key, None)
                else:
                    target.values[key] = DEFAULTS[key]
                if key == "trace_rate":
                    target.seen = 0
        return self.settings(model)

    def sample(self, model: str) -> int | None:
        """A trace id when this request to `model` is traced (counting it down), else None."""
        with self._lock:
            level = self._owner(model, "trace_level").values["trace_level"]
            if "TIMESTAMPS" not in level:
                return None
            rated = self._owner(model, "trace_rate")
            rate = int(rated.values["trace_rate"]) or 1
            rated.seen += 1
            if (rated.seen - 1) % rate:
                return None
            counted = self._owner(model, "trace_count")
            count = int(counted.values["trace_count"])
            if count == 0:
                return None
            if count > 0:
                counted.values["trace_count"] = count - 1
            self._next_id += 1
            return self._next_id


@dataclass
class Trace:
    """One traced request's timestamps (perf_counter nanoseconds, written as wall-clock nanoseconds)."""

    id: int
    model: str
    request_id: str
    start: int = field(default_factory=time.perf_counter_ns)
    checked: int | None = None
    last_response: int | None = None

    def write(self, queued_ns: int) -> None:
        end = time.perf_counter_ns()
        to_wall = time.time_ns() - end
        checked = self.checked if self.checked is not None else self.start
        compute_end = self.last_response if self.last_response is not None else end
        points = [("REQUEST_START", self.start), ("QUEUE_START", checked),
                  ("COMPUTE_START", min(checked + queued_ns, compute_end)), ("COMPUTE_END", compute_end),
                  ("REQUEST_END", end)]
        log.info(json.dumps({"id": self.id, "model_name": self.model, "model_version": 1,
                             "request_id": self.request_id,
                             "timestamps": [{"name": name, "ns": ns + to_wall} for name, ns in points]}))
