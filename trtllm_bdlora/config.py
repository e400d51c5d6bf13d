"""What each command runs with, as frozen values: built once (by the CLI in `cli/`, or directly in Python) and
passed down. Nothing below `cli/` reads command-line flags or, on a hot path, the environment.

Fields are named as their flags (`max_lora_rank` is `--max-lora-rank`), and the checks here name the flag: a value
that cannot work fails at construction, as one line, before any rank starts. Environment knobs are read once, at
start-up, into a field (`lora_kernel_from_env`).

Adding a flag: add the field (with its default) to the dataclass of the part it configures, and one `Flags.add`
line beside that dataclass's other flags in `cli/` (`tests/test_cli.py` fails while either side is missing).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from trtllm_bdlora.errors import BdLoraError

EMBEDDED_MODEL = "smollm2-135m"  # llama/loader.py EMBEDDED
SCHEMES = ("bdlora", "slora", "replicated")
BACKENDS = ("torch", "trtllm")
DTYPES = ("float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")
LORA_KERNELS = ("auto", "triton", "torch", "reference")  # auto: the Triton kernel on CUDA, the batched torch op elsewhere
LORA_KERNEL_ENV = "TRTLLM_BDLORA_KERNEL"
API_KEY_ENV = "API_KEY"  # serve's API keys when no --api-key is given (comma-separated)
DEFAULT_PLUGIN_LIB = "plugins/build/libtrtllm_bdlora_plugin.so"  # where plugins/CMakeLists.txt builds it
CONTAINER_PLUGIN_LIB = "/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so"  # where docker/Dockerfile installs it
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# --rank-timeout: a rank whose heartbeat stops for this long is lost (distributed/liveness.py, docs/reliability.md)
DEFAULT_RANK_TIMEOUT_S = 10.0


def _at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:
        raise BdLoraError(f"{flag} {value}: must be >= {low}")


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BdLoraError(f"{flag} {value}: choose from {', '.join(choices)}")


def _seconds_or_off(flag: str, value: float) -> None:
    if not 0 <= value < math.inf:
        raise BdLoraError(f"{flag} {value}: must be a finite number of seconds >= 0 (0: off)")


def _port(flag: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise BdLoraError(f"{flag} {value}: not a TCP port (1-65535)")


def _key_values(items: tuple[str, ...]) -> None:
    for item in items:
        if "=" not in item:
            raise BdLoraError(f"--set takes KEY=VALUE, got {item!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """`--adapter [NAME:]ID=DIR`: the PEFT adapter in `directory` registered as lora_task_id `task_id`; the OpenAI
    API calls it `name` (else the task id)."""

    task_id: int
    directory: str
    name: str | None = None

    def __post_init__(self) -> None:
        if self.task_id < 1:
            raise BdLoraError(f"--adapter {self}: the task id must be a positive integer")

    @property
    def openai_name(self) -> str:
        return self.name or str(self.task_id)

    def __str__(self) -> str:
        return f"{self.name + ':' if self.name else ''}{self.task_id}={self.directory}"


def parse_adapter_spec(text: str) -> AdapterSpec:
    """`ID=DIR` or `NAME:ID=DIR`, ID a positive integer task id (as TensorRT-LLM's lora_task_id)."""
    head, sep, directory = text.partition("=")
    name, colon, task_id = head.rpartition(":")
    if not sep or not directory or not task_id.isdigit() or int(task_id) < 1 or (colon and not name):
        raise BdLoraError(f"expected ID=DIR or NAME:ID=DIR with ID a positive integer, got {text!r}")
    if name.isdigit() and int(name) != int(task_id):
        raise BdLoraError(f"adapter NAME must not be a number (numbers name task ids), got {text!r}")
    if name and (not name.isprintable() or name != name.strip() or len(name) > 256):
        raise BdLoraError(f"adapter NAME must be printable text without surrounding spaces, got {name!r}")
    return AdapterSpec(int(task_id), directory, name or None)


def lora_kernel_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """TRTLLM_BDLORA_KERNEL=auto|triton|torch|reference: the LoRA op every rank runs (triton on CPU needs
    TRITON_INTERPRET=1; reference is the torch reference, for comparisons)."""
    choice = environ.get(LORA_KERNEL_ENV, "auto") or "auto"
    if choice not in LORA_KERNELS:
        raise BdLoraError(f"{LORA_KERNEL_ENV}={choice}: choose from {', '.join(LORA_KERNELS)}")
    return choice


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "kv"  # kv: `TIME LEVEL LOGGER message key=value ...`; json: one object per line
    progress_bars: bool = False  # library progress bars (model downloads, GGUF dequantisation): on a terminal only

    def __post_init__(self) -> None:
        _one_of("--log-level", self.level, LOG_LEVELS)
        _one_of("--log-format", self.format, LOG_FORMATS)


@dataclass(frozen=True)
class EngineConfig:
    """One engine: the base model, its sharding over `tp` ranks, the adapters and their caches, the scheduler."""

    model: str = EMBEDDED_MODEL
    tp: int = 1
    scheme: str = "bdlora"
    backend: str = "torch"
    dtype: str = "float32"
    device: str | None = None  # None: cuda if available, else cpu
    adapters: tuple[AdapterSpec, ...] = ()
    max_loras: int = 8
    max_batch_size: int = 16
    max_lora_rank: int | None = None  # None: the torch build's, else adapter_pool.DEFAULT_MAX_LORA_RANK
    lora_cache_host_bytes: int = 1 << 30
    pin_adapters: bool = True
    allow_request_adapters: bool = True
    comm_interface: str | None = None  # None: loopback (one machine)
    max_num_tokens: int | None = None  # None: scheduler.DEFAULT_MAX_NUM_TOKENS for the device
    threads_per_rank: int | None = None  # None: the cores this process may use, divided by tp
    kv_cache_bytes: int | None = None  # None: kv_cache.DEFAULT_KV_CACHE_BYTES
    enable_prefix_caching: bool = True  # vLLM's name: a prompt prefix another sequence holds is copied
    lora_kernel: str = "auto"  # environment: TRTLLM_BDLORA_KERNEL
    rank_timeout: float = DEFAULT_RANK_TIMEOUT_S  # 0: no heartbeats (only the collective timeout remains)

    def __post_init__(self) -> None:
        _at_least("--tp", self.tp, 1)
        _seconds_or_off("--rank-timeout", self.rank_timeout)
        _one_of("--scheme", self.scheme, SCHEMES)
        _one_of("--backend", self.backend, BACKENDS)
        _one_of("--dtype", self.dtype, DTYPES)
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise BdLoraError(f"--device {self.device}: expected cpu, cuda or cuda:N")
        for flag, value in (("--max-loras", self.max_loras), ("--max-batch-size", self.max_batch_size),
                            ("--max-lora-rank", self.max_lora_rank), ("--lora-cache-host-bytes", self.lora_cache_host_bytes),
                            ("--max-num-tokens", self.max_num_tokens), ("--threads-per-rank", self.threads_per_rank),
                            ("--kv-cache-bytes", self.kv_cache_bytes)):
            _at_least(flag, value, 1)
        _one_of(LORA_KERNEL_ENV, self.lora_kernel, LORA_KERNELS)
        seen: dict[int, AdapterSpec] = {}
        for spec in self.adapters:  # never "the last one wins"
            if spec.task_id in seen:
                raise BdLoraError(f"--adapter: task id {spec.task_id} given twice ({seen[spec.task_id].directory} and "
                                  f"{spec.directory})")
            seen[spec.task_id] = spec


@dataclass(frozen=True)
class ServerConfig:
    """`serve`'s endpoints (all bound to `host`), admission limits, shutdown and the OpenAI API's settings."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    openai_port: int = 9000
    max_queue: int = 256
    max_streams: int = 128
    shutdown_timeout: float = 60.0
    served_model_name: str | None = None  # None: the engine's --model
    allow_adapter_loading: bool = False
    adapter_root: str | None = None
    allow_startup_adapter_unload: bool = False
    settings: tuple[str, ...] = ()  # --set KEY=VALUE: answer as the repository fill-model-repo writes with them

    def __post_init__(self) -> None:
        if not self.host:
            raise BdLoraError("--host: empty")
        _key_values(self.settings)
        for flag, port in self.ports.items():  # that they differ is `serve`'s check: Triton's route uses three
            _port(flag, port)
        _at_least("--max-queue", self.max_queue, 1)
        _at_least("--max-streams", self.max_streams, 1)
        if not math.isfinite(self.shutdown_timeout) or self.shutdown_timeout < 0:
            raise BdLoraError(f"--shutdown-timeout {self.shutdown_timeout}: must be a number of seconds >= 0")
        if self.adapter_root is not None and not self.allow_adapter_loading:
            raise BdLoraError("--adapter-root is only used with --allow-adapter-loading: add that flag, or drop "
                              "--adapter-root")
        if self.allow_startup_adapter_unload and not self.allow_adapter_loading:
            raise BdLoraError("--allow-startup-adapter-unload is only used with --allow-adapter-loading: add that flag, "
                              "or drop --allow-startup-adapter-unload")
        if self.allow_adapter_loading and self.adapter_root is None:
            raise BdLoraError("--allow-adapter-loading needs --adapter-root DIR (the only tree adapters load from)")

    @property
    def ports(self) -> dict[str, int]:
        """Every port `serve` listens on, by flag."""
        return {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port,
                "--openai-port": self.openai_port}


@dataclass(frozen=True)
class EdgeSettings:
    """Every listener's connection limits, timeouts, body limit, API keys and CORS origins (serving/edge/; the
    defaults and how they compare with Triton's and vLLM's: serving/edge/settings.py, docs/reliability.md)."""

    max_connections: int | None = None  # per listener; None: DEFAULT_MAX_CONNECTIONS, lowered to fit `ulimit -n`
    header_timeout: float = 10.0  # a request head (gRPC: the HTTP/2 handshake) must arrive within this
    body_timeout: float = 60.0  # a request body must arrive within this of its head
    keep_alive_timeout: float = 5.0  # an idle HTTP/1.1 connection between requests
    max_keep_alive_requests: int = 1000  # requests on one HTTP/1.1 connection, then it is closed
    grpc_max_connection_idle: float = 300.0  # a gRPC connection without calls for this long is closed (GOAWAY); 0: never
    grpc_max_connection_age: float = 0.0  # a gRPC connection is closed after this long (GOAWAY); 0: never
    max_body_bytes: int = 64 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for flag, value in (("--max-connections", self.max_connections), ("--max-keep-alive-requests",
                            self.max_keep_alive_requests), ("--max-body-bytes", self.max_body_bytes)):
            if value is not None and value < 1:
                raise BdLoraError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--request-header-timeout", self.header_timeout), ("--request-body-timeout",
                            self.body_timeout), ("--keep-alive-timeout", self.keep_alive_timeout)):
            if not 0 < value < math.inf:
                raise BdLoraError(f"{flag} must be > 0 seconds, got {value}")
        for flag, value in (("--grpc-max-connection-idle", self.grpc_max_connection_idle),
                            ("--grpc-max-connection-age", self.grpc_max_connection_age)):
            if not 0 <= value < math.inf:
                raise BdLoraError(f"{flag} must be >= 0 seconds (0: never), got {value}")
        for key in self.api_keys:
            if not key or any(c.isspace() for c in key) or not key.isprintable():
                raise BdLoraError("--api-key / API_KEY: a key must be printable, without spaces, and not empty")
        for origin in self.allowed_origins:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise BdLoraError(f"--allowed-origins: {origin!r} is not an origin (scheme://host[:port], or *)")


def split_keys(values: list[str] | tuple[str, ...] | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """--api-key values, else the API_KEY variable; either may hold several keys separated by commas."""
    texts = list(values or []) or ([environ[API_KEY_ENV]] if environ.get(API_KEY_ENV) else [])
    return tuple(k.strip() for text in texts for k in text.split(",") if k.strip())


def split_origins(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """--allowed-origins values: each a JSON list (vLLM's form) or origins separated by commas."""
    out: list[str] = []
    for text in values or []:
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise BdLoraError(f"--allowed-origins {text!r}: not a JSON list") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise BdLoraError(f"--allowed-origins {text!r}: a JSON list must hold strings")
            out += items
        else:
            out += [o.strip() for o in text.split(",") if o.strip()]
    return tuple(out)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass(frozen=True)
class GenerateConfig:
    requests: str  # a JSON-lines file, or - for stdin
    stats: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(level="warning"))


