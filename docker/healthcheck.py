#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the server's KServe readiness endpoint (/v2/health/ready) answers 200.

The port and address are read from the server's own command line (PID 1, as the entrypoint exec'd it), so
`--http-port` / `HTTP_PORT` changes are followed; stdlib only, one line on failure.
"""

import sys
import urllib.request
from pathlib import Path


def flag(argv: list[str], name: str, default: str) -> str:
    value = default
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def main() -> int:
    argv = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    host = flag(argv, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{host}:{flag(argv, '--http-port', '8000')}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as err:
        print(f"healthcheck: {url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
