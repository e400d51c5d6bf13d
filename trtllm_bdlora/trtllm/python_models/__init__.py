"""The production repository's Python-backend models, one module per model, each defining `TritonPythonModel`.

They live in the package so that any install (a wheel included) carries them: `fill-model-repo` writes each
model's `<name>/1/model.py` as one import of its module here (`triton_repo.python_model_source`), and the model
runs the installed package's code. They import `triton_python_backend_utils`, which exists only inside Triton's
Python backend (tests put a stand-in in its place); the glue they share is `trtllm_bdlora.trtllm.triton_python`.
"""