@dataclass(frozen=True)
class BenchConfig:
    """`bench`: the engine settings it honours, and the workload (random BD adapters on every scheme)."""

    model: str = EngineConfig.model
    tp: int = EngineConfig.tp
    dtype: str = EngineConfig.dtype
    device: str | None = EngineConfig.device
    max_loras: int = EngineConfig.max_loras
    max_lora_rank: int | None = EngineConfig.max_lora_rank
    comm_interface: str | None = EngineConfig.comm_interface
    threads_per_rank: int | None = EngineConfig.threads_per_rank
    kv_cache_bytes: int | None = EngineConfig.kv_cache_bytes
    lora_kernel: str = EngineConfig.lora_kernel
    rank_timeout: float = EngineConfig.rank_timeout
    batch: int = 8
    steps: int = 16
    prompt_len: int = 32
    num_adapters: int = 4
    rank: int = 16
    json: str | None = None

    def __post_init__(self) -> None:  # the engine's own checks for the fields it shares
        EngineConfig(model=self.model, tp=self.tp, dtype=self.dtype, device=self.device, max_loras=self.max_loras,
                     max_lora_rank=self.max_lora_rank, comm_interface=self.comm_interface,
                     threads_per_rank=self.threads_per_rank, kv_cache_bytes=self.kv_cache_bytes,
                     lora_kernel=self.lora_kernel, rank_timeout=self.rank_timeout)
        for flag, value in (("--batch", self.batch), ("--steps", self.steps), ("--prompt-len", self.prompt_len),
                            ("--num-adapters", self.num_adapters), ("--rank", self.rank)):
            _at_least(flag, value, 1)


