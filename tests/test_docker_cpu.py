"""docker/Dockerfile.cpu built and run with a real container engine (podman, else docker): the image's recipe
(non-root, health check, volume, no CA left behind), `IMAGE --help` and a bad flag answered as the CLI answers,
readiness, tritonclient gRPC and HTTP answers for the base model and two example adapters (one from the image, one
from a mounted volume) equal to `trtllm-bdlora generate` on this machine, and SIGTERM stopping the container cleanly
within 30 s; the container and image are removed afterwards. Layers and pip downloads stay cached between runs
(nothing depends on it); TRTLLM_BDLORA_DOCKER_NO_CACHE=1 builds from nothing. Skipped only where no container engine
can be had; `.ci/run` sets TRTLLM_BDLORA_REQUIRE_CONTAINER=1 after installing podman, turning a skip into a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, run_cli
from tests.serving_helpers import free_ports

sys.path.insert(0, str(REPO / "examples"))
from tasks import examples, messages  # noqa: E402

DEPS_CACHE = "localhost/trtllm-bdlora-cpu-deps:cache"  # the image's deps stage, kept between runs (only a cache)
DEBIAN_BASE = "localhost/debian:bookworm"  # made locally where no registry can be reached (docker/README.md)
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n'
MAX_TOKENS = 24
ADAPTERS = {1: "upper", 2: "reverse"}  # registered by the image's ADAPTERS; 7 = json from the mounted volume


def _unavailable(why: str):
    if os.environ.get("TRTLLM_BDLORA_REQUIRE_CONTAINER"):
        pytest.fail(f"container engine required (TRTLLM_BDLORA_REQUIRE_CONTAINER) but {why}")
    pytest.skip(why)


def _entrypoint(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "docker" / "entrypoint.sh"), *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DRY_RUN": "1", **env})


def test_entrypoint_serve_flags_follow_the_environment_and_the_command_line():
    """One entrypoint for both images: the environment gives defaults, flags win; BACKEND picks the route."""
    cpu = {"BACKEND": "torch", "HOST": "0.0.0.0", "ADAPTERS": "1=/a/upper, 2=/a/reverse"}
    res = _entrypoint("--http-port", "9000", "--adapter", "7=/adapters/json", **cpu)
    assert res.returncode == 0 and res.stdout.splitlines() == [
        "+ trtllm-bdlora serve --backend torch --host 0.0.0.0 --adapter 1=/a/upper --adapter 2=/a/reverse "
        "--http-port 9000 --adapter 7=/adapters/json"]
    assert _entrypoint("serve", "--tp", "2", **cpu).stdout.endswith("--adapter 2=/a/reverse --tp 2\n")
    gpu = {"BACKEND": "trtllm", "MODEL": "/models/m", "TP": "2", "ENGINE_DIR": "/nonexistent"}
    steps = _entrypoint("--http-port", "9000", "--max-batch-size", "8", **gpu).stdout.splitlines()
    assert steps[0].startswith("+ mpirun --allow-run-as-root -n 2 trtllm-bdlora build --model /models/m --tp 2")
    assert "--max-batch-size 8" in steps[0] and "--max-batch-size 8" in steps[1]
    assert steps[2].endswith("--grpc-port 8001 --http-port 9000 --metrics-port 8002")
    bad = _entrypoint("--adapter", "1=/a", "--max-queue", "4", **gpu)
    assert bad.returncode != 0 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("entrypoint: --adapter, --max-queue: not used by --backend trtllm")


class Engine:
    """`podman` (with runc where installed: crun fails on some kernels' cgroup layouts) or `docker`."""

    def __init__(self, tmp: Path):
        self.env = dict(os.environ)
        podman, docker = shutil.which("podman"), shutil.which("docker")
        if podman:
            self.cmd = [podman] + (["--runtime", "runc"] if shutil.which("runc") else [])
            self.podman = True
            if "CONTAINERS_CONF" not in self.env:  # no systemd, no ulimit raising inside this machine's containers
                (tmp / "containers.conf").write_text(CONTAINERS_CONF)
                self.env["CONTAINERS_CONF"] = str(tmp / "containers.conf")
        elif docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
            self.cmd, self.podman = [docker], False
        else:
            _unavailable("no container engine (podman, or docker with a running daemon)")

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout, env=self.env, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args[:2])}: exit {res.returncode}: {res.stderr[-3000:]}")
        return res

    def run(self, *args: str, health: bool = False, **kw) -> subprocess.CompletedProcess:
        """`run` on the host's network. podman's periodic health checks need systemd: with `health`, they are left
        to `podman healthcheck run`; without, the container has none (and podman prints nothing about them)."""
        checks = (["--health-interval", "disable"] if health else ["--no-healthcheck"]) if self.podman else []
        return self("run", "--network", "host", *checks, *args, **kw)

    def has_image(self, name: str) -> bool:
        return self("image", "inspect", name, check=False).returncode == 0


