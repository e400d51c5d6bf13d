"""Commands that span ranks (`serve`, `generate`, `bench`): outside a launch, check everything first, then start the
ranks (each runs this same command line) or run here at TP 1; inside a launch, run as one rank."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass


@dataclass(frozen=True)
class Invocation:
    """How this process was started: the subcommand, its command line (what every rank runs again) and the module
    the ranks run it with (`python -m MODULE ARGV`; a test entry point wrapping the CLI passes its own)."""

    command: str
    argv: tuple[str, ...]
    module: str = "trtllm_bdlora"


def in_launch() -> bool:
    from trtllm_bdlora.distributed.launch import mpi_world_size

    return mpi_world_size() is not None


def run_on_ranks(invocation: Invocation, tp: int, interface: str | None, preflight: Callable[[], None],
                 run: Callable[[], int], rank_argv: Callable[[tuple[str, ...]], AbstractContextManager] | None = None,
                 graceful_signal: int | None = None) -> int:
    """Inside a launch: `run` as this rank. Else `preflight` (every check that needs no rank), then `run` here at
    TP 1, or start `tp` ranks running this command line (as `rank_argv` rewrites it, if given)."""
    if in_launch():
        return run()
    from trtllm_bdlora.logs import phase

    with phase("checks", announce=False):  # arguments, paths, the model's shape, ports, adapters
        preflight()
    if tp == 1:
        return run()
    from trtllm_bdlora.distributed.launcher import relaunch_ranks

    with (rank_argv or nullcontext)(invocation.argv) as argv:
        return relaunch_ranks(tp, list(argv), interface, graceful_signal=graceful_signal, module=invocation.module)


@contextmanager
def stdin_as_file(argv: tuple[str, ...], flag: str) -> Iterator[tuple[str, ...]]:
    """`argv` with `FLAG -` (or `FLAG=-`) pointing at a temporary copy of stdin, for ranks that cannot share it."""
    tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    try:
        with tmp:
            tmp.write(sys.stdin.read())
        out = list(argv)
        for i, arg in enumerate(out):
            if arg == flag and i + 1 < len(out) and out[i + 1] == "-":
                out[i + 1] = tmp.name
            elif arg == f"{flag}=-":
                out[i] = f"{flag}={tmp.name}"
        yield tuple(out)
    finally:
        os.unlink(tmp.name)
