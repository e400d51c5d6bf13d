"""Rank 0's serving loop: a bounded inbox, continuous batching, adapters registered on first use.

Requests arrive from server threads through `submit`; one engine thread owns the engine (and so every
collective), admits requests between steps, and reports through callbacks: `Request.on_token(token)` after
every token (with `request.finish_reason` already set when it is the last one) and `Submission.on_done(ids,
error)` once, the error a typed `BdLoraError` (errors.py) or None. Callbacks run on the engine thread and must
not block. When idle it sends an empty plan every HEARTBEAT_S (the ranks trim their heaps on the first), so a rank
that died is noticed within a second, by the connection it closed. A rank that stops, hangs or is cut off leaves
the engine thread blocked in a collective: the rank watch (distributed/liveness.py) calls `rank_lost` from its own
thread, which fails every pending and queued request with a retryable `LostRankError` and turns readiness off,
whatever the engine thread is doing.

Fault isolation: an exception raised on rank 0 while no plan is out to the other ranks (admitting a request,
handling one request's result, a callback) fails that request alone, with a one-line error; only one raised
while the ranks execute a plan (`Engine.in_collective`: the ranks may now disagree) stops the server. Every
request ends with one access-log line (`logs.py`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trtllm_bdlora.distributed.comm import RankLostError
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.plan import StepPlan
from trtllm_bdlora.engine.request import Request
from trtllm_bdlora.engine.scheduler import Scheduler, one_line
from trtllm_bdlora.errors import (
    BdLoraError,
    LostRankError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
    ServerBusyError,
    ServerFailedError,
    ServerUnavailableError,
    as_error,
    log_text,
)
from trtllm_bdlora.logs import log_event, log_request

HEARTBEAT_S = 1.0
SERVER_FAILED = "server failed: a rank stopped or a collective failed (the server log says why)"
RANK_LOST = "server unavailable: a rank of this server was lost (the server log says which)"
log = logging.getLogger("trtllm_bdlora.runtime")
adapter_log = logging.getLogger("trtllm_bdlora.adapters")


@dataclass
class Submission:
    request: Request
    lora_weights: np.ndarray | None = None
    lora_config: np.ndarray | None = None
    on_done: Callable[[list[int] | None, BdLoraError | None], None] = lambda ids, err: None
    model: str = "tensorrt_llm"  # the model the client called, for the access log
    finished: bool = False  # its access line is written and its caller told (once, whichever thread does it)


class _Control:
    """Work for the engine thread between steps (adapter registration), queued in the inbox like a request."""

    def __init__(self, action: Callable[[], None]):
        self.action, self.error = action, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.action()
        except BdLoraError as err:
            self.error = err
        except Exception as err:  # a collective failed: the runtime fails as for a step
            self.error = ServerFailedError(SERVER_FAILED, detail=one_line(err))
            raise
        finally:
            self.done.set()

    def on_done(self, ids, error: BdLoraError | None) -> None:  # the runtime failed or stopped before running it
        self.error = error
        self.done.set()


class Runtime:
    def __init__(self, engine: Engine, max_batch_size: int = 16, max_queue: int = 256,
                 max_num_tokens: int | None = None, allow_startup_unload: bool = False):
        self.engine = engine
        self.allow_startup_unload = allow_startup_unload
        self.scheduler = Scheduler(engine, max_batch_size, max_num_tokens=max_num_tokens)
        self.max_queue = max_queue
        self.inbox: queue.Queue[Submission] = queue.Queue(maxsize=max_queue)
        self.pending: dict[int, Submission] = {}
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.failure: str | None = None
        self.failure_lost_contact = False  # the failure is a collective that lost another rank (a consequence)
        self.lost: LostRankError | None = None  # set by `rank_lost`: a rank hung or died, nothing more is served
        self.cut_reason: str | None = None  # set by `cut`: fail what is left and stop
        self._next = 0
        self.retiring: set[int] = set()  # unregistered adapters still used by queued or running requests
        self._lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="bdlora-engine", daemon=True)

    def start(self) -> Runtime:
        self.thread.start()
        return self

    @property
    def healthy(self) -> bool:
        return self.failure is None and not self.stopped.is_set()

    def _check_accepting(self) -> None:
        if self.lost is not None:
            raise LostRankError(str(self.lost), detail=self.lost.detail)
        if self.failure is not None:
            raise ServerFailedError(SERVER_FAILED, detail=self.failure)
        if self.stopping.is_set() or not self.healthy:
            raise ServerUnavailableError("server is shutting down")

    def submit(self, sub: Submission) -> None:
        """Queue a request, or refuse it (ServerBusyError: RESOURCE_EXHAUSTED / 429) when `max_queue` requests
        already wait anywhere (the inbox, or the scheduler's waiting list): one bound for every front end."""
        self._check_accepting()
        sub.request.times_ns.setdefault("arrival", time.time_ns())
        with self._lock:
            waiting = self.queued
            if waiting < self.max_queue:
                sub.request.index = self._next
                self._next += 1
                try:
                    self.inbox.put_nowait(sub)
                    return
                except queue.Full:  # adapter registrations waiting in the inbox took the last places
                    pass
        raise ServerBusyError(f"Exceeds maximum queue size: {waiting} requests already waiting (--max-queue "
                              f"{self.max_queue}), retry later")

    @staticmethod
    def cancel(request: Request, reason: str = "cancelled") -> None:
        """Stop generating for `request`: it leaves the batch at the next step, with finish_reason `reason` (the
        access line's outcome): "cancelled", or "stop_words" where the caller matched a stop string itself."""
        request.cancel_reason = reason
        request.cancelled = True

    @property
    def queued(self) -> int:
        """Requests submitted and not yet running (read from any thread: the engine thread moves a request from
        the inbox to the waiting list, and from there into the batch)."""
        return self.inbox.qsize() + len(self.scheduler.waiting)

    @property
    def active(self) -> int:
        return len(self.pending)

    def register_adapter(self, task_id: int, adapter) -> None:
        """Register a loaded Adapter under `task_id` on every rank, between engine steps, as the `--adapter` ones
        (pinned unless --no-pin-adapters; may evict unpinned adapters no pending request uses)."""
        def register():
            if task_id in self.retiring:
                raise RequestError(f"lora_task_id {task_id} is being unloaded: requests that named it are still "
                                   "pending; it can be registered again when they finish")
            if task_id in self.engine.pool:
                raise RequestError(f"lora_task_id {task_id} is already registered")
            self.engine.load_adapter(task_id, adapter, self._in_use())

        self._control(register)

    def unregister_adapter(self, task_id: int) -> None:
        """Refuse new requests for `task_id` at once; it leaves every rank when no pending request uses it, and only
        then may the id be registered again with other weights. `--adapter` ids stay unless
        `allow_startup_unload`."""
        def retire():
            if task_id not in self.engine.pool or task_id in self.retiring:
                raise NotFoundError(f"unknown lora_task_id {task_id}")
            if self.engine.registry.source(task_id) == "--adapter" and not self.allow_startup_unload:
                raise PermissionDeniedError(f"lora_task_id {task_id} was registered at start-up (--adapter) and cannot "
                                            "be unloaded (--allow-startup-adapter-unload)")
            self.retiring.add(task_id)
            log_event(adapter_log, "adapter unloading", task_id=task_id,
                      pending_requests=sum(s.request.adapter == task_id for s in self.pending.values()))
            self._release_retired()

        self._control(retire)

    def _control(self, action: Callable[[], None]) -> None:
        self._check_accepting()
        item = _Control(action)
        try:
            self.inbox.put(item, timeout=60)
        except queue.Full:
            raise ServerBusyError(f"Exceeds maximum queue size: {self.inbox.maxsize} requests already queued, "
                                  "retry later") from None
        while not item.done.wait(0.5):
            if self.lost is not None:
                raise LostRankError(str(self.lost), detail=self.lost.detail)
            if self.stopped.is_set():
                raise ServerUnavailableError("server is shutting down")
        if item.error:
            raise item.error

    def stop(self, timeout: float | None = None) -> bool:
        """Finish in-flight and queued requests, then stop every rank; whether that happened within `timeout`."""
        self.stopping.set()
        return self.stopped.wait(timeout)

    def cut(self, reason: str) -> None:
        """Fail every pending and queued request with `reason` at the next step boundary, then stop every rank."""
        self.cut_reason = reason
        self.stopping.set()

    def rank_lost(self, cause: str, detail: str | None = None) -> None:
        """A rank stopped responding (the rank watch's thread calls this; the engine thread is most likely blocked
        in a collective with it): from now on readiness is off and every request, pending, queued or new, gets
        a retryable UNAVAILABLE naming `cause` (`detail`, e.g. its PID and host, goes to the log and the exit
        line, not to clients)."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = LostRankError(f"server unavailable: {cause}", detail=detail)
            self.failure = detail or cause
        log.critical("server unavailable: %s", self.failure)
        self.stopping.set()
        self._fail_all(self.lost)

    # engine thread ------------------------------------------------------------
    def _finish(self, sub: Submission, outcome: str, error: BdLoraError | None = None) -> None:
        """Log the request's access line and tell its caller, once; a failing callback fails nobody else."""
        with self._finish_lock:
            if sub.finished:
                return
            sub.finished = True
        log_request(sub.request, sub.model, outcome, None if error is None else log_text(error))
        try:
            sub.on_done(None if error else sub.request.output_ids, error)
        except Exception:
            log.exception("on_done callback of request %s failed", sub.request.id)

    def _admit(self, sub: Submission | _Control) -> None:
        if isinstance(sub, _Control):
            sub.run()
            return
        req = sub.request
        if self.lost is not None:
            self._finish(sub, "error", self.lost)
            return
        if req.abandoned:  # cancelled while queued: never admitted, its adapter never registered
            req.finish_reason = req.cancel_reason
            self._finish(sub, req.finish_reason)
            return
        try:  # the host LoRA cache never evicts the adapter of a request still pending
            if req.adapter in self.retiring:
                raise NotFoundError(f"unknown lora_task_id {req.adapter}: it is being unloaded")
            self.engine.admit_adapter(req.adapter, sub.lora_weights, sub.lora_config, self._in_use())
        except BdLoraError as err:
            self._finish(sub, "rejected", err)
            return
        except Exception as err:
            if self.engine.in_collective:
                raise
            self._finish(sub, "error", as_error(err, "internal error while admitting this request"))
            return
        sub.lora_weights = sub.lora_config = None  # registered: the request need not keep them (as TensorRT-LLM)
        self.pending[req.index] = sub
        self.scheduler.add(req)

    def _in_use(self) -> set[int]:
        return {s.request.adapter for s in self.pending.values()} - {None}

    def _release_retired(self) -> None:
        free = sorted(self.retiring - self._in_use())
        if free:
            self.engine.lead(StepPlan(evict=free))
            self.retiring -= set(free)
            for task_id in free:
                self.engine.registry.unbind(task_id)
                log_event(adapter_log, "adapter unloaded", task_id=task_id)

    def _drain_inbox(self, block: bool) -> None:
        try:
            sub = self.inbox.get(timeout=HEARTBEAT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        self._admit(sub)
        while True:
            try:
                self._admit(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            last = time.monotonic()
            while True:
                if self.lost is not None:  # the blocked collective returned after all: nothing more runs
                    self._fail_all(self.lost)
                    return
                if self.cut_reason is not None:
                    self._fail_all(ServerUnavailableError(self.cut_reason))
                    break
                idle = not self.scheduler.busy
                if idle and self.stopping.is_set() and self.inbox.empty():
                    break
                self._drain_inbox(block=idle)
                if self.scheduler.busy:
                    for req, _ in self.scheduler.step():
                        self._finish(self.pending.pop(req.index), req.finish_reason or "error", req.error)
                    if self.retiring:
                        self._release_retired()
                    last = time.monotonic()
                elif time.monotonic() - last >= HEARTBEAT_S:
                    self.engine.lead(StepPlan())
                    last = time.monotonic()
            self.scheduler.flush()
            self.engine.lead(None)
        except Exception as err:  # a rank died or a collective failed: fail everything, report, stop
            if isinstance(err, RankLostError) and err.silent is not None:  # as if the rank watch's report came first
                self.rank_lost(err.silent.summary, str(err.silent))
            with self._lock:  # the rank watch already named the cause (rank_lost): this is its consequence
                if self.lost is None:
                    self.failure = one_line(err)
            log.critical("server failed: %s", one_line(err))
            self.failure_lost_contact = isinstance(err, RankLostError)  # another rank died: retry elsewhere
            if self.failure_lost_contact:  # a host lost (comm.py describe_loss): clients may know which
                self._fail_all(LostRankError(f"server unavailable: {err.lost}" if err.lost else RANK_LOST,
                                             detail=self.failure))
            else:
                self._fail_all(ServerFailedError(SERVER_FAILED, detail=self.failure))
        finally:
            self.stopped.set()

    def _fail_all(self, error: BdLoraError) -> None:
        """Fail every pending and queued request (and control item) with `error`."""
        for sub in list(self.pending.values()):
            sub.request.cancelled = True
            self._finish(sub, "error", error)
        if threading.current_thread() is self.thread:
            self.pending.clear()
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            if isinstance(item, _Control):
                item.on_done(None, error)
            else:
                self._finish(item, "error", error)
