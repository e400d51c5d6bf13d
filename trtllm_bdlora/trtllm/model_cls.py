"""The BD-LoRA Llama for `trtllm-build`, TensorRT-LLM's supported custom-model hook:

    TRTLLM_BDLORA_PLUGIN_LIB=/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so trtllm-build \\
        --checkpoint_dir CKPT --output_dir ENGINES --lora_plugin auto --remove_input_padding enable \\
        --lora_target_modules attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_4h_to_h mlp_gate --max_lora_rank 64 \\
        --model_cls_file trtllm_bdlora/trtllm/model_cls.py --model_cls_name BdLoraLLaMAForCausalLM

`--lora_target_modules` is required: without it the engine has no LoRA inputs (the class refuses to build it).
`--workers N` works: the class pickles by name (trtllm_bdlora.trtllm.network), and each spawned process loads
the plugin library from TRTLLM_BDLORA_PLUGIN_LIB. Loading this file registers the BdLora plugin (the library's
static registrar) and defines the class.
"""

import os

from tensorrt_llm.models import LLaMAForCausalLM

from trtllm_bdlora.config import CONTAINER_PLUGIN_LIB
from trtllm_bdlora.trtllm.network import PLUGIN_LIB_ENV, bdlora_model_class, load_plugin_library

load_plugin_library(os.environ.get(PLUGIN_LIB_ENV, CONTAINER_PLUGIN_LIB))
BdLoraLLaMAForCausalLM = bdlora_model_class(LLaMAForCausalLM)
