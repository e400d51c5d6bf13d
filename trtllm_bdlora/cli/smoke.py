"""`docker/smoke.sh` (`python -m trtllm_bdlora.cli.smoke`): the first end-to-end check inside the container on a
GPU node (trtllm/smoke.py)."""

from __future__ import annotations

import os
import sys

from trtllm_bdlora.cli.flags import Flags, Parser, build
from trtllm_bdlora.config import CONTAINER_PLUGIN_LIB, SmokeConfig


def build_parser() -> Parser:
    parser = Parser(prog="smoke.sh", description="The first end-to-end check inside the trtllm-bdlora container on a GPU "
                                                 "node, in one command; one verdict line.")
    flags = Flags(parser, SmokeConfig, "smoke",
                  defaults=SmokeConfig(plugin_lib=os.environ.get("PLUGIN_LIB", CONTAINER_PLUGIN_LIB)))
    flags.add("--workdir", metavar="DIR", help="keep models, engines and repositories here (default: a new temporary "
                                               "directory)")
    flags.add("--plugin-lib", metavar="FILE", help="the BD-LoRA plugin library (default: PLUGIN_LIB, else the image's); "
                                                   "built from plugins/ when missing")
    flags.add("--grpc-port", type=int, help="the port the Triton under test listens on")
    return parser


def main(argv: list[str] | None = None) -> int:
    from trtllm_bdlora.errors import BdLoraError
    from trtllm_bdlora.trtllm.smoke import smoke_main

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return smoke_main(build(SmokeConfig, ns, "smoke"))
    except BdLoraError as err:
        print(f"smoke.sh: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
