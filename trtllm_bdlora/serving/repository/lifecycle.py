"""Which served models are loaded, as Triton's explicit model control keeps them (`--model-control-mode=explicit`
with every model loaded at start-up; checked against tritonserver 2.51 and model_repository_manager.cc):

- loading a loaded model succeeds and changes nothing; loading an ensemble loads its composing models too;
- unloading makes the model UNAVAILABLE ("unloaded"), and with it every ensemble that composes it, until it is
  loaded again; `unload_dependents` unloads an ensemble's composing models with it;
- unloading a model the repository does not hold succeeds; loading one fails (INTERNAL, "failed to poll").

Here a model is a view onto the one engine: unloading frees no memory and never stops the engine (the OpenAI API and
the other models keep serving); it only makes the KServe front ends answer for the model as Triton answers for an
unloaded one. Requests already running finish."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from trtllm_bdlora.errors import InternalError

UNLOADED = "unloaded"


class ModelStates:
    def __init__(self, served: Iterable[str], composing: dict[str, set[str]], missing: dict[str, str] | None = None):
        """`served`: the models this server can answer for; `composing`: an ensemble's composing models; `missing`:
        models of the repository it cannot serve, with the reason (loading them fails with it)."""
        self.served = frozenset(served)
        self.composing = {name: frozenset(composing.get(name, ())) for name in self.served}
        self.missing = dict(missing or {})
        self.loaded = set(self.served)
        self._lock = threading.Lock()

    def load(self, name: str) -> None:
        if name not in self.served:
            reason = self.missing.get(name, "failed to poll from model repository")
            raise InternalError(f"failed to load '{name}', {reason}")
        with self._lock:
            self.loaded |= {name} | self.composing[name]

    def unload(self, name: str, dependents: bool = False) -> None:
        if name not in self.served:
            return
        with self._lock:
            self.loaded -= {name} | (self.composing[name] if dependents else frozenset())

    def available(self, name: str) -> bool:
        """Loaded, with every composing model loaded."""
        with self._lock:
            return name in self.loaded and self.composing[name] <= self.loaded

    def state(self, name: str) -> tuple[str, str]:
        """(state, reason) as the repository index shows them."""
        if name not in self.served:
            return "UNAVAILABLE", self.missing.get(name, "")
        return ("READY", "") if self.available(name) else ("UNAVAILABLE", UNLOADED)
