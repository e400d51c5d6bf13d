"""OpenAI model names of the base model and the adapters, and where run-time adapter loading may read from.

Every registered adapter answers to its lora_task_id written as a number ("3"), whoever registered it (`--adapter`,
gRPC `lora_task_id` + weights, `/v1/load_lora_adapter`); an adapter registered with a name (`--adapter NAME:ID=DIR`,
`lora_name`) answers to that name too, and `/v1/models` lists it by that name.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from pathlib import Path

from trtllm_bdlora.adapters.files import AdapterRoot
from trtllm_bdlora.config import AdapterSpec
from trtllm_bdlora.errors import BdLoraError, InputError, NotFoundError

MAX_NAME_CHARS = 256


def check_name(field: str, name: str) -> str:
    """A model or adapter name clients will see and send: printable text (no NUL, control character or lone
    surrogate), no surrounding spaces, at most MAX_NAME_CHARS; checked before anything is registered under it."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise InputError(field, f"must be a name of 1 to {MAX_NAME_CHARS} characters")
    if not name.isprintable() or name != name.strip():
        raise InputError(field, "must be printable text without control characters, lone surrogates or surrounding "
                                "spaces")
    return name


def public_model_name(model: str) -> str:
    """The base model as clients see it (its `/v1/models` id and root, the Triton config's paths): the name of its
    directory, never the host path."""
    return (Path(model).name or model) if "/" in model else model


def _canonical_id(name: str) -> int | None:
    """The task id a numeric name stands for; None for other names."""
    return int(name) if name.isdigit() and name == str(int(name)) and int(name) > 0 else None


class AdapterNames:
    def __init__(self, base: str, base_root: str, adapters: Iterable[AdapterSpec] = (), aliases: Iterable[str] = ()):
        """`aliases`: other names the base model answers to (the --model path, listed by its directory's name)."""
        self.base, self.base_root = base, base_root
        self.aliases = frozenset(aliases) - {base}
        self.ids: dict[str, int] = {}  # names given at registration
        self.roots: dict[int, str] = {}  # adapter directories, where known
        self.created = int(time.time())
        for spec in adapters:
            name = spec.openai_name
            if name == base:
                raise BdLoraError(f"--adapter {spec}: adapter name {name!r} is the base model's name")
            if self.ids.get(name, spec.task_id) != spec.task_id:
                raise BdLoraError(f"--adapter {spec}: adapter name {name!r} is given to two task ids")
            self.add(name, spec.task_id, Path(spec.directory).name)  # shown as `root`: the directory's name, not its path

    def add(self, name: str, task_id: int, root: str | None) -> None:
        if _canonical_id(name) is None:
            self.ids[name] = task_id
        if root is not None:
            self.roots[task_id] = root

    def retain(self, registered: Collection[int]) -> None:
        """Forget the names of adapters no longer registered (evicted from the host cache: --no-pin-adapters)."""
        for task_id in {*self.ids.values(), *self.roots} - set(registered):
            self.forget(task_id)

    def forget(self, task_id: int) -> None:
        self.ids = {n: t for n, t in self.ids.items() if t != task_id}
        self.roots.pop(task_id, None)

    def id_of(self, name: str | None) -> int | None:
        """The task id `name` was given at registration, or the one a numeric name stands for; None otherwise."""
        return None if not name else self.ids.get(name, _canonical_id(name))

    def name_of(self, task_id: int) -> str:
        return next((n for n, t in self.ids.items() if t == task_id), str(task_id))

    def taken(self, name: str, registered: Collection[int]) -> bool:
        return name == self.base or name in self.aliases or name in self.ids or _canonical_id(name) in registered

    def resolve(self, model: str | None, registered: Collection[int]) -> int | None:
        """The task id a request's `model` picks (None: the base model); 404 for a name nothing answers to."""
        if not model or model == self.base or model in self.aliases:
            return None
        task_id = self.ids.get(model, _canonical_id(model))
        if task_id is None or task_id not in registered:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")
        return task_id

    def next_id(self, registered: Collection[int]) -> int:
        return max([0, *registered, *self.ids.values(), *self.roots]) + 1

    def cards(self, registered: Collection[int], max_model_len: int) -> list[dict]:
        """`/v1/models` entries (vLLM's ModelCard), base model first, plus each adapter's lora_task_id."""
        def card(name, root, parent, **extra):
            return {"id": name, "object": "model", "created": self.created, "owned_by": "trtllm-bdlora", "root": root,
                    "parent": parent, "max_model_len": max_model_len, **extra}

        return [card(self.base, self.base_root, None)] + [
            card(self.name_of(t), self.roots.get(t), self.base, lora_task_id=t) for t in sorted(registered)
        ]


def adapter_root(root: str | None, allow_loading: bool) -> AdapterRoot | None:
    """`--adapter-root`, opened once (adapters/files.py: adapters are opened beneath it, never re-opened by
    path); loading at run time needs one."""
    if not allow_loading:
        return None
    if root is None:
        raise BdLoraError("--allow-adapter-loading needs --adapter-root DIR (the only tree adapters load from)")
    if not Path(root).is_dir():
        raise BdLoraError(f"--adapter-root {root}: not a directory")
    return AdapterRoot(root)
