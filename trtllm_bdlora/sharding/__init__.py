from trtllm_bdlora.sharding.adapter import SCHEMES, LoraShard, bd_misfit, shard_adapter, shard_lora
from trtllm_bdlora.sharding.base import TPLayout, make_layout, shard_llama_state_dict, vocab_shard

__all__ = [
    "SCHEMES",
    "LoraShard",
    "TPLayout",
    "bd_misfit",
    "make_layout",
    "shard_adapter",
    "shard_llama_state_dict",
    "shard_lora",
    "vocab_shard",
]
