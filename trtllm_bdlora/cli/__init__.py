"""The `trtllm-bdlora` command. One module per command group registers its subcommands: their flags (`flags.py`),
a function turning the parsed flags into the command's configuration (`trtllm_bdlora/config.py`), and a small
function running it that imports the library lazily, so `--help` and a bad flag answer at once.

Inside a multi-rank launch (this package's launcher, or the user's mpirun) every rank runs the same command line
and reports a failure once (`distributed/launch.py run_rank`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trtllm_bdlora import __version__
from trtllm_bdlora.cli.flags import Parser, adapter_arg
from trtllm_bdlora.cli.launching import Invocation
from trtllm_bdlora.errors import BdLoraError

parse_adapter_arg = adapter_arg  # argparse type of `--adapter [NAME:]ID=DIR`, for scripts that take the same flag


def _groups() -> tuple:
    """The command-group modules, in the order `--help` lists their commands (imported here, not with the package:
    `python -m trtllm_bdlora.cli.smoke` runs on a bare Python)."""
    from trtllm_bdlora.cli import adapters, client, generate, kernels, perf, serve, trtllm

    return adapters, generate, serve, client, perf, trtllm, kernels


def build_parser() -> Parser:
    parser = Parser(prog="trtllm-bdlora",
                    description="Serve many (BD-)LoRA adapters on one Llama base under tensor parallelism. "
                                "`trtllm-bdlora COMMAND --help` describes each command and its flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in _groups():
        group.add_commands(sub)
    parser.commands = sub.choices
    return parser


def command_names() -> list[str]:
    """Every subcommand's name."""
    return list(build_parser().commands)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; a bad one exits 2 with one line (and a suggestion for a mistyped flag)."""
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[ns.command].unrecognized(extras)
    return ns


def parse_config(argv: list[str]) -> tuple[str, Any]:
    """(subcommand, its configuration) of a command line, without running it; BdLoraError for a value the
    configuration refuses, exit 2 for a command line that does not parse."""
    ns = _parse(argv)
    return ns.command, ns.configure(ns)


def _run(ns: argparse.Namespace, invocation: Invocation) -> int:
    config = ns.configure(ns)
    if getattr(config, "log", None) is not None:
        from trtllm_bdlora.logs import configure_logging

        configure_logging(config.log, adopt=True)
    return int(ns.run(config, invocation) or 0)


def main(argv: list[str] | None = None, rank_module: str = "trtllm_bdlora") -> int:
    """Run one command line (default: this process's); `rank_module` is what the ranks it starts run it with
    (`python -m MODULE ...`: a test entry point wrapping this function names itself)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parse(argv)
    invocation = Invocation(ns.command, tuple(argv), rank_module)
    from trtllm_bdlora.distributed.launch import mpi_world_size, run_rank

    if mpi_world_size() is not None:  # one rank of a multi-rank launch: report failures once, exit at once
        return run_rank(ns.command, lambda: _run(ns, invocation))
    try:
        return _run(ns, invocation)
    except BdLoraError as err:
        print(f"trtllm-bdlora {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
