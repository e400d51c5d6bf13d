"""A `tritonclient.grpc` client for the `ensemble` model: the same calls work against production Triton and `serve`.
A decoupled ensemble (the repository's default) answers only streams, as Triton refuses unary calls to it: the request
goes over ModelStreamInfer, with the `stream` input deciding whether tokens come one by one."""

from __future__ import annotations

import os
import queue

import numpy as np

from trtllm_bdlora.adapters.trtllm_format import BF16_STORAGE
from trtllm_bdlora.cli.flags import Flags, command, section_values
from trtllm_bdlora.cli.launching import Invocation
from trtllm_bdlora.config import ClientConfig, split_keys
from trtllm_bdlora.errors import BdLoraError

UNKNOWN_ADAPTER = "not found in cache"  # TensorRT-LLM's wording for a task id sent without weights


LORA_DTYPES = {"TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_BF16": "bfloat16"}


def _inputs(text: str, max_tokens: int, task_id: int | None, lora: tuple | None, stream: bool,
            temperature: float, top_p: float, seed: int):
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        tensor("text_input", np.array([[text.encode()]], dtype=object), "BYTES"),
        tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        tensor("stream", np.array([[stream]], dtype=bool), "BOOL"),
        tensor("exclude_input_in_output", np.array([[True]], dtype=bool), "BOOL"),  # the generated text only
    ]
    if temperature > 0:  # TensorRT-LLM samples when top_p > 0 (or top_k > 1); greedy otherwise
        inputs += [tensor("temperature", np.array([[temperature]], dtype=np.float32), "FP32"),
                   tensor("top_p", np.array([[top_p]], dtype=np.float32), "FP32"),
                   tensor("seed", np.array([[seed]], dtype=np.uint64), "UINT64")]
    if task_id:
        inputs.append(tensor("lora_task_id", np.array([[task_id]], dtype=np.uint64), "UINT64"))
    if lora is not None:
        weights, config = lora
        if weights.dtype == BF16_STORAGE:  # bf16 bits, as convert_adapter stores them: tritonclient takes ml_dtypes
            import ml_dtypes

            weights, wire = weights.view(ml_dtypes.bfloat16), "BF16"
        else:
            wire = {np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32"}[weights.dtype]
        inputs.append(tensor("lora_weights", weights, wire))
        inputs.append(tensor("lora_config", config.astype(np.int32), "INT32"))
    return inputs


def converted_adapter(adapter_dir: str, tp: int = 1, dtype: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.adapters.trtllm_format import convert_adapter

    return convert_adapter(load_peft_adapter(adapter_dir), tp=tp, dtype=dtype)


def ensemble_facts(client, headers: dict | None = None) -> tuple[bool, str]:
    """(whether the ensemble is decoupled, the dtype its lora_weights input takes) from its ModelConfig."""
    from tritonclient.grpc import model_config_pb2 as mc

    config = client.get_model_config("ensemble", headers=headers).config
    weights = next((i for i in config.input if i.name == "lora_weights"), None)
    dtype = LORA_DTYPES.get(mc.DataType.Name(weights.data_type), "float16") if weights is not None else "float16"
    return config.model_transaction_policy.decoupled, dtype


def infer(client, text: str, max_tokens: int, task_id: int | None = None, lora: tuple | None = None,
          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, headers: dict | None = None) -> str:
    """The whole text of one request: a unary call, or one response over a stream when the ensemble is decoupled."""
    if ensemble_facts(client, headers)[0]:
        return stream(client, text, max_tokens, task_id, lora, temperature=temperature, top_p=top_p, seed=seed,
                      headers=headers, tokens=False)
    result = client.infer("ensemble", _inputs(text, max_tokens, task_id, lora, False, temperature, top_p, seed),
                          headers=headers)
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def stream(client, text: str, max_tokens: int, task_id: int | None = None, lora: tuple | None = None,
           on_text=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, timeout: float = 600,
           headers: dict | None = None, tokens: bool = True) -> str:
    """One request over ModelStreamInfer; `tokens`: the text comes token by token (the `stream` input), each delta
    to `on_text`, else in one response. Returns the whole text."""
    chunks: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: chunks.put((result, error)), headers=headers)
    try:
        client.async_stream_infer("ensemble", _inputs(text, max_tokens, task_id, lora, tokens, temperature, top_p, seed),
                                  enable_empty_final_response=True)
        parts = []
        while True:
            result, error = chunks.get(timeout=timeout)
            if error is not None:  # InferenceServerException, as a unary call raises it
                raise error
            response = result.get_response()
            delta = result.as_numpy("text_output")
            if delta is not None:
                piece = delta.reshape(-1)[0].decode()
                parts.append(piece)
                if on_text and piece:
                    on_text(piece)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return "".join(parts)
    finally:
        client.stop_stream()


def add_commands(sub) -> None:
    p = command(sub, "client", help="send one request to a serve / Triton endpoint with tritonclient",
                description="Send one text request to the `ensemble` model over KServe v2 gRPC with tritonclient "
                            "(against `serve` and production Triton alike; a decoupled ensemble, the repository's "
                            "default, is asked over a stream, as Triton requires) and print the generated text. With "
                            "--adapter-dir, an adapter the server does not hold is converted and sent with the request.",
                configure=client_config, run=run_client)
    flags = Flags(p, ClientConfig, "client")
    flags.add("--url", metavar="HOST:PORT", help="the server's gRPC endpoint")
    flags.add("--text", help="the prompt (plain text, sent as text_input)")
    flags.add("--max-tokens", type=int, help="tokens to generate at most")
    flags.add("--adapter", type=int, metavar="ID", help="lora_task_id of the adapter to run (default: none, the base "
                                                        "model)")
    flags.add("--adapter-dir", metavar="DIR", help="PEFT adapter to convert and send if the server lacks --adapter")
    flags.add("--tp", type=int, help="the server's TP (the --adapter-dir conversion's form)")
    flags.add("--temperature", type=float, help="0 is greedy; above 0 samples (top_p 1, seed 0)")
    flags.add("--stream", action="store_true", help="stream the text as it is generated (ModelStreamInfer)")
    flags.add("--api-key", metavar="KEY", help="the server's API key, sent as `authorization: Bearer KEY` (default: the "
                                               "first key of the API_KEY environment variable, else none)")


def client_config(ns) -> ClientConfig:
    values = section_values(ns, "client")
    values["api_key"] = values["api_key"] or (split_keys(None, os.environ) or (None,))[0]  # environment: read once
    return ClientConfig(**values)


def run_client(args: ClientConfig, invocation: Invocation | None = None) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(args.url)
    lora = None
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None

    def run():
        if args.stream:
            text = stream(client, args.text, args.max_tokens, args.adapter, lora,
                          on_text=lambda s: print(s, end="", flush=True), temperature=args.temperature, headers=headers)
            print()
            return text
        text = infer(client, args.text, args.max_tokens, args.adapter, lora, temperature=args.temperature,
                     headers=headers)
        print(text)
        return text

    try:
        lora_dtype = ensemble_facts(client, headers)[1]
        try:
            run()
        except (InferenceServerException, BdLoraError) as err:
            if UNKNOWN_ADAPTER not in str(err) or not args.adapter_dir:
                raise
            lora = converted_adapter(args.adapter_dir, args.tp, lora_dtype)  # first use: send it with the request
            run()
    except InferenceServerException as err:
        raise BdLoraError(str(err.message() if hasattr(err, "message") else err)) from None
    finally:
        client.close()
    return 0

