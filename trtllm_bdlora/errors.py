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
