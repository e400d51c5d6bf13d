#!/usr/bin/env bash
# Build engines if absent, fill the model repository, start one tritonserver per rank (see entrypoint.py).
set -euo pipefail
exec python3 -m trtllm_bdlora.serving.entrypoint "$@"
