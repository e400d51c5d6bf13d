#!/usr/bin/env bash
# The first end-to-end check, inside the trtllm-bdlora container on a GPU node (see trtllm_bdlora/trtllm/smoke.py, flags in trtllm_bdlora/cli/smoke.py):
#   docker run --gpus all --rm trtllm-bdlora trtllm-bdlora-smoke [--workdir DIR]
# Refuses, in one line, anywhere else.
set -euo pipefail
exec python3 -m trtllm_bdlora.cli.smoke "$@"
