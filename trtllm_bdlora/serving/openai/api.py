"""OpenAI-compatible HTTP API (FastAPI + uvicorn) on the same runtime as the gRPC endpoint: `/v1/models`,
`/v1/completions`, `/v1/chat/completions` (streamed as server-sent events ending with `data: [DONE]`), and vLLM's
`/v1/load_lora_adapter` / `/v1/unload_lora_adapter`. The request's `model` picks the adapter
(openai_models.py). Shapes follow vLLM's OpenAI server (openai_protocol.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from trtllm_bdlora.engine.request import build_request
from trtllm_bdlora.engine.runtime import Runtime, Submission
from trtllm_bdlora.errors import AdapterError, BdLoraError, NotFoundError, RequestError
from trtllm_bdlora.serving.openai.names import AdapterNames, adapter_dir_under, adapter_root
from trtllm_bdlora.serving.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ResponseShape,
    SamplingRequest,
    TextTracker,
    UnloadLoRAAdapterRequest,
    error_body,
    finish_reason,
    stop_reason,
    stream_piece,
)

DONE = format_sse_event(data_str="[DONE]")


def adapter_gone(err: NotFoundError) -> NotFoundError:
    """An adapter unloaded or evicted after the request named it: for an OpenAI client, its model does not exist."""
    return NotFoundError(f"The model does not exist: {err}", param="model")


class Generation:
    """One request in flight: the engine thread reports tokens and completion, the event loop reads `events`.
    A stop string, or the client going away, cancels the request (it ends at once, at its next token if queued)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tracker: TextTracker, request):
        self.loop, self.tracker, self.request = loop, tracker, request
        self.events: asyncio.Queue = asyncio.Queue()

    def abandon(self) -> None:
        Runtime.cancel(self.request)

    def _put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server stopping)
            self.abandon()

    def on_token(self, token: int) -> None:  # engine thread
        if self.tracker.add(token):
            self.abandon()
        self._put(("token", token, self.tracker.text))

    def on_done(self, ids: list[int] | None, error: str | None) -> None:  # engine thread
        self._put(("done", ids, error, self.tracker.text, self.tracker.stop_reason))


