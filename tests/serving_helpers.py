"""Start `trtllm-bdlora serve` under mpirun for tests, and find its ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import REPO
from tests.reliability_helpers import rank_processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, adapters: dict[int | str, Path], tp: int = 2, max_loras: int = 8, extra=(),
                 mpirun: bool = False, module: str = "trtllm_bdlora", env: dict[str, str] | None = None):
        """`mpirun`: start the ranks with the user's `mpirun -n tp` (stopped with SIGUSR1) instead of serve's own
        launcher. `module`: what runs the command line (`python -m MODULE serve ...`), e.g. a test entry point
        wrapping the CLI; `env`: variables added to the server's environment."""
        self.module = module
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.openai_port = free_port()
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
