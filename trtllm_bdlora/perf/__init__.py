"""Performance model: per-decode-step time breakdown per LoRA scheme (`trtllm-bdlora project`)."""