class OpenAIServer:
    def __init__(self, runtime: Runtime, names: AdapterNames, root: Path | None):
        self.runtime, self.engine, self.names, self.root = runtime, runtime.engine, names, root
        self.adapter_lock = asyncio.Lock()

    def registered(self) -> set[int]:
        """Task ids requests may name now (read from the event loop: the engine thread only swaps whole entries)."""
        registered = set(tuple(self.engine.pool.host)) - set(self.runtime.retiring)
        self.names.retain(registered)
        return registered

    # generation --------------------------------------------------------------
    async def generate(self, body: SamplingRequest, max_tokens: int | None, chat: bool):
        body.check_supported()
        eng = self.engine
        if eng.tokenizer is None:
            raise RequestError("this model has no tokenizer: the OpenAI API needs one")
        task_id = self.names.resolve(body.model, self.registered())
        ids = body.prompt_ids(eng.tokenizer, eng.max_seq_len)
        if max_tokens is None:  # as vLLM: up to the end of the context (or of what the KV cache holds)
            max_tokens = max(1, min(eng.max_seq_len, eng.kv_budget.row_limit) - len(ids))
        if not eng.kv_budget.fits([len(ids) + max_tokens]):
            raise RequestError(f"prompt of {len(ids)} tokens with max_tokens {max_tokens} does not fit "
                               f"{eng.kv_budget.describe()}", param="max_tokens")
        params = body.sampling_params(max_tokens, eng.shape.vocab_size)
        req = build_request(ids, params, vocab_size=eng.shape.vocab_size, max_seq_len=eng.max_seq_len,
                            adapter=task_id, names={"prompt_ids": "prompt"})
        if params.min_tokens > params.max_tokens:  # as vLLM
            raise RequestError(f"min_tokens {params.min_tokens} must be <= max_tokens {params.max_tokens}",
                               param="min_tokens")
        stops = body.stops()
        gen = Generation(asyncio.get_running_loop(),
                         TextTracker(lambda ids: eng.tokenizer.decode(ids, skip_special_tokens=True), stops), req)
        req.on_token = gen.on_token
        try:
            self.runtime.submit(Submission(req, on_done=gen.on_done, model=body.model or self.names.base))
        except NotFoundError as err:
            raise adapter_gone(err) from None
        shape = ResponseShape(chat, body.model or self.names.base, bool(body.return_token_ids), req.prompt_ids)
        try:
            event = first = await gen.events.get()
            while not body.stream and event[0] != "done":
                event = await gen.events.get()
        except asyncio.CancelledError:
            gen.abandon()
            raise
        if event[0] == "done" and event[2]:  # refused at admission, or (not streaming) failed on the way
            raise adapter_gone(event[2]) if isinstance(event[2], NotFoundError) else event[2]
        if not body.stream:
            _, ids, _, text, text_stop = event
            return JSONResponse(shape.response(text, ids, finish_reason(req.finish_reason, text_stop),
                                               stop_reason(text_stop, req.finish_reason, ids)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(self._stream(gen, first, shape, gen.tracker.holdback, include_usage))

    async def _stream(self, gen: Generation, event: tuple, shape: ResponseShape, holdback: int, include_usage: bool):
        def sse(obj: dict) -> bytes:
            return format_sse_event(data_str=json.dumps(obj))

        sent, pending, first = 0, [], True
        try:
            if shape.chat:  # as vLLM and OpenAI: the role first
                yield sse(shape.chunk("", [], first=True))
                first = False
            while event[0] == "token":
                pending.append(event[1])
                piece, sent = stream_piece(event[2], sent, holdback, final=False)
                if piece:
                    yield sse(shape.chunk(piece, pending, first=first))
                    pending, first = [], False
                event = await gen.events.get()
            _, ids, error, text, text_stop = event
            if error:
                yield sse(error_body(adapter_gone(error) if isinstance(error, NotFoundError) else error))
            else:
                piece, sent = stream_piece(text, sent, holdback, final=True)
                engine_reason = gen.request.finish_reason
                yield sse(shape.chunk(piece, pending, finish_reason(engine_reason, text_stop),
                                      stop_reason(text_stop, engine_reason, ids), first=first))
                if include_usage:
                    yield sse(shape.usage_chunk(len(ids)))
            yield DONE
        finally:
            gen.abandon()

    # adapters ----------------------------------------------------------------
    def _loading_allowed(self) -> Path:
        if self.root is None:
            raise NotFoundError("run-time adapter loading is off: start serve with --allow-adapter-loading "
                                   "--adapter-root DIR")
        return self.root

    async def load_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        root = self._loading_allowed()
        name = body.lora_name
        if not name or not body.lora_path:
            raise RequestError("Both 'lora_name' and 'lora_path' must be provided.")
        if body.load_inplace:
            raise RequestError("load_inplace is not supported: unload the adapter first", param="load_inplace")
        if name.isdigit() and (name != str(int(name)) or int(name) < 1):
            raise RequestError(f"numeric lora_name must be a positive task id, got {name!r}", param="lora_name")
        async with self.adapter_lock:
            registered = self.registered()
            if self.names.taken(name, registered):
                raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            directory = adapter_dir_under(root, body.lora_path)
            from trtllm_bdlora.adapters import load_peft_adapter

            try:
                adapter = await run_in_threadpool(load_peft_adapter, directory, self.engine.shape)
            except AdapterError as err:
                raise AdapterError(str(err), param="lora_path") from None
            task_id = int(name) if name.isdigit() else self.names.next_id(registered)
            await run_in_threadpool(self.runtime.register_adapter, task_id, adapter)
            self.names.add(name, task_id, str(directory))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        self._loading_allowed()
        name = body.lora_name
        if name == self.names.base:
            raise RequestError("the base model cannot be unloaded", param="lora_name")
        async with self.adapter_lock:
            try:
                task_id = self.names.resolve(name, self.registered())
            except NotFoundError:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.", param="lora_name") from None
            try:
                await run_in_threadpool(self.runtime.unregister_adapter, task_id)
            except NotFoundError as err:
                raise adapter_gone(err) from None
            self.names.forget(task_id)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        where = ".".join(str(x) for x in e.get("loc", ())[1:])
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request body: " + "; ".join(parts)


def create_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="trtllm-bdlora OpenAI-compatible API")

    @app.exception_handler(BdLoraError)
    async def openai_error(request: Request, err: BdLoraError):
        return JSONResponse(error_body(err), status_code=err.status.http)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):  # as vLLM: 400, not FastAPI's 422
        return JSONResponse(error_body(RequestError(_validation_message(err))), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        body = error_body(NotFoundError(str(err.detail)) if err.status_code == 404 else RequestError(str(err.detail)))
        body["error"]["code"] = err.status_code
        return JSONResponse(body, status_code=err.status_code)

    @app.get("/health")
    async def health():
        healthy = server.runtime.healthy and not server.runtime.stopping.is_set()
        return PlainTextResponse("" if healthy else "unhealthy", status_code=200 if healthy else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.names.cards(server.registered(), server.engine.max_seq_len)}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        registered = server.registered()
        task_id = server.names.resolve(model, registered)
        cards = server.names.cards(registered, server.engine.max_seq_len)
        return cards[0] if task_id is None else next(c for c in cards[1:] if c["lora_task_id"] == task_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's and vLLM's default
        return await server.generate(body, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        return await server.generate(body, max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        return await server.load_adapter(body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return await server.unload_adapter(body)

    return app


def check_args(args) -> tuple[AdapterNames, Path | None]:
    """The OpenAI names and loading root from `serve`'s flags; BdLoraError for bad ones (before ranks start)."""
    base = args.served_model_name or args.model
    return AdapterNames(base, args.model, args.adapter), adapter_root(args.adapter_root, args.allow_adapter_loading)


def openai_app(runtime: Runtime, args) -> FastAPI:
    """The OpenAI API app for `serve` (served by http_server.HttpServer on --openai-port)."""
    names, root = check_args(args)
    return create_app(OpenAIServer(runtime, names, root))
