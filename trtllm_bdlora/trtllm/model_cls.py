"""The BD-LoRA Llama for `trtllm-build`, TensorRT-LLM's supported custom-model hook:

    TRTLLM_BDLORA_PLUGIN_LIB=/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so trtllm-build \\
        --checkpoint_dir CKPT --output_dir ENGINES --lora_plugin auto --remove_input_padding enable \\
        --model_cls_file trtllm_bdlora/trtllm/model_cls.py --model_cls_name BdLoraLLaMAForCausalLM

Loading this file registers the BdLora plugin (the library's static registrar) and defines the class.
"""

import os

from tensorrt_llm.models import LLaMAForCausalLM

from trtllm_bdlora.config import CONTAINER_PLUGIN_LIB
from trtllm_bdlora.trtllm.build import load_plugin_library
from trtllm_bdlora.trtllm.network import bdlora_model_class

load_plugin_library(os.environ.get("TRTLLM_BDLORA_PLUGIN_LIB", CONTAINER_PLUGIN_LIB))
BdLoraLLaMAForCausalLM = bdlora_model_class(LLaMAForCausalLM)