@dataclass(frozen=True)
class CpuValidateConfig:
    """`cpu-validate`: the step model against `bench` on CPU ranks over gloo (perf/cpu_validate.py)."""

    out: str = "validation.json"
    model: str | None = None  # None: a random 8-head Llama made for the run
    tp: tuple[int, ...] = (2, 4, 8)
    batch: int = 8
    num_adapters: int = 4
    rank: int = 16
    steps: int = 10
    prompt_len: int = 32
    max_loras: int = 8
    max_lora_rank: int | None = None
    dtype: str = "float32"
    reps: int = 30
    profile_only: bool = False

    def __post_init__(self) -> None:
        for tp in self.tp:
            _at_least("--tp", tp, 1)
        _one_of("--dtype", self.dtype, DTYPES)
        for flag, value in (("--batch", self.batch), ("--num-adapters", self.num_adapters), ("--rank", self.rank),
                            ("--steps", self.steps), ("--prompt-len", self.prompt_len), ("--max-loras", self.max_loras),
                            ("--max-lora-rank", self.max_lora_rank), ("--reps", self.reps)):
            _at_least(flag, value, 1)


@dataclass(frozen=True)
class ProjectConfig:
    """`project`: the workload and system of a projected decode step (perf/project.py)."""

    model: str = "llama-3.1-8b"
    tp: int = 8
    gpu: str = "a100-80g-sxm"
    batch: int = 32
    rank: int = 16
    bd_rank: int | None = None  # None: --rank
    context: int = 1024
    adapters: int | None = None  # None: min(batch, 8)
    kernel_times: str | None = None
    paper: bool = False
    json: str | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--tp", self.tp), ("--batch", self.batch), ("--rank", self.rank),
                            ("--bd-rank", self.bd_rank), ("--context", self.context), ("--adapters", self.adapters)):
            _at_least(flag, value, 1)


