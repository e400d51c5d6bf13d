#!/usr/bin/env bash
# The entrypoint of both images (docker/Dockerfile, docker/Dockerfile.cpu): `IMAGE [serve flags]` serves, `IMAGE
# SUBCOMMAND ...` runs any trtllm-bdlora subcommand, `IMAGE COMMAND ...` anything else (see entrypoint.py).
set -euo pipefail
exec python3 -m trtllm_bdlora.cli.entrypoint "$@"
