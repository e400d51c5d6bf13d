from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.adapters.peft_loader import load_peft_adapter

__all__ = ["Adapter", "LoraFactors", "load_peft_adapter"]