def _base_image(engine: Engine, tmp: Path) -> str | None:
    """None: the Dockerfile's default (python slim, pulled). Without a registry: a debootstrapped Debian."""
    if os.environ.get("TRTLLM_BDLORA_DOCKER_BASE_IMAGE"):
        return os.environ["TRTLLM_BDLORA_DOCKER_BASE_IMAGE"]
    if engine.has_image(DEBIAN_BASE):
        return DEBIAN_BASE
    if engine.has_image("python:3.11-slim-bookworm") or engine("pull", "python:3.11-slim-bookworm", timeout=300,
                                                               check=False).returncode == 0:
        return None
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        _unavailable("no registry reachable and no debootstrap (as root) to make a Debian base image")
    root = tmp / "debroot"
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], check=True, capture_output=True,
                   timeout=600)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    engine("import", "-", DEBIAN_BASE, stdin=tar.stdout, timeout=300)
    tar.wait()
    return DEBIAN_BASE


def _local_torch_wheels() -> Path | None:
    """A directory holding this machine's CPU torch wheel (pip's find-links), used instead of PyTorch's index."""
    import torch

    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for d in map(Path, dirs):
        if list(d.glob(f"torch-{torch.__version__}-cp3*.whl")):
            return d
    return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def image(engine, reference_job, tmp_path_factory):
    import torch

    tag = f"localhost/trtllm-bdlora-cpu:test{os.getpid()}"
    args = ["build", "--network", "host", "-f", "docker/Dockerfile.cpu", "-t", tag]
    args += ["--format", "docker"] if engine.podman else []  # OCI images carry no HEALTHCHECK
    base = _base_image(engine, tmp_path_factory.mktemp("base"))
    args += ["--build-arg", f"BASE_IMAGE={base}"] if base else []
    if "+cpu" in torch.__version__:  # the same torch as the reference `generate` below
        args += ["--build-arg", f"TORCH_VERSION={torch.__version__}"]
    wheels = _local_torch_wheels()
    args += ["--build-context", f"wheels={wheels}", "--build-arg", "TORCH_INDEX_URL="] if wheels else []
    ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    args += ["--secret", f"id=ca,src={ca}"] if Path(ca).is_file() else []
    start = time.monotonic()
    no_cache = ["--no-cache"] if os.environ.get("TRTLLM_BDLORA_DOCKER_NO_CACHE") else []
    engine(*args, "--target", "deps", "-t", DEPS_CACHE, *no_cache, ".", cwd=REPO, timeout=420)  # kept for next time
    engine(*args, ".", cwd=REPO, timeout=300)
    print(f"image built in {time.monotonic() - start:.0f} s")
    try:
        yield tag
    finally:
        engine("rmi", "-f", tag, check=False)
        assert not engine.has_image(tag)


