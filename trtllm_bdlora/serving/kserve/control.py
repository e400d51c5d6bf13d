"""The KServe extensions that change the server at run time, as both front ends read them: Triton's logging extension
(`/v2/logging`, LogSettings), trace settings (`/v2/trace/setting`, TraceSetting; serving/repository/trace.py) and the
parameters of a repository unload. Values come in as Python values (JSON values, or the protobuf `*_param` fields).

Logging: log_info, log_warning and log_error turn each level on or off, log_verbose_level > 0 adds DEBUG records;
`log_access` (ours; Triton has no access log) turns the access lines (logs.py) on or off. log_file cannot be changed
over the network (UNIMPLEMENTED, as Triton); log_format is "default", this server's one format (logs.py). Triton
ignores a key it does not know; here it is refused, naming it."""

from __future__ import annotations

from trtllm_bdlora.errors import RequestError, UnimplementedError
from trtllm_bdlora.logs import log_switches, set_log_switches

LOG_FORMAT = "default"
SWITCHES = {"log_info": "info", "log_warning": "warning", "log_error": "error", "log_access": "access_lines"}


def log_settings() -> dict:
    """Triton's answer (with `log_access`)."""
    switches = log_switches()
    return {"log_file": "", "log_info": switches["log_info"], "log_warning": switches["log_warning"],
            "log_error": switches["log_error"], "log_verbose_level": switches["log_verbose_level"],
            "log_format": LOG_FORMAT, "log_access": switches["log_access"]}


def update_log_settings(values: dict) -> dict:
    """Check every value first, then apply them all; returns the settings now in force."""
    changes: dict = {}
    for key, value in values.items():
        if key == "log_file":
            raise UnimplementedError("log file location can not be updated through network protocol")
        if key in SWITCHES:
            if not isinstance(value, bool):
                raise RequestError(f"expect boolean for '{key}'", param=key)
            changes[SWITCHES[key]] = value
        elif key == "log_verbose_level":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise RequestError(f"expect unsigned integer for '{key}'", param=key)
            changes["verbose"] = value
        elif key == "log_format":
            if value != LOG_FORMAT:
                raise RequestError(f"invalid argument for log_format, got: {value} (this server has one format: "
                                   f"'{LOG_FORMAT}')", param=key)
        else:
            raise RequestError(f"unknown log setting '{key}' (log_info, log_warning, log_error, log_verbose_level, "
                               "log_format, log_access)", param=key)
    set_log_switches(**changes)
    return log_settings()


def http_trace_changes(doc) -> dict[str, list[str] | None]:
    """A trace-setting POST body: `null` clears, `trace_level` is a list of strings, every other value a string."""
    if not isinstance(doc, dict):
        raise RequestError("trace setting request must be a JSON object")
    changes: dict[str, list[str] | None] = {}
    for key, value in doc.items():
        if value is None:
            changes[key] = None
        elif key == "trace_level":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RequestError("'trace_level' must be a list of strings", param=key)
            changes[key] = list(value)
        elif isinstance(value, str):
            changes[key] = [value]
        else:
            raise RequestError(f"'{key}' must be a string, got {value!r}", param=key)
    return changes


def unload_dependents(parameters) -> bool:
    value = (parameters or {}).get("unload_dependents", False)
    if not isinstance(value, bool):
        raise RequestError(f"Unable to parse 'unload_dependents': expect boolean, got {value!r}",
                           param="unload_dependents")
    return value
