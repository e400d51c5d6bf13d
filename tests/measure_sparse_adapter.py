"""Peak memory and time of loading a sparse adapter_model.safetensors that claims GIB gigabytes (one lora_A tensor
that wide), the way serve loads a run-time or --adapter adapter for a model (hidden 64, 2 layers):

    python tests/measure_sparse_adapter.py --gib 10

Prints one JSON line: the outcome (the refusal's message), the peak RSS growth of this process (VmHWM, reset
before the load) and the seconds it took. Runs this checkout's loader, with serve's bounds where it has them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.adapter_file_helpers import GIB, huge_tensor_header, sized_header, write_sparse_safetensors  # noqa: E402
from tests.measure_adapter_root_race import RANK, SHAPE  # noqa: E402


def _hwm() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=10)
    args = parser.parse_args()
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.errors import BdLoraError

    bounds = {"max_lora_rank": 64, "max_elements": (1 << 30) // 4}  # serve's defaults at TP 1, float32
    if "max_elements" not in inspect.signature(load_peft_adapter).parameters:
        bounds = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "huge"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8}))
        size = int(args.gib * GIB)
        write_sparse_safetensors(directory / "adapter_model.safetensors",
                                 sized_header(huge_tensor_header(size, RANK), size), size)
        Path("/proc/self/clear_refs").write_text("5")
        before, start = _hwm(), time.monotonic()
        try:
            load_peft_adapter(directory, SHAPE, **bounds)
            outcome = "loaded"
        except BdLoraError as err:
            outcome = str(err).replace(str(directory), "DIR")
        print(json.dumps({"gib": args.gib, "bounds": bool(bounds), "outcome": outcome,
                          "peak_rss_growth_mib": round((_hwm() - before) / 2**20, 1),
                          "seconds": round(time.monotonic() - start, 2)}))


if __name__ == "__main__":
    main()
