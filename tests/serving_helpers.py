"""Start `trtllm-bdlora serve` under mpirun for tests, and find its ranks; call its decoupled models as Triton allows."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tests.helpers import REPO
from tests.reliability_helpers import rank_processes


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are (one at a time, the OS may hand one out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Server:
    def __init__(self, model: Path, adapters: dict[int | str, Path], tp: int = 2, max_loras: int = 8, extra=(),
                 mpirun: bool = False, module: str = "trtllm_bdlora", env: dict[str, str] | None = None):
        """`mpirun`: start the ranks with the user's `mpirun -n tp` (stopped with SIGUSR1) instead of serve's own
        launcher. `module`: what runs the command line (`python -m MODULE serve ...`), e.g. a test entry point
        wrapping the CLI; `env`: variables added to the server's environment."""
        self.module = module
        self.port, self.http_port, self.metrics_port, self.openai_port = free_ports(4)
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.openai_url = f"http://127.0.0.1:{self.openai_port}/v1"
        args = ["serve", "--model", str(model), "--tp", str(tp), "--grpc-port", str(self.port),
                "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
                "--openai-port", str(self.openai_port), "--max-loras", str(max_loras), *extra]
        for task_id, directory in adapters.items():
            args += ["--adapter", f"{task_id}={directory}"]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{self.port}.log", "w+")
        cmd = [sys.executable, "-m", module, *args]
        self.stop_signal = signal.SIGTERM
        if mpirun:
            from trtllm_bdlora.distributed.launch import mpirun_command

            cmd = mpirun_command(tp, args)
            cmd[1:1] = ["-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH"]
            self.stop_signal = signal.SIGUSR1
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.time() + timeout
        client = grpcclient.InferenceServerClient(self.url)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if client.is_server_ready() and client.is_model_ready("ensemble"):
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.output()[-3000:])

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def output_matching(self, pattern: str, timeout: float = 10) -> str:
        """`output()` once it matches `pattern` (the launcher relays the ranks' lines a moment after they are
        written), or as it is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, log := self.output()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return log

    def rank_pids(self) -> dict[int, int]:
        """pid of each rank: processes whose command line names this server's port."""
        port = str(self.port).encode()
        module = self.module.encode()
        return rank_processes(lambda cmd, env: b"serve" in cmd and port in cmd and module in cmd)

    def stop(self) -> int:
        """SIGTERM (SIGUSR1 to mpirun), wait, and keep the log readable through `output()`."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def post_json(server, path: str, body: bytes | dict) -> tuple[int, dict | str]:
    """POST `body` (a dict as JSON, or raw bytes) to the server's OpenAI port: (status, JSON answer or its text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.openai_url.removesuffix("/v1") + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, payload = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read().decode()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload


class StreamedResult:
    """The responses of one request to a decoupled model, read like tritonclient's InferResult of a unary call: each
    output's responses in batch / sequence order, stacked on the batch axis, ragged ones padded (output ids with
    `pad_id`), as `serve` answered unary calls before it refused them on decoupled models as Triton does."""

    def __init__(self, responses: list[dict[str, np.ndarray]], pad_id: int = 0):
        self.responses = responses
        order = sorted(range(len(responses)), key=lambda i: (int(responses[i].get("batch_index", np.zeros(1)).reshape(-1)[0]),
                                                             int(responses[i].get("sequence_index", np.zeros(1)).reshape(-1)[0]), i))
        self.outputs: dict[str, np.ndarray] = {}
        for name in {n for r in responses for n in r}:
            arrays = [responses[i][name] for i in order if name in responses[i]]
            if arrays[0].ndim > 2:
                axis = 2 if name in ("output_ids", "output_log_probs", "generation_logits") else 1
                width = max(a.shape[axis] for a in arrays)
                arrays = [np.pad(a, [(0, width - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)],
                                 constant_values=pad_id if name == "output_ids" else 0) for a in arrays]
            self.outputs[name] = np.concatenate(arrays, axis=0)

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


