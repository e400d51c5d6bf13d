"""A real `tritonserver` outside NVIDIA's container: the one bundled in the PyPI wheel `nvidia-pytriton`
(Triton 2.51 with the Python backend, no TensorRT-LLM backend), run for a torch-build repository.

What it takes (see ../shared/reference/real-triton.md): a writable backend directory whose `python/` holds the
backend library and the stub built for this Python; the wheel's own shared libraries and this Python's
`libpython` on LD_LIBRARY_PATH; this Python's `bin` first on PATH (the stub takes the first `python3` there, so
the models import what this environment has); numpy < 2 (the 2.51 stub mishandles numpy 2 arrays)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from trtllm_bdlora.errors import BdLoraError

WHEEL = "nvidia-pytriton==0.7.0"


@dataclass(frozen=True)
class BundledServer:
    root: Path  # <site-packages>/pytriton/tritonserver
    libs: Path  # <site-packages>/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
            "triton_python_backend_stub"


def bundled_server() -> BundledServer | None:
    """The server of the `nvidia-pytriton` wheel installed in this Python, or None (found without importing
    pytriton, which needs packages the server does not)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    server = BundledServer(package / "tritonserver", package.parent / "nvidia_pytriton.libs")
    return server if server.binary.is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtllm-bdlora"


def check_environment(server: BundledServer) -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise BdLoraError(f"numpy {numpy.__version__} breaks the Python backend of the bundled tritonserver 2.51: "
                          "install numpy<2 in the environment that runs it")
    if not server.stub().is_file():
        raise BdLoraError(f"{server.stub()}: the bundled tritonserver has no Python backend stub for Python "
                          f"{sys.version_info.major}.{sys.version_info.minor}")


def backend_directory(server: BundledServer, where: Path | None = None) -> Path:
    """A backend directory for the bundled server: its Python backend with this Python's stub beside it."""
    target = (where or cache_dir() / f"tritonserver-backends-py{sys.version_info.major}{sys.version_info.minor}")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*sorted((server.root / "backends" / "python").glob("*.*")), server.stub()]:
        dst = python / src.name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}.tmp")
            shutil.copy2(src, tmp)
            tmp.replace(dst)  # atomic: a server started beside this one never sees half a file
    return target


def server_environment(server: BundledServer, env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(server.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def local_command(model_repo: str, grpc_port: int, http_port: int, metrics_port: int, host: str | None = None,
                  extra: list[str] = (), auto_complete: bool = False) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one `tritonserver` for a torch-build repository: the server on PATH (NVIDIA's
    container), else the one bundled with `nvidia-pytriton` in this Python. The repository is complete, so Triton's
    auto-completion is off, as upstream's launch_triton_server.py runs it."""
    cmd = [f"--model-repository={model_repo}", *([] if auto_complete else ["--disable-auto-complete-config"]),
           f"--grpc-port={grpc_port}", f"--http-port={http_port}", f"--metrics-port={metrics_port}"]
    if host:
        cmd += [f"--grpc-address={host}", f"--http-address={host}", f"--metrics-address={host}"]
    installed = shutil.which("tritonserver")
    if installed is not None:
        return [installed, *cmd, *extra], dict(os.environ)
    server = bundled_server()
    if server is None:
        raise BdLoraError(f"tritonserver not found: run inside the Triton container (see docker/), or pip install "
                          f"{WHEEL} 'numpy<2' into this Python environment")
    check_environment(server)
    return [str(server.binary), *cmd, f"--backend-directory={backend_directory(server)}", *extra], \
        server_environment(server)
