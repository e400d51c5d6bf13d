"""trtllm-bdlora: block-diagonal LoRA serving under tensor parallelism with zero LoRA communication."""

__version__ = "0.1.0"
