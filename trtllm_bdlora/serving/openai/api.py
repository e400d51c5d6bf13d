"""OpenAI-compatible HTTP API (FastAPI + uvicorn) on the same runtime as the gRPC endpoint: `/v1/models`,
`/v1/completions`, `/v1/chat/completions` (streamed as server-sent events ending with `data: [DONE]`), and vLLM's
`/v1/load_lora_adapter` / `/v1/unload_lora_adapter`. The request's `model` picks the adapter
(openai_models.py). Shapes follow vLLM's OpenAI server (openai_protocol.py). `/metrics` (and `/v1/metrics`) answer
the server's Prometheus metrics, where AIPerf and vLLM users scrape them; every request is counted there
(protocol `openai`; a `tensorrt_llm` request in Triton's series).
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from trtllm_bdlora.adapters.files import AdapterRoot
from trtllm_bdlora.engine.guided import attach_guide
from trtllm_bdlora.engine.request import build_request
from trtllm_bdlora.engine.runtime import Runtime, Submission
from trtllm_bdlora.errors import AdapterError, BdLoraError, InputError, NotFoundError, RequestError, log_text
from trtllm_bdlora.logs import log_adapter_call
from trtllm_bdlora.serving.edge.asgi import cancel_on_disconnect
from trtllm_bdlora.serving.edge.payload import parse_json
from trtllm_bdlora.serving.metrics import METRICS_CONTENT_TYPE, ClientCall, Metrics
from trtllm_bdlora.serving.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from trtllm_bdlora.serving.openai.names import AdapterNames, check_name
from trtllm_bdlora.serving.openai.protocol import (
    FIELD_NAMES,
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
TEXT_THREADS = 4  # threads that parse bodies, apply chat templates and tokenize (never the event loop)
HEALTH_PATHS = frozenset({"/health"})
METRICS_PATHS = frozenset({"/metrics", "/v1/metrics"})
PROTOCOL = "openai"
CORE_MODEL = "tensorrt_llm"  # the Triton model an OpenAI request is counted as


def is_health(path: str) -> bool:
    """Health, and metrics: answered without an API key (as vLLM answers /metrics) and under load."""
    return path in HEALTH_PATHS or path in METRICS_PATHS


def adapter_gone(err: NotFoundError) -> NotFoundError:
    """An adapter unloaded or evicted after the request named it: for an OpenAI client, its model does not exist."""
    return NotFoundError(f"The model does not exist: {err}", param="model")


_TEXT_POOL = ThreadPoolExecutor(max_workers=TEXT_THREADS, thread_name_prefix="openai-text")


async def off_loop(fn, *args):
    """`fn(*args)` on a text thread: the event loop (health, other requests) never waits for it."""
    return await asyncio.get_running_loop().run_in_executor(_TEXT_POOL, fn, *args)


async def parse(request: Request, model: type[pydantic.BaseModel]):
    """The request's body as `model`, parsed and checked on a text thread (parse_json: depth, Unicode)."""
    return await off_loop(validate_body, model, await request.body())


class Counted:
    """How one OpenAI request is counted: one client call on protocol `openai`, and one `tensorrt_llm` request of
    batch n (its sequences) in Triton's series, a success when every sequence ends without error; each sequence's
    tokens in the token histograms. Sequences report from the engine thread; the first outcome counts."""

    def __init__(self, metrics: Metrics | None, call: ClientCall | None, sequences: int):
        self.metrics, self.call, self.left = metrics, call, sequences
        self.record = metrics.start(CORE_MODEL, sequences) if metrics is not None else None
        self.queued_ns = 0
        self._lock = threading.Lock()

    def token(self) -> None:
        if self.record is not None:
            self.record.responded()
        if self.call is not None:
            self.call.responded()

    def sequence_done(self, request, error) -> None:
        if error is not None:
            self.failed("REJECTED" if isinstance(error, RequestError) else "BACKEND")
            return
        if self.metrics is not None:
            self.metrics.tokens(CORE_MODEL, len(request.prompt_ids), len(request.output_ids), PROTOCOL)
        times = request.times_ns
        with self._lock:
            self.left -= 1
            self.queued_ns = max(self.queued_ns, times.get("first_scheduled", 0) - times.get("arrival", 0))
            last = self.left == 0
        if last:
            if self.record is not None:
                self.record.finish(None, self.queued_ns)
            if self.call is not None:
                self.call.finish(ok=True)

    def failed(self, reason: str) -> None:
        """Refused, failed, or the client left (CANCELED): no-op once counted."""
        if self.record is not None:
            self.record.finish(reason)
        if self.call is not None:
            self.call.finish(ok=False)


