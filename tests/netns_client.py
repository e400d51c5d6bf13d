"""A client of `serve` on another test host (tests/netns_hosts.py), where the tests' own process cannot reach:
`python -m tests.netns_client SPEC`, SPEC a JSON object, prints one JSON line per result.

- {"mode": "complete", "host": ADDR, "grpc": PORT, "openai": PORT, "requests": [{"prompt", "adapter", "max_tokens"}]}:
  each request through the ensemble over KServe gRPC and through OpenAI /v1/completions:
  {"grpc": text, "openai": text} per request.
- {"mode": "stream", "host": ADDR, "openai": PORT, "prompt", "adapter", "max_tokens"}: one streamed completion;
  prints {"first": true} at its first token, then {"tokens": n, "error": message or null, "finished": bool}.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def _openai_base(spec: dict) -> str:
    return f"http://{spec['host']}:{spec['openai']}"


def _model_name(spec: dict, adapter) -> str:
    if adapter is not None:
        return str(adapter)
    with urllib.request.urlopen(_openai_base(spec) + "/v1/models", timeout=60) as response:
        return json.loads(response.read())["data"][0]["id"]  # the base model is listed first


def _completion_request(spec: dict, prompt: str, adapter, max_tokens: int, stream: bool) -> urllib.request.Request:
    body = {"model": _model_name(spec, adapter), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": stream}
    return urllib.request.Request(_openai_base(spec) + "/v1/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def complete(spec: dict) -> None:
    import tritonclient.grpc as grpcclient

    from trtllm_bdlora.cli.client import infer

    client = grpcclient.InferenceServerClient(f"{spec['host']}:{spec['grpc']}")
    for req in spec["requests"]:
        text = infer(client, req["prompt"], req["max_tokens"], req["adapter"])
        with urllib.request.urlopen(_completion_request(spec, req["prompt"], req["adapter"], req["max_tokens"], False),
                                    timeout=120) as response:
            openai_text = json.loads(response.read())["choices"][0]["text"]
        print(json.dumps({"grpc": text, "openai": openai_text}), flush=True)


def stream(spec: dict) -> None:
    tokens, error, finished = 0, None, False
    try:
        request = _completion_request(spec, spec["prompt"], spec["adapter"], spec["max_tokens"], True)
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = str(event["error"].get("message", event["error"]))
                    break
                choice = event["choices"][0]
                if choice.get("text"):
                    tokens += 1
                    if tokens == 1:
                        print(json.dumps({"first": True}), flush=True)
                if choice.get("finish_reason"):
                    finished = True
    except (urllib.error.URLError, OSError, ValueError) as err:  # the server went away mid-stream
        error = f"{type(err).__name__}: {err}"
    if error is None and not finished:
        error = "the stream ended before the completion finished"
    print(json.dumps({"tokens": tokens, "error": error, "finished": finished}), flush=True)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    {"complete": complete, "stream": stream}[spec["mode"]](spec)
