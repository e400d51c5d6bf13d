"""The CPU image's Python requirements: pyproject.toml's dependencies less torch (installed first, CPU-only, from
TORCH_INDEX_URL or local wheels) and triton (the GPU kernels' compiler; the CPU path never imports it).

  python3 cpu_requirements.py pyproject.toml > requirements.txt
"""

import re
import sys

import tomllib

SKIP = {"torch", "triton"}

with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in deps if re.match(r"[A-Za-z0-9._-]+", d).group().lower() not in SKIP))
