"""One error type per user-facing failure; every message is a single line naming the problem."""


class BdLoraError(Exception):
    """Base class: the CLI prints `str(err)` on one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class AdapterError(BdLoraError):
    """A PEFT adapter directory that cannot be served."""


class ModelError(BdLoraError):
    """A base model that cannot be loaded or sharded."""


class RequestError(BdLoraError):
    """A single request that cannot be served; other requests are unaffected."""


class InputError(RequestError):
    """A bad value of one named input; an ensemble reports it under the name its client used."""

    def __init__(self, name: str, reason: str):
        self.input, self.reason = name, reason
        super().__init__(f"{name} {reason}")


class ModelNotFound(RequestError):
    """A request for a model (Triton model name or OpenAI model) this server does not serve."""


class AdapterNotCachedError(RequestError):
    """A lora_task_id sent without weights that the host LoRA cache does not hold (never sent, or evicted).
    The message is TensorRT-LLM's (PeftCacheManager::addRequestPeft, PeftTaskNotCachedException), so clients
    that resend weights on it work against both servers."""

    def __init__(self, task_id: int):
        super().__init__(f"LoRA task {task_id} not found in cache. Please send LoRA weights with request")
        self.task_id = task_id


class AdapterCacheFullError(RequestError):
    """No room in the host LoRA cache: everything it holds is pinned or in use by requests that have not finished.
    Starts with TensorRT-LLM's wording (PeftCacheManager: "PEFT Cache is full. Could not store taskId=...")."""


class ServerBusyError(RequestError):
    """The request queue is full: retry later (gRPC RESOURCE_EXHAUSTED, HTTP 429). The message starts with Triton
    core's queue-full wording ("Exceeds maximum queue size", scheduler_utils.cc `RequestQueue::Enqueue`)."""


class ServerUnavailableError(RequestError):
    """The server is shutting down or failed: go elsewhere (gRPC UNAVAILABLE, HTTP 503)."""