class Generation:
    """One sequence in flight (a prompt, one of its n samples): the engine thread reports tokens and completion
    into the request's shared `events` queue, tagged with the choice index. A stop string, or the client going
    away, cancels the sequence (it ends at once, at its next token if queued)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, tracker: TextTracker,
                 request, prompt_text: str | None, counted: Counted | None = None):
        self.loop, self.events, self.index, self.tracker, self.request = loop, events, index, tracker, request
        self.prompt_text, self.counted = prompt_text, counted

    def abandon(self) -> None:
        Runtime.cancel(self.request)

    def _put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server stopping)
            self.abandon()

    def on_token(self, token: int) -> None:  # engine thread: the token's log-probs are already recorded
        if self.counted is not None:
            self.counted.token()
        if self.tracker.add(token):
            Runtime.cancel(self.request, "stop_words")
        logprobs = self.request.output_token_logprobs
        self._put(("token", self.index, token, self.tracker.text, logprobs[-1] if logprobs else None))

    def on_done(self, ids: list[int] | None, error) -> None:  # engine thread
        if self.counted is not None:
            self.counted.sequence_done(self.request, error)
        self._put(("done", self.index, ids, error, self.tracker.final_text, self.tracker.stop_reason))


class Choices:
    """What one OpenAI request's choices need to be written: the request's options, each sequence, the tokenizer."""

    def __init__(self, body: SamplingRequest, shape: ResponseShape, gens: list[Generation], tokenizer, echo_only: bool):
        self.body, self.shape, self.gens, self.echo_only = body, shape, gens, echo_only
        self.echo = bool(getattr(body, "echo", False))
        self.k = body.logprob_count()
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def decode_one(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return piece

    def prompt_text(self, gen: Generation) -> str:
        return gen.prompt_text if gen.prompt_text is not None else self.tokenizer.decode(gen.request.prompt_ids)

    def prompt_entries(self, gen: Generation) -> list:
        return [None, *gen.request.prompt_token_logprobs]

    def logprobs(self, gen: Generation, ids: list[int], entries: list, offset: int, with_prompt: bool) -> dict | None:
        """The choice's logprobs for output `ids` (and the prompt's first, when echoed)."""
        if self.k is None:
            return None
        if self.shape.chat:
            if not entries:  # as vLLM: a chunk without tokens (the role) has none
                return None
            return chat_logprobs(entries, self.k, self.decode_one)
        if with_prompt:
            ids, entries = gen.request.prompt_ids + ids, self.prompt_entries(gen) + entries
        return completion_logprobs(ids, entries, self.k, self.decode_one, offset)

    def prompt_logprobs(self, gen: Generation) -> list | None:
        if self.body.prompt_top_logprobs() is None:
            return None
        return prompt_logprobs(gen.request.prompt_token_logprobs, self.decode_one)

    def full(self, gen: Generation, ids: list[int], text: str, text_stop: str | None) -> dict:
        """A whole choice (not streamed)."""
        req = gen.request
        shown = [] if self.echo_only else ids
        entries = [] if self.echo_only else req.output_token_logprobs[: len(ids)]
        if self.echo:
            text = self.prompt_text(gen) + ("" if self.echo_only else text)
        return self.shape.choice(gen.index, text, finish=finish_reason(req.finish_reason, text_stop),
                                 stop_reason=stop_reason(text_stop, req.finish_reason, ids), ids=shown,
                                 prompt_ids=req.prompt_ids, logprobs=self.logprobs(gen, shown, entries, 0, self.echo),
                                 prompt_logprobs=None if self.shape.chat else self.prompt_logprobs(gen))


class OpenAIServer:
    def __init__(self, runtime: Runtime, names: AdapterNames, root: AdapterRoot | None, metrics: Metrics | None = None):
        self.runtime, self.engine, self.names, self.root = runtime, runtime.engine, names, root
        self.metrics = metrics
        self.adapter_lock = asyncio.Lock()
        self.off_loop = off_loop

    def registered(self) -> set[int]:
        """Task ids requests may name now (read from the event loop: the engine thread only swaps whole entries).
        Names of adapters being unloaded are kept until they leave (they cannot be loaded again before)."""
        held = set(tuple(self.engine.pool.host))
        self.names.retain(held)
        return held - set(self.runtime.retiring)

    async def _lora_request_model(self, body: SamplingRequest) -> str | None:
        """The model a request runs with: `model`, or trtllm-serve's `lora_request` (an adapter by lora_int_id or
        lora_name, loaded from lora_path when not registered and run-time loading is on)."""
        lora = body.lora_request
        if lora is None:
            return body.model
        registered = self.registered()
        task_id = lora.lora_int_id if lora.lora_int_id in registered else self.names.ids.get(lora.lora_name)
        if task_id not in registered:
            if not lora.lora_path or self.root is None:
                raise NotFoundError(f"lora_request: adapter {lora.lora_name or lora.lora_int_id!r} is not loaded (load it "
                                    "with /v1/load_lora_adapter, or start serve with --allow-adapter-loading "
                                    "--adapter-root DIR to load lora_path)", param="lora_request")
            name = lora.lora_name or str(lora.lora_int_id or "")
            await self.load_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=lora.lora_path),
                                    task_id=lora.lora_int_id)
            task_id = self.names.resolve(name, self.registered())
        if body.model not in (None, "", self.names.base) and self.names.resolve(body.model, registered) != task_id:
            raise RequestError(f"model {body.model!r} and lora_request name different adapters", param="lora_request")
        return str(task_id)

    # generation --------------------------------------------------------------
    def _build(self, body: SamplingRequest, max_tokens: int | None, task_id: int | None, chat: bool, echo_only: bool
               ) -> tuple[list, list]:
        """The engine requests (text thread): every prompt's size checked against the context before any template
        or tokenizer sees it, then templated and tokenized; one request per prompt and choice, its grammar compiled
        (cached per schema). Returns (prompts, [(prompt index, choice, request, prompt text)])."""
        eng = self.engine
        prompts = body.prompts(eng.tokenizer, eng.max_seq_len)
        built = []
        for p, (ids, text) in enumerate(prompts):
            # None: as vLLM, up to the end of the context (or of what the KV cache holds)
            limit = max(1, min(eng.max_seq_len, eng.kv_budget.row_limit) - len(ids)) if max_tokens is None else max_tokens
            for i in range(body.choices):
                params = body.sampling_params(1 if echo_only else limit, eng.shape.vocab_size, choice=i)
                names = dict(FIELD_NAMES, logprobs="top_logprobs" if chat else "logprobs")
                if len(prompts) > 1:
                    names["prompt_ids"] = f"prompt[{p}]"
                req = build_request(ids, params, vocab_size=eng.shape.vocab_size, max_seq_len=eng.max_seq_len,
                                    adapter=task_id, names=names)
                if not eng.kv_budget.fits([len(ids) + limit]):  # after the context check, which names the cause
                    raise RequestError(f"prompt of {len(ids)} tokens with max_tokens {limit} does not fit "
                                       f"{eng.kv_budget.describe()}", param="max_tokens")
                if params.min_tokens > params.max_tokens:  # as vLLM
                    raise RequestError(f"min_tokens {params.min_tokens} must be <= max_tokens {params.max_tokens}",
                                       param="min_tokens")
                if params.guide is not None:
                    attach_guide(req, eng.tokenizer, eng.shape.vocab_size, eng.eos_ids, "response_format")
                built.append((p, i, req, text))
        return prompts, built

    async def generate(self, request: Request, body: SamplingRequest, max_tokens: int | None, chat: bool):
        body.check_supported()
        eng = self.engine
        if eng.tokenizer is None:
            raise RequestError("this model has no tokenizer: the OpenAI API needs one")
        model = await self._lora_request_model(body)
        task_id = self.names.resolve(model, self.registered())
        echo = bool(getattr(body, "echo", False))
        if max_tokens == 0 and not echo:
            raise InputError("max_tokens", "must be at least 1 (0 only with echo)")
        echo_only = echo and max_tokens == 0  # as vLLM: one token is generated and not returned
        stops = body.stops()
        prompts, built = await self.off_loop(self._build, body, max_tokens, task_id, chat, echo_only)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        gens: list[Generation] = []
        counted = Counted(self.metrics, getattr(request.state, "call", None), len(built))
        for p, i, req, text in built:
            tracker = TextTracker(lambda ids: eng.tokenizer.decode(ids, skip_special_tokens=True), stops,
                                  bool(body.include_stop_str_in_output))
            gen = Generation(loop, events, p * body.choices + i, tracker, req, text, counted)
            req.on_token = gen.on_token
            gens.append(gen)
        shape = ResponseShape(chat, body.model or model or self.names.base, bool(body.return_token_ids))
        if body.lora_request is not None and body.lora_request.lora_name:
            shape.model = body.lora_request.lora_name
        choices = Choices(body, shape, gens, eng.tokenizer, echo_only)

        def abandon_all() -> None:
            counted.failed("CANCELED")  # no-op when every sequence has ended
            for gen in gens:
                gen.abandon()
        try:
            for gen in gens:
                self.runtime.submit(Submission(gen.request, on_done=gen.on_done, model=body.model or self.names.base))
        except NotFoundError as err:
            counted.failed("REJECTED")
            abandon_all()
            raise adapter_gone(err) from None
        except BaseException as err:
            counted.failed("REJECTED" if isinstance(err, RequestError) else "OTHER")
            abandon_all()
            raise
        done: dict[int, tuple] = {}
        event: tuple = ()
        try:
            async with cancel_on_disconnect(request, abandon_all):  # a client that leaves cancels its requests
                while len(done) < len(gens):
                    event = await events.get()
                    if event[0] == "done":
                        if event[3]:  # refused at admission, or failed on the way
                            raise adapter_gone(event[3]) if isinstance(event[3], NotFoundError) else event[3]
                        done[event[1]] = event
                    if body.stream:  # a refusal before the first token is an HTTP error; later ones end the stream
                        break
        except BaseException:
            abandon_all()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(self._stream(choices, events, include_usage, event))
        out, completion_tokens = [], 0
        for gen in gens:
            _, _, ids, _, text, text_stop = done[gen.index]
            out.append(choices.full(gen, ids, text, text_stop))
            completion_tokens += len(ids)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        # vLLM: chat's prompt_logprobs at the response's top level (one prompt), completions' in each choice
        top = choices.prompt_logprobs(gens[0]) if chat else None
        return JSONResponse(shape.response(out, prompt_tokens, completion_tokens, prompts[0][0], top))

    async def _stream(self, choices: Choices, events: asyncio.Queue, include_usage: bool, event: tuple):
        """Server-sent events: chunks of every choice as their tokens come (`event`: the first, already read)."""
        def sse(obj: dict) -> bytes:
            return format_sse_event(data_str=json.dumps(obj))

        shape, gens = choices.shape, {g.index: g for g in choices.gens}
        sent = dict.fromkeys(gens, 0)  # characters of output text sent
        offset = dict.fromkeys(gens, 0)  # characters sent in all (echoed prompt included): completions' text_offset
        pending: dict[int, list] = {i: [] for i in gens}  # (token, log-probs) not yet sent
        first = dict.fromkeys(gens, True)
        running, completion_tokens = len(gens), 0

        def piece_chunk(gen: Generation, piece: str, tokens: list, finish=None, reason=None) -> dict:
            ids, entries = [t for t, _ in tokens], [e for _, e in tokens]
            is_first, echoed = first[gen.index], choices.echo and first[gen.index]
            if echoed:
                piece = choices.prompt_text(gen) + piece
            logprobs = choices.logprobs(gen, ids, entries, offset[gen.index], echoed)
            first[gen.index] = False
            offset[gen.index] += len(piece)
            return shape.chunk(shape.choice(gen.index, piece, finish=finish, stop_reason=reason, ids=ids,
                                            prompt_ids=gen.request.prompt_ids, logprobs=logprobs, chunk=True,
                                            first=is_first, prompt_logprobs=choices.prompt_logprobs(gen) if is_first else None),
                               gen.request.prompt_ids if is_first else None)

        try:
            if shape.chat:  # as vLLM and OpenAI: the role first
                for gen in gens.values():
                    yield sse(piece_chunk(gen, "", []))
            while running:
                event = event or await events.get()
                gen = gens[event[1]]
                if event[0] == "token":
                    _, index, token, text, entry = event
                    event = ()
                    if choices.echo_only:
                        continue
                    pending[index].append((token, entry))
                    piece, sent[index] = stream_piece(text, sent[index], gen.tracker.holdback, final=False)
                    if piece:
                        yield sse(piece_chunk(gen, piece, pending[index]))
                        pending[index] = []
                    continue
                _, index, ids, error, text, text_stop = event
                event = ()
                if error:
                    yield sse(error_body(adapter_gone(error) if isinstance(error, NotFoundError) else error))
                    yield DONE
                    return
                running -= 1
                completion_tokens += len(ids)
                piece, sent[index] = stream_piece("" if choices.echo_only else text, sent[index], gen.tracker.holdback,
                                                  final=True)
                engine_reason = gen.request.finish_reason
                yield sse(piece_chunk(gen, piece, pending[index], finish_reason(engine_reason, text_stop),
                                      stop_reason(text_stop, engine_reason, ids)))
            if include_usage:
                prompt_tokens = sum(len(g.request.prompt_ids) for g in gens.values() if g.index % choices.body.choices == 0)
                yield sse(shape.usage_chunk(prompt_tokens, completion_tokens))
            yield DONE
        finally:
            choices.gens[0].counted.failed("CANCELED")  # the client left mid-stream (no-op after the end)
            for gen in gens.values():
                gen.abandon()

    # adapters ----------------------------------------------------------------
    def _loading_allowed(self) -> AdapterRoot:
        if self.root is None:
            raise NotFoundError("run-time adapter loading is off: start serve with --allow-adapter-loading "
                                   "--adapter-root DIR")
        return self.root

    async def load_adapter(self, body: LoadLoRAAdapterRequest, task_id: int | None = None) -> PlainTextResponse:
        """vLLM's load (`task_id`: trtllm-serve's lora_int_id); every outcome, refusals included, gets an access
        line."""
        try:
            task_id = await self._load_adapter(body, task_id)
        except BdLoraError as err:
            log_adapter_call("load_lora_adapter", body.lora_name, self.names.id_of(body.lora_name), "rejected",
                             body.lora_path, log_text(err))
            raise
        log_adapter_call("load_lora_adapter", body.lora_name, task_id, "loaded", body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def _load_adapter(self, body: LoadLoRAAdapterRequest, task_id: int | None) -> int:
        root = self._loading_allowed()
        name = body.lora_name
        if not name or not body.lora_path:
            raise RequestError("Both 'lora_name' and 'lora_path' must be provided.")
        check_name("lora_name", name)
        if body.load_inplace:
            raise RequestError("load_inplace is not supported: unload the adapter first", param="load_inplace")
        if name.isdigit() and (name != str(int(name)) or int(name) < 1):
            raise RequestError(f"numeric lora_name must be a positive task id, got {name!r}", param="lora_name")
        async with self.adapter_lock:
            registered = self.registered()
            retiring = set(self.runtime.retiring)
            if self.names.id_of(name) in retiring:
                raise RequestError(f"lora_name {name!r} (lora_task_id {self.names.id_of(name)}) is being unloaded: "
                                   "requests that named it are still pending; load it again when they finish",
                                   param="lora_name")
            if self.names.taken(name, registered):
                raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            from trtllm_bdlora.adapters import load_peft_adapter

            with root.open_adapter(body.lora_path) as directory:  # read once, from descriptors beneath the root
                try:
                    adapter = await run_in_threadpool(load_peft_adapter, directory, **self.engine.adapter_limits())
                except AdapterError as err:
                    raise AdapterError(str(err), param="lora_path") from None
            if task_id is None:  # a new id: never one still held, being unloaded, or bound to other weights
                task_id = int(name) if name.isdigit() else self.names.next_id(
                    {*registered, *retiring, *tuple(self.engine.registry.bindings)})
            elif task_id < 1 or task_id in registered or task_id in retiring:
                raise RequestError(f"lora_int_id {task_id} is not a free positive task id", param="lora_request")
            await run_in_threadpool(self.runtime.register_adapter, task_id, adapter)
            self.names.add(name, task_id, directory.relative)
        return task_id

    async def unload_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        """vLLM's unload; every outcome, refusals included, gets an access line."""
        try:
            task_id = await self._unload_adapter(body)
        except BdLoraError as err:
            log_adapter_call("unload_lora_adapter", body.lora_name, self.names.id_of(body.lora_name), "rejected",
                             error=log_text(err))
            raise
        log_adapter_call("unload_lora_adapter", body.lora_name, task_id, "unloaded")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _unload_adapter(self, body: UnloadLoRAAdapterRequest) -> int:
        self._loading_allowed()
        name = body.lora_name
        if name == self.names.base or name in self.names.aliases:
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
        return task_id  # its names go when it leaves the ranks (`registered`)


