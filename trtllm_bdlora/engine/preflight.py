"""What can be refused before any rank starts, as one line naming the flag, cheapest checks first: adapter
directories that are not there, an unknown network interface, a model that is not there, a TP its heads do not
divide, a torch build made for another TP (`check_engine_setup`, well under a second for a local model); then every
adapter read and checked against the model, --max-lora-rank and the host LoRA cache (`check_adapters`; its
safetensors header first, so that nothing larger than a valid adapter is ever read)."""

from __future__ import annotations

from pathlib import Path

from trtllm_bdlora.config import EMBEDDED_MODEL, EngineConfig
from trtllm_bdlora.errors import AdapterError, BdLoraError


def _flagged(flag: str, err: BdLoraError) -> BdLoraError:
    """The error with the flag it concerns in front, unless it starts with it already."""
    return err if str(err).startswith(flag) else BdLoraError(f"{flag}: {err}")


def check_engine_setup(config: EngineConfig) -> None:
    from trtllm_bdlora.distributed.launch import interface_address
    from trtllm_bdlora.llama.config_json import read_config_shape

    if config.backend == "trtllm":
        raise BdLoraError("--backend trtllm engines are built by `trtllm-bdlora build` and served by Triton: see "
                          "`trtllm-bdlora launch-triton` and docs/tensorrt-llm.md")
    for spec in config.adapters:
        if not Path(spec.directory).is_dir():
            raise AdapterError(f"--adapter {spec}: adapter directory not found")
    interface_address(config.comm_interface)
    try:
        if config.model == EMBEDDED_MODEL:  # dequantised on first use (once): the shape needs the model itself
            from trtllm_bdlora.llama.cache import embedded_dir, embedded_ready

            if embedded_ready():
                directory = embedded_dir()
            else:
                from trtllm_bdlora.llama.loader import embedded_model_dir

                directory = embedded_model_dir()
        else:
            directory = Path(config.model)
        shape = read_config_shape(directory)
    except BdLoraError as err:
        raise _flagged("--model", err) from None
    from trtllm_bdlora.llama.shape import check_tp

    check_tp(shape, config.tp, name="--tp")
    from trtllm_bdlora.llama.loader import read_build_info

    read_build_info(directory, config.tp)


def check_adapters(config: EngineConfig) -> None:
    from trtllm_bdlora.logs import phase

    if not config.adapters:
        return
    with phase("reading the adapters", announce=False, adapters=len(config.adapters)):  # torch's import included
        import torch

        from trtllm_bdlora.adapters import load_peft_adapter
        from trtllm_bdlora.engine.adapter_pool import DEFAULT_MAX_LORA_RANK, check_adapter_limits, host_cache_limits
        from trtllm_bdlora.llama.config_json import read_config_shape
        from trtllm_bdlora.llama.loader import read_build_info, resolve_model_dir

        directory = resolve_model_dir(config.model)
        shape = read_config_shape(directory)  # as transformers reads it, without importing transformers
        build = read_build_info(directory, config.tp)
        max_lora_rank = config.max_lora_rank or (build or {}).get("max_lora_rank") or DEFAULT_MAX_LORA_RANK
        max_elements, budget = host_cache_limits(config.lora_cache_host_bytes, config.tp, getattr(torch, config.dtype))
        for spec in config.adapters:  # a header larger than these allow is refused before any tensor is read
            try:
                adapter = load_peft_adapter(spec.directory, model_shape=shape, max_lora_rank=max_lora_rank,
                                            max_elements=max_elements, budget=budget)
                check_adapter_limits(adapter, max_lora_rank)
            except BdLoraError as err:
                raise _flagged(f"--adapter {spec}", err) from None