def infer(client, model: str, inputs: list, request_id: str = "", outputs=None, client_timeout: float | None = None,
          pad_id: int = 0, timeout: float = 600) -> StreamedResult:
    """`client`: a tritonclient.grpc client, or the URL to open one for this call alone (a client holds one stream at
    a time, so concurrent calls need their own)."""
    if isinstance(client, str):
        import tritonclient.grpc as grpcclient

        own = grpcclient.InferenceServerClient(client)
        try:
            return infer(own, model, inputs, request_id, outputs, client_timeout, pad_id, timeout)
        finally:
            own.close()
    """What `client.infer(model, inputs)` was for a decoupled model: its request over ModelStreamInfer (Triton answers
    a unary call to a decoupled model UNIMPLEMENTED), every response collected; an error raises the stream's
    InferenceServerException, whose message is the server's (a stream carries no status code). `client_timeout`: the
    stream's deadline, as the unary call's."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        **({"stream_timeout": client_timeout} if client_timeout is not None else {}))
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, outputs=outputs,
                                  enable_empty_final_response=True)
        responses = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                responses.append({o.name: result.as_numpy(o.name) for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return StreamedResult(responses, pad_id)
    finally:
        client.stop_stream()


def _http_input_array(t) -> np.ndarray:
    """The numpy array a tritonclient.http InferInput was given (binary data or JSON data)."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    shape = t.shape()
    if getattr(t, "_raw_data", None) is not None:
        data = t._raw_data
        flat = deserialize_bytes_tensor(data) if t.datatype() == "BYTES" else np.frombuffer(
            data, dtype=triton_to_np_dtype(t.datatype()))
        return flat.reshape(shape)
    return np.array(t._data, dtype=object if t.datatype() == "BYTES" else triton_to_np_dtype(t.datatype())).reshape(shape)


def _json_value(array: np.ndarray):
    """One batch row of an input as a generate field: a scalar for one value, else the nested lists of its shape."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, list) else v.decode() if isinstance(v, bytes) else v

    return plain(array.reshape(-1)[0].item() if array.dtype != object else array.reshape(-1)[0]) \
        if array.size == 1 and array.ndim <= 1 else plain(array.tolist())


class DecoupledAware:
    """A tritonclient gRPC or HTTP client whose `infer` reaches decoupled models the way Triton allows: over
    ModelStreamInfer (gRPC; on a client of its own per call when `url` is given, so that threads may share this one)
    or the generate extension (HTTP, one request per batch row); other calls unchanged."""

    def __init__(self, client, http_url: str | None = None, url: str | None = None):
        self.client, self.http_url, self.url = client, http_url, url
        self._decoupled: dict[str, bool] = {}

    def __getattr__(self, name):
        return getattr(self.client, name)

    def decoupled(self, model: str) -> bool:
        if model not in self._decoupled:
            config = self.client.get_model_config(model)
            policy = config.get("model_transaction_policy", {}) if isinstance(config, dict) \
                else {"decoupled": config.config.model_transaction_policy.decoupled}
            self._decoupled[model] = bool(policy.get("decoupled", False))
        return self._decoupled[model]

    def infer(self, model: str, inputs: list, *args, **kwargs):
        if not self.decoupled(model):
            return self.client.infer(model, inputs, *args, **kwargs)
        if self.http_url is None:
            return infer(self.url or self.client, model, inputs, request_id=kwargs.get("request_id", ""),
                         outputs=kwargs.get("outputs"), client_timeout=kwargs.get("client_timeout"))
        return self._generate(model, inputs)

    def _generate(self, model: str, inputs: list) -> StreamedResult:
        import requests
        from tritonclient.utils import InferenceServerException, triton_to_np_dtype

        arrays = {t.name(): _http_input_array(t) for t in inputs}
        meta = {o["name"]: (o["shape"], o["datatype"]) for o in self.client.get_model_metadata(model)["outputs"]}
        rows = max(a.shape[0] for a in arrays.values())
        responses = []
        for row in range(rows):
            doc = {name: _json_value(a[row if a.shape[0] > 1 else 0]) for name, a in arrays.items()}
            r = requests.post(f"http://{self.http_url}/v2/models/{model}/generate", data=json.dumps(doc),  # NaN too
                              headers={"Content-Type": "application/json"}, timeout=600)
            answer = r.json()
            if r.status_code != 200 or "error" in answer:
                raise InferenceServerException(msg=answer.get("error", r.text), status=str(r.status_code))
            out = {}
            for name, value in answer.items():
                if name in meta:  # JSON holds the values: the type is the model's, the shape as the models send it
                    shape, datatype = meta[name]  # (texts flat, one per sequence; numbers [1, ..., 1, n])
                    values = value if isinstance(value, list) else [value]
                    if datatype == "BYTES":
                        out[name] = np.array([v.encode() for v in values], dtype=object)
                    else:
                        out[name] = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(
                            (1,) * (len(shape) - 1) + (-1,))
            responses.append(out)
        return StreamedResult(responses)


def warm_openai_client(client, model: str | None = None) -> None:
    """One completion and one chat completion, whole and streamed, of one token each, before a test sends many at
    once: the `openai` package builds its response models' pydantic schemas on first use, and threads that parse
    the first responses at the same moment can race in that build (PydanticUserError "BaseModel cannot be
    instantiated directly", raised in the client before any check runs)."""
    for stream in (False, True):
        replies = [client.completions.create(model=model, prompt="Hi", max_tokens=1, temperature=0, stream=stream),
                   client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=1, temperature=0, stream=stream)]
        if stream:
            for reply in replies:
                list(reply)

