"""The command line's building blocks: a parser whose errors are one line (with a suggestion for a mistyped flag,
command or choice), help that shows every default, and `Flags`, which ties each flag to the field of the same
name in a configuration dataclass (`trtllm_bdlora/config.py`), taking its default from there.

Adding a flag: the field (with its default) in config.py, then one `flags.add("--the-flag", help=...)` next to the
other flags of that dataclass. The value reaches the field by name; `tests/test_cli.py` checks both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import textwrap
from typing import Any

from trtllm_bdlora.config import (
    BACKENDS,
    DTYPES,
    LOG_FORMATS,
    LOG_LEVELS,
    SCHEMES,
    AdapterSpec,
    EngineConfig,
    LogConfig,
    parse_adapter_spec,
)
from trtllm_bdlora.errors import BdLoraError

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")
_VALUE_ACTIONS = (None, "store", "append")  # actions that take a value, and so a metavar


def _no_default(default: Any) -> bool:
    return default is None or default is False or default is argparse.SUPPRESS or default in ([], ())


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped line by line (a newline in one is kept, an indented line is left as written); every
    optional flag's help ends with its default unless it says one already."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line[:1].isspace():  # an example command line: as written
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) if line else "")
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and not action.required and not _no_default(action.default) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def suggestion(word: str, candidates) -> str:
    """` (did you mean X?)` for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """Errors are one line on stderr, `PROG: error: MESSAGE (see PROG --help)`, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = [c.strip().strip("'") for c in match.group(2).split(",")]
            message += suggestion(match.group(1), choices)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extras: list[str]):
        """Refuse arguments no flag takes, suggesting the closest flag for each mistyped one."""
        flags = [s for action in self._actions for s in action.option_strings]
        notes = [f"{word}{suggestion(word.split('=', 1)[0], flags)}" if word.startswith("-") else word for word in extras]
        self.error(f"unrecognized arguments: {' '.join(notes)}")


def adapter_arg(text: str) -> AdapterSpec:
    """argparse type for `--adapter [NAME:]ID=DIR`."""
    try:
        return parse_adapter_spec(text)
    except BdLoraError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Flags:
    """The flags of one configuration dataclass on a parser: `--max-loras` sets field `max_loras` (or `field=`),
    stored under `SECTION.FIELD`, with the dataclass's default (a field without one makes the flag required)."""

    def __init__(self, parser: argparse.ArgumentParser, config: type, section: str, defaults: Any = None,
                 title: str | None = None):
        self.parser = parser.add_argument_group(title) if title else parser
        self.config, self.section = config, section
        self.fields = {f.name: f for f in dataclasses.fields(config)}
        self.defaults = defaults  # an instance whose values are this command's defaults (e.g. generate's log level)

    def default(self, name: str) -> Any:
        if self.defaults is not None:
            return getattr(self.defaults, name)
        f = self.fields[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return dataclasses.MISSING

    def add(self, flag: str, field: str | None = None, aliases: tuple[str, ...] = (), **kwargs) -> argparse.Action:
        """`aliases`: other spellings of the flag (an older name kept working)."""
        name = field or flag.lstrip("-").replace("-", "_")
        if name not in self.fields:
            raise AttributeError(f"{flag}: {self.config.__name__} has no field {name!r}")
        default = self.default(name)
        positional = not flag.startswith("-")
        if default is dataclasses.MISSING:
            if not positional:
                kwargs.setdefault("required", True)
        else:
            kwargs.setdefault("default", list(default) if kwargs.get("action") == "append" else default)
        if kwargs.get("action") in _VALUE_ACTIONS and "choices" not in kwargs:
            kwargs.setdefault("metavar", name.upper())
        if positional:
            kwargs.setdefault("metavar", flag)
            return self.parser.add_argument(f"{self.section}.{name}", **kwargs)
        return self.parser.add_argument(flag, *aliases, dest=f"{self.section}.{name}", **kwargs)


def section_values(ns: argparse.Namespace, section: str) -> dict[str, Any]:
    """The parsed values stored under `SECTION.`, by field name (lists as tuples: configurations are frozen)."""
    prefix = section + "."
    return {key[len(prefix):]: tuple(value) if isinstance(value, list) else value
            for key, value in vars(ns).items() if key.startswith(prefix)}


def build(config: type, ns: argparse.Namespace, section: str, **values) -> Any:
    """A configuration from its section of the parsed flags, plus `values` no flag gives."""
    return config(**section_values(ns, section), **values)


def command(sub, name: str, help: str, description: str, configure, run) -> Parser:
    """A subcommand: `configure(namespace)` builds its configuration, `run(config, invocation)` runs it."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(configure=configure, run=run)
    return parser


# The engine's flags, for every command whose configuration has the field (serve, generate; bench a subset).
ENGINE_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--model", "model", dict(help="a Hugging Face Llama directory (safetensors), a `build --backend torch` output "
                                   "directory, or smollm2-135m (embedded)")),
    ("--tp", "tp", dict(type=int, help="tensor-parallel ranks: started as N processes on this machine, or joins an "
                                       "mpirun launch of N")),
    ("--scheme", "scheme", dict(choices=SCHEMES, help="how adapters are sharded over the ranks: bdlora (block-diagonal, "
                                                      "no LoRA communication), slora (split adapters with LoRA "
                                                      "collectives), replicated (every rank runs the whole adapter)")),
    ("--backend", "backend", dict(choices=BACKENDS, help="torch: this package's engine, on CPU or CUDA; trtllm is "
                                                         "refused here with a pointer (TensorRT-LLM engines are built by "
                                                         "`build` and served by Triton: `launch-triton`)")),
    ("--adapter", "adapters", dict(type=adapter_arg, action="append", metavar="[NAME:]ID=DIR",
                                   help="register the PEFT adapter in DIR as lora_task_id ID (OpenAI model name NAME, "
                                        "else ID); repeat for more")),
    ("--max-loras", "max_loras", dict(type=int, help="adapter slots per rank: distinct adapters one engine step runs")),
    ("--max-batch-size", "max_batch_size", dict(type=int, help="sequences one engine step runs at most")),
    ("--dtype", "dtype", dict(choices=DTYPES, help="compute type of the base weights and the adapters")),
    ("--device", "device", dict(help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")),
    ("--max-lora-rank", "max_lora_rank", dict(type=int, help="largest adapter rank served; sizes the device slots "
                                                             "once at start-up (default: the torch build's, else 64 as "
                                                             "TensorRT-LLM's engines)")),
    ("--lora-cache-host-bytes", "lora_cache_host_bytes",
     dict(type=int, metavar="BYTES", help="host memory per rank for registered adapters, as TensorRT-LLM's "
                                          "lora_cache_host_memory_bytes (default 1 GiB); least recently used adapters "
                                          "no unfinished request uses are evicted")),
    ("--pin-adapters", "pin_adapters",
     dict(action=argparse.BooleanOptionalAction, help="keep the --adapter adapters (and adapters loaded at run time) "
                                                      "in the host cache for good; --no-pin-adapters lets them be "
                                                      "evicted like adapters registered by requests")),
    ("--comm-interface", "comm_interface",
     dict(metavar="IFACE", help="network interface the ranks' process group binds to (default: loopback, one "
                                "machine); name the interface the machines share for a multi-node mpirun launch")),
    ("--max-num-tokens", "max_num_tokens",
     dict(type=int, metavar="N", help="token budget of one engine step, as TensorRT-LLM's max_num_tokens: decoding "
                                      "sequences get their token first, prompts are prefilled in chunks in what is "
                                      "left (default 2048 on a GPU, 256 on a CPU)")),
    ("--threads-per-rank", "threads_per_rank",
     dict(type=int, metavar="N", help="torch threads of every rank (default: the cores this process may use, divided by "
                                      "--tp)")),
    ("--kv-cache-bytes", "kv_cache_bytes",
     dict(type=int, metavar="BYTES", help="KV cache per rank, as vLLM's VLLM_CPU_KVCACHE_SPACE: requests are admitted "
                                          "while it can hold them at their longest (prompt + max_tokens), one too long "
                                          "for all of it is refused; memory is taken only as it is written (default "
                                          "4 GiB)")),
    ("--enable-prefix-caching", "enable_prefix_caching",
     dict(action=argparse.BooleanOptionalAction, help="as vLLM's: a new sequence copies the KV cache of the longest "
                                                      "prompt prefix a running or recently finished sequence with the "
                                                      "same adapter holds (finished rows are kept until a request "
                                                      "needs the room), "
                                                      "instead of computing it (not for requests asking for prompt "
                                                      "logits or log-probs); --no-enable-prefix-caching computes every "
                                                      "prompt in full (default: on)")),
    ("--rank-timeout", "rank_timeout",
     dict(type=float, metavar="SECONDS", help="a rank whose heartbeat stops for this long (stopped, hung, its host cut "
                                              "off) is lost: serve turns readiness off, fails pending and new requests "
                                              "with UNAVAILABLE and exits naming the rank and its PID; generate and "
                                              "bench exit naming it (0: off, only the 600 s collective timeout remains; "
                                              "docs/reliability.md)")),
    ("--allow-request-adapters", "allow_request_adapters",
     dict(action=argparse.BooleanOptionalAction, help="register adapters sent with requests (lora_task_id + "
                                                      "lora_weights + lora_config), as Triton does; "
                                                      "--no-allow-request-adapters serves only the --adapter ids")),
)


def add_engine_flags(parser: argparse.ArgumentParser, config: type = EngineConfig, section: str = "engine",
                     exclude: frozenset[str] = frozenset(), aliases: dict[str, tuple[str, ...]] | None = None) -> Flags:
    """The engine flags whose field `config` has (all of EngineConfig's, or the subset `bench` honours)."""
    flags = Flags(parser, config, section, title="engine")
    for flag, field, kwargs in ENGINE_FLAGS:
        if field in flags.fields and field not in exclude:
            flags.add(flag, field=field, aliases=(aliases or {}).get(flag, ()), **kwargs)
    return flags


def add_log_flags(parser: argparse.ArgumentParser, defaults: LogConfig) -> Flags:
    flags = Flags(parser, LogConfig, "log", defaults=defaults, title="logging")
    flags.add("--log-level", field="level", choices=LOG_LEVELS,
              help="stderr log level: info adds the start-up phases with their durations, one access line per "
                   "request and adapter registrations, unloads and evictions (see docs/operations.md)")
    flags.add("--log-format", field="format", choices=LOG_FORMATS,
              help="kv: `TIME LEVEL LOGGER message key=value ...`; json: one JSON object per line")
    return flags