@dataclass(frozen=True)
class InspectConfig:
    adapter_dir: str
    tp: int | None = None
    model: str | None = None
    json: bool = False

    def __post_init__(self) -> None:
        _at_least("--tp", self.tp, 1)


@dataclass(frozen=True)
class ClientConfig:
    text: str
    url: str = "127.0.0.1:8001"
    max_tokens: int = 64
    adapter: int | None = None  # lora_task_id
    adapter_dir: str | None = None
    tp: int = 1
    temperature: float = 0.0
    stream: bool = False
    api_key: str | None = None  # environment: the first key of API_KEY

    def __post_init__(self) -> None:
        _at_least("--max-tokens", self.max_tokens, 1)
        _at_least("--adapter", self.adapter, 1)
        _at_least("--tp", self.tp, 1)
        _at_least("--temperature", self.temperature, 0.0)


@dataclass(frozen=True)
class BuildConfig:
    """`build`: one TensorRT-LLM engine per rank (trtllm), or per-rank torch shards (torch)."""

    model: str
    tp: int
    output: str
    backend: str = "trtllm"
    dtype: str = "float16"
    max_lora_rank: int = 64
    adapter_dirs: tuple[str, ...] = ()
    max_batch_size: int = 64
    max_input_len: int = 2048
    max_seq_len: int | None = None  # None: twice --max-input-len
    plugin_lib: str = DEFAULT_PLUGIN_LIB
    overwrite: bool = False

    def __post_init__(self) -> None:
        _at_least("--tp", self.tp, 1)
        _one_of("--backend", self.backend, BACKENDS)
        _one_of("--dtype", self.dtype, DTYPES)
        for flag, value in (("--max-lora-rank", self.max_lora_rank), ("--max-batch-size", self.max_batch_size),
                            ("--max-input-len", self.max_input_len)):
            _at_least(flag, value, 1)
        if self.max_seq_len is not None and self.max_seq_len <= self.max_input_len:
            raise BdLoraError(f"--max-seq-len {self.max_seq_len} must exceed --max-input-len {self.max_input_len}")


