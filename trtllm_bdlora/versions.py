"""The one place the production route's versions are pinned (docker/, build, the container entrypoint, aot, docs).

Source: Triton's compatibility matrix (server repo `docs/introduction/compatibility.md`, trtllm-python-py3 table):
26.04 to 26.07 ship TensorRT-LLM 1.2.1, TensorRT 10.14.1.48, CUDA 13.1.0.036, torch 2.10.0a0 (26.03 ships 1.2.0;
25.10 ships 1.0.0). TensorRT-LLM 1.2.x is the last line with the TensorRT-engine flow (`trtllm-build`, the
`tensorrtllm` C++ backend). tensorrtllm_backend's `dockerfile/Dockerfile.triton.trt_llm_backend` (commit 0b9d7d5)
builds the same stack: TensorRT 10.14.1.48 under /usr/local/tensorrt, tensorrt_llm==1.2.1, pytorch-triton 3.5.1.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from trtllm_bdlora.errors import BdLoraError

CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
TENSORRT_LLM_VERSION = "1.2.1"
TENSORRT_VERSION = "10.14.1.48"
TENSORRT_HEADERS_TAG = "v10.14"  # public NVIDIA/TensorRT tag whose NvInferVersion.h says 10.14.1.48
CUDA_VERSION = "13.1"  # the container's CUDA 13.1.0.036
TRITON_KERNEL_COMPILER = "3.9.0"  # `triton` that `trtllm-bdlora aot` compiles the plugin's kernels with
ALLOW_MISMATCH_ENV = "TRTLLM_BDLORA_ALLOW_VERSION_MISMATCH"


def version_mismatches(tensorrt_llm_version: str | None, tensorrt_version: str | None) -> list[str]:
    """What differs from the pins; `None` means the package is missing."""
    problems = []
    for name, found, pinned in (("tensorrt_llm", tensorrt_llm_version, TENSORRT_LLM_VERSION),
                                ("tensorrt", tensorrt_version, TENSORRT_VERSION)):
        if found is None:
            problems.append(f"{name} is not installed (need {pinned})")
        elif found != pinned:
            problems.append(f"{name} {found} (need {pinned})")
    return problems


def mismatch_message(problems: list[str]) -> str:
    return (f"{'; '.join(problems)}: the BD-LoRA plugin and engines target {CONTAINER_IMAGE} "
            f"(TensorRT-LLM {TENSORRT_LLM_VERSION}, TensorRT {TENSORRT_VERSION}, CUDA {CUDA_VERSION}); "
            f"set {ALLOW_MISMATCH_ENV}=1 to try anyway")


def distribution_version(package: str) -> str | None:
    """The version of the installed distribution that provides the import package `package`, from its metadata:
    never imported (`import tensorrt_llm` needs a GPU, and the Docker build has none). None when not installed."""
    for name in (package, *metadata.packages_distributions().get(package, ())):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def installed_versions() -> tuple[str | None, str | None]:
    """(tensorrt_llm's version, tensorrt's version) as installed; None where a package is missing."""
    return distribution_version("tensorrt_llm"), distribution_version("tensorrt")


def require_pinned_stack(log=print) -> None:
    """Fail fast, in one line, when TensorRT-LLM or TensorRT is not the pinned version."""
    problems = version_mismatches(*installed_versions())
    if not problems:
        return
    if os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        log(f"warning: {mismatch_message(problems)}", flush=True)
        return
    raise BdLoraError(mismatch_message(problems))


def main(argv: list[str]) -> int:
    """`python -m trtllm_bdlora.versions image|tensorrt-llm|tensorrt|cuda|triton|check` (for shell scripts)."""
    pins = {"image": CONTAINER_IMAGE, "tensorrt-llm": TENSORRT_LLM_VERSION, "tensorrt": TENSORRT_VERSION,
            "cuda": CUDA_VERSION, "triton": TRITON_KERNEL_COMPILER}
    if len(argv) == 1 and argv[0] in pins:
        print(pins[argv[0]])
        return 0
    if argv == ["check"]:
        try:
            require_pinned_stack()
        except BdLoraError as err:
            print(f"version check: {err}", file=sys.stderr)
            return 2
        print(f"TensorRT-LLM {TENSORRT_LLM_VERSION} and TensorRT {TENSORRT_VERSION}: as pinned")
        return 0
    print(f"usage: python -m trtllm_bdlora.versions {'|'.join(pins)}|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