def test_image_recipe(engine, image):
    info = json.loads(engine("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "1000:1000"
    assert (info.get("Healthcheck") or config["Healthcheck"])["Test"] == ["CMD", "/usr/local/bin/trtllm-bdlora-healthcheck"]
    assert "/adapters" in config["Volumes"] and {"8000/tcp", "8001/tcp", "8002/tcp"} <= set(config["ExposedPorts"])
    assert not any(e.startswith("PIP_CERT=") for e in config["Env"])
    inside = engine.run("--rm", image, "bash", "-c",
                    "id -u; test ! -e /run/secrets/ca && echo no-ca; python3 -c 'import torch; print(torch.version.cuda)';"
                    " ls /opt/trtllm-bdlora/cache/smollm2-135m").stdout.split()
    assert inside[:3] == ["1000", "no-ca", "None"] and "model.safetensors" in inside
    size = int(engine("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"image size {size / 1e9:.2f} GB")


@pytest.mark.parametrize("argv", [["--help"], ["--no-such-flag"], ["serve", "--tp", "0"]])
def test_help_and_bad_flags_answer_as_the_cli(engine, image, argv):
    got = engine.run("--rm", "-e", "COLUMNS=100", image, *argv, check=False)
    flags = argv[1:] if argv[0] == "serve" else argv
    want = subprocess.run([sys.executable, "-m", "trtllm_bdlora", "serve", *flags], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100"), cwd=REPO)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    assert want.returncode == (0 if argv == ["--help"] else 2)


# ---------------------------------------------------------------------------------------------- a running container
def _requests() -> list[dict]:
    """Held-out prompts of two tasks, each on the base model, its own adapter (1, 2) and the volume's adapter (7)."""
    out = []
    for task_id, task in ADAPTERS.items():
        for prompt, _ in examples(task, "heldout", 1):
            for adapter in (None, task_id, 7):
                out.append({"id": f"{adapter}-{len(out)}", "adapter": adapter, "messages": messages(prompt),
                            "max_tokens": MAX_TOKENS})
    return out


@pytest.fixture(scope="module")
def reference_job():
    """`generate` here, with the same adapters (7 = examples/adapters/json, as mounted into the container); started
    before the image build (which depends on this fixture) so that the two overlap."""
    argv = ["generate", "--model", "smollm2-135m", "--requests", "-"]
    for task_id, task in {**ADAPTERS, 7: "json"}.items():
        argv += ["--adapter", f"{task_id}={REPO / 'examples' / 'adapters' / task}"]
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_cli, *argv, stdin="".join(json.dumps(r) + "\n" for r in _requests()))


@pytest.fixture(scope="module")
def reference(reference_job):
    res = reference_job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    return {out["id"]: out["text"] for out in map(json.loads, res.stdout.splitlines())}


class Container:
    """The image as users run it (default ADAPTERS), plus the examples mounted at /adapters and 7=/adapters/json."""

    def __init__(self, engine: Engine, image: str):
        self.engine, self.name = engine, f"trtllm-bdlora-test{os.getpid()}"
        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        volume = f"{REPO / 'examples' / 'adapters'}:/adapters:ro"
        self.started = time.monotonic()
        engine.run("-d", "--name", self.name, "-v", volume, image, "--http-port", str(self.http),
                   "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--openai-port", str(self.openai),
                   "--adapter", "7=/adapters/json",
                   health=True)

    def running(self) -> bool:
        return self.engine("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def wait_ready(self, timeout: float = 240) -> float:
        import requests

        while time.monotonic() - self.started < timeout:
            assert self.running(), self.logs()
            try:
                if requests.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.logs())

    def logs(self) -> str:
        res = self.engine("logs", self.name, check=False)
        return (res.stdout + res.stderr)[-4000:]

    def remove(self) -> None:
        self.engine("rm", "-f", self.name, check=False)
        assert self.engine("inspect", self.name, check=False).returncode != 0


@pytest.fixture(scope="module")
def container(engine, image):
    c = Container(engine, image)
    try:
        print(f"container ready in {c.wait_ready():.1f} s")
        yield c
    finally:
        c.remove()


def test_health_check_reports_healthy(engine, container):
    if engine.podman:
        assert engine("healthcheck", "run", container.name, check=False).returncode == 0, container.logs()
    else:
        deadline = time.monotonic() + 60
        while engine("inspect", "--format", "{{.State.Health.Status}}", container.name).stdout.strip() != "healthy":
            assert time.monotonic() < deadline, container.logs()
            time.sleep(2)


def _ensemble(client, module, text: str, adapter: int | None) -> str:
    values = {"text_input": np.array([[text]], dtype=object), "max_tokens": np.array([[MAX_TOKENS]], np.int32),
              "exclude_input_in_output": np.array([[True]], bool)}
    if adapter:
        values["lora_task_id"] = np.array([[adapter]], np.uint64)
    inputs = []
    for name, array in values.items():
        from tritonclient.utils import np_to_triton_dtype

        t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        inputs.append(t)
    return client.infer("ensemble", inputs).as_numpy("text_output").reshape(-1)[0].decode()


def test_grpc_and_http_answers_equal_generate(container, reference):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    from tests.serving_helpers import DecoupledAware  # the ensemble is decoupled: streams and generate, as in Triton

    clients = {grpcclient: DecoupledAware(grpcclient.InferenceServerClient(f"127.0.0.1:{container.grpc}")),
               httpclient: DecoupledAware(httpclient.InferenceServerClient(f"127.0.0.1:{container.http}"),
                                          f"127.0.0.1:{container.http}")}
    try:
        for req in _requests():
            text = tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
            for module, client in clients.items():
                assert _ensemble(client, module, text, req["adapter"]) == reference[req["id"]], (module.__name__, req)
    finally:
        for client in clients.values():
            client.close()
    by_adapter = {}
    for req in _requests():
        by_adapter.setdefault(req["adapter"], []).append(reference[req["id"]])
    assert len({tuple(texts) for texts in by_adapter.values()}) == len(by_adapter)  # every adapter changes the answers


def test_sigterm_stops_cleanly_within_30s(engine, container):
    start = time.monotonic()
    engine("kill", "--signal", "TERM", container.name)
    code = engine("wait", container.name, timeout=30).stdout.strip().splitlines()[-1]
    took = time.monotonic() - start
    logs = container.logs()
    assert code == "0" and took < 30, logs
    assert " INFO trtllm_bdlora.server stopped" in logs and "Traceback" not in logs, logs
    print(f"stopped in {took:.1f} s after SIGTERM")
