"""The TensorRT-LLM route: adapter conversion, the runtime's per-rank split, the plugin's math, engine builds.

Only `network.py` and `build.py` import tensorrt / tensorrt_llm, lazily; everything else is pure and tested.
"""
