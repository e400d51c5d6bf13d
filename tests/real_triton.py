"""A real `tritonserver` (Triton 2.51 from the PyPI wheel nvidia-pytriton, installed by `.ci/install-triton`) serving a
repository that `fill-model-repo` wrote, for tests; and the decoupled calls clients make to it.

Tests that use it FAIL, never skip, when the server cannot be had: CI installs it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from tests.helpers import REPO, run_cli
from tests.serving_helpers import free_port

VENV = Path(os.environ.get("TRTLLM_BDLORA_TRITON_VENV")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtllm-bdlora" / "triton-venv")


def triton_python() -> Path:
    """The Python of the virtualenv `.ci/install-triton` made, checked to import this checkout's package."""
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"no real tritonserver: {VENV} does not exist; run `bash .ci/install-triton` (CI does)")
    found = subprocess.run([str(python), "-c", "import trtllm_bdlora; print(trtllm_bdlora.__file__)"], cwd="/",
                           capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(REPO.resolve()):
        pytest.fail(f"{VENV} does not import this checkout's trtllm_bdlora ({found.stdout.strip() or found.stderr[-300:]}); "
                    "rerun `bash .ci/install-triton`")
    return python


def fill_repository(engine_dir: Path, output: Path, *settings: str) -> Path:
    args = ["fill-model-repo", "--engine-dir", str(engine_dir), "--tokenizer-dir", str(engine_dir), "--output", str(output)]
    for setting in settings:
        args += ["--set", setting]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    return output


class Triton:
    """`trtllm-bdlora launch-triton` (auto-completion off, as upstream launches it) or, with `auto_complete`, the
    same server with Triton's auto-completion on, bound to loopback on free ports."""

    def __init__(self, model_repo: Path, log_dir: Path, auto_complete: bool = False, more_repos: tuple[Path, ...] = ()):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url, self.http_url = f"127.0.0.1:{self.grpc_port}", f"127.0.0.1:{self.http_port}"
        python = triton_python()
        if auto_complete:
            code = ("import os, sys; from trtllm_bdlora.trtllm.local_triton import local_command; "
                    "cmd, env = local_command(*sys.argv[1:5], host='127.0.0.1', extra=sys.argv[5:], auto_complete=True); "
                    "os.execvpe(cmd[0], cmd, env)")
            cmd = [str(python), "-c", code, str(model_repo), str(self.grpc_port), str(self.http_port), str(self.metrics_port),
                   *(f"--model-repository={r}" for r in more_repos)]
        else:
            cmd = [str(python), "-m", "trtllm_bdlora", "launch-triton", "--model-repo", str(model_repo), "--host",
                   "127.0.0.1", "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                   "--metrics-port", str(self.metrics_port), *(f"--tritonserver-arg=--model-repository={r}" for r in more_repos)]
        self.log_path = log_dir / f"tritonserver-{self.grpc_port}.log"
        self.log = open(self.log_path, "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)  # the stub ignores it; the server must work without it
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd="/",
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> Triton:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited {self.proc.returncode}: {self.output()[-4000:]}")
            try:
                if requests.get(f"http://{self.http_url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(self.output()[-4000:])

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------------------- calls
def tensor(name: str, array: np.ndarray, module=grpcclient):
    t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


class Outcome:
    """All responses of one decoupled request: outputs (dicts of arrays) and whether each was flagged final, or the
    error that ended it."""

    def __init__(self):
        self.responses: list[tuple[dict[str, np.ndarray], bool]] = []
        self.parameters: list[dict] = []  # each response's parameters but triton_final_response
        self.ids: list[str] = []  # each response's id
        self.error: str | None = None

    @property
    def outputs(self) -> list[dict[str, np.ndarray]]:
        return [out for out, _ in self.responses if out]

    def joined(self, name: str) -> list:
        """One output's values over every response, in order (e.g. the tokens of a streamed sequence)."""
        return [v for out in self.outputs if name in out for v in out[name].reshape(-1).tolist()]


def stream(url: str, model: str, values: dict[str, np.ndarray], request_id: str = "", timeout: float = 300,
           cancel_after: int | None = None, responding: threading.Event | None = None) -> Outcome:
    """One request over ModelStreamInfer (empty final responses enabled), as NVIDIA's clients send them;
    `cancel_after`: cancel the stream after that many responses; `responding`: set at the first response."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    outcome = Outcome()
    try:
        client.async_stream_infer(model, [tensor(k, v) for k, v in values.items()], request_id=request_id,
                                  enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                outcome.error = str(error.message() if hasattr(error, "message") else error)
                return outcome
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            outcome.responses.append(({o.name: result.as_numpy(o.name) for o in response.outputs}, final))
            outcome.parameters.append({k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()
                                       if k != "triton_final_response"})
            outcome.ids.append(response.id)
            if responding is not None:
                responding.set()
            if final:
                return outcome
            if cancel_after is not None and len(outcome.responses) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return outcome
    finally:
        client.stop_stream()
        client.close()


def generate(http_url: str, model: str, doc: dict, streaming: bool = False) -> tuple[int, list[dict]]:
    """The HTTP generate extension: (status, the JSON documents answered: one, or one per Server-Sent Event)."""
    r = requests.post(f"http://{http_url}/v2/models/{model}/generate{'_stream' if streaming else ''}", json=doc,
                      timeout=300)
    if not streaming:
        return r.status_code, [r.json()]
    import json

    return r.status_code, [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]



ERROR_PROBE_CONFIG = """name: "error_probe"
backend: "python"
max_batch_size: 0
input [{ name: "KIND" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "Y" data_type: TYPE_INT32 dims: [ 1 ] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""
ERROR_PROBE_MODEL = """import triton_python_backend_utils as pb_utils

from trtllm_bdlora.errors import BdLoraError, ErrorKind
from trtllm_bdlora.trtllm.triton_python import error_response

KINDS = list(ErrorKind)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            kind = KINDS[int(pb_utils.get_input_tensor_by_name(request, "KIND").as_numpy().reshape(-1)[0])]
            error = BdLoraError(f"an error of kind {kind.value}")
            error.kind = kind
            responses.append(error_response(pb_utils, error))
        return responses
"""


def error_probe_repository(root: Path) -> Path:
    """A repository with one Python model that answers every request with the error of the kind it names (an index
    into errors.ErrorKind), as the production models answer errors (trtllm/triton_python.error_response)."""
    model = root / "error_probe"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(ERROR_PROBE_CONFIG)
    (model / "1" / "model.py").write_text(ERROR_PROBE_MODEL)
    return root