@dataclass(frozen=True)
class ConvertConfig:
    """`convert-adapter`: a PEFT adapter in TensorRT-LLM's request format for one engine."""

    adapter_dir: str
    output: str
    dtype: str | None = None  # None: the engine directory's, else float16
    tp: int | None = None  # None: the engine directory's, else 1
    max_lora_rank: int | None = None
    engine_dir: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            _one_of("--dtype", self.dtype, DTYPES)
        _at_least("--tp", self.tp, 1)
        _at_least("--max-lora-rank", self.max_lora_rank, 1)


@dataclass(frozen=True)
class FillRepoConfig:
    """`fill-model-repo`: Triton's inflight_batcher_llm repository for built engines."""

    engine_dir: str
    tokenizer_dir: str
    output: str
    max_batch_size: int = 64
    max_lora_rank: int | None = None  # None: the engine directory's, else 64
    tp: int | None = None  # None: the engine directory's
    settings: tuple[str, ...] = ()  # KEY=VALUE for any other ${placeholder}

    def __post_init__(self) -> None:
        _at_least("--max-batch-size", self.max_batch_size, 1)
        _at_least("--max-lora-rank", self.max_lora_rank, 1)
        _at_least("--tp", self.tp, 1)
        _key_values(self.settings)


@dataclass(frozen=True)
class LaunchTritonConfig:
    """`launch-triton`: one tritonserver per rank under mpirun for TensorRT engines, or one tritonserver for the
    repository of a torch build (its Python-backend tensorrt_llm starts the ranks itself)."""

    model_repo: str
    world_size: int | None = None  # None: the repository's (a torch build's needs none)
    plugin_lib: str = CONTAINER_PLUGIN_LIB
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str | None = None  # torch build: the address every endpoint binds to; None: Triton's
    tritonserver_args: tuple[str, ...] = ()  # torch build: passed on to tritonserver

    def __post_init__(self) -> None:
        _at_least("--world-size", self.world_size, 1)
        for flag, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port),
                           ("--metrics-port", self.metrics_port)):
            _port(flag, port)


@dataclass(frozen=True)
class AotConfig:
    """`aot`: the BD-LoRA Triton kernel compiled ahead of time for the plugin (kernels/aot.py)."""

    output: str
    arch: str = "sm_80,sm_90"
    dtype: str = "float16,bfloat16,float32"
    block_r: str = "16,32,64,128"
    require_pinned_triton: bool = False


@dataclass(frozen=True)
class SmokeConfig:
    """`docker/smoke.sh` (trtllm/smoke.py): the first end-to-end check inside the container on a GPU node."""

    workdir: str | None = None
    plugin_lib: str = CONTAINER_PLUGIN_LIB
    grpc_port: int = 8101

    def __post_init__(self) -> None:
        _port("--grpc-port", self.grpc_port)