def _validation_message(errors, skip: int = 1) -> str:
    """One line from pydantic's errors; `skip` leading location parts (FastAPI's "body")."""
    parts = []
    for e in errors[:3]:
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        where = ".".join(str(x) for x in e.get("loc", ())[skip:])
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request body: " + "; ".join(parts)


def validate_body(model: type[pydantic.BaseModel], raw: bytes):
    """A request body as `model`: JSON checked by parse_json, fields by pydantic; a one-line 400 otherwise."""
    doc = parse_json(raw)
    try:
        return model.model_validate(doc)
    except pydantic.ValidationError as err:
        raise RequestError(_validation_message(err.errors(include_url=False, include_input=False), skip=0)) from None


def create_app(server: OpenAIServer, metrics: Metrics | None = None) -> FastAPI:
    """`metrics`: the server's, counted here and answered on /metrics (a fresh one when None)."""
    app = FastAPI(title="trtllm-bdlora OpenAI-compatible API")
    metrics = metrics if metrics is not None else Metrics()

    @app.exception_handler(BdLoraError)
    async def openai_error(request: Request, err: BdLoraError):
        return JSONResponse(error_body(err), status_code=err.status.http)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):  # as vLLM: 400, not FastAPI's 422
        return JSONResponse(error_body(RequestError(_validation_message(err.errors()))), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        body = error_body(NotFoundError(str(err.detail)) if err.status_code == 404 else RequestError(str(err.detail)))
        body["error"]["code"] = err.status_code
        return JSONResponse(body, status_code=err.status_code)

    @app.get("/metrics")
    @app.get("/v1/metrics")
    async def metrics_text():  # on the event loop, as on --metrics-port
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

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

    # bodies are parsed on a text thread (server.parse), never on the event loop
    # every generation request is counted: a failure that leaves the handler here, the rest as it ends (Counted)
    @app.post("/v1/completions")
    async def completions(request: Request):
        with metrics.call(PROTOCOL) as request.state.call:
            body = await parse(request, CompletionRequest)
            max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's and vLLM's default (0 with echo)
            return await server.generate(request, body, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        with metrics.call(PROTOCOL) as request.state.call:
            body = await parse(request, ChatCompletionRequest)
            max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            return await server.generate(request, body, max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await server.load_adapter(await parse(request, LoadLoRAAdapterRequest))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await server.unload_adapter(await parse(request, UnloadLoRAAdapterRequest))

    return app
