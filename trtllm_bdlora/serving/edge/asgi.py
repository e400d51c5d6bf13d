"""ASGI layers every HTTP front end gets (`edge_app`): CORS (`--allowed-origins`), API keys (`--api-key`, health
exempt), one body limit (`--max-body-bytes`, refused from Content-Length before reading, and while streaming), and
quiet handling of clients that leave while their body is read. Plus `cancel_on_disconnect`, which a handler wraps
around the wait for its answer so a client that leaves cancels its request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import asynccontextmanager

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from trtllm_bdlora.errors import BdLoraError, BodyTooLargeError, InternalError
from trtllm_bdlora.serving.edge.auth import ApiKeys
from trtllm_bdlora.serving.edge.events import log
from trtllm_bdlora.serving.edge.settings import EdgeSettings

Render = Callable[[BdLoraError], dict]
CORS_HEADERS = ["authorization", "content-type", "inference-header-content-length"]


def header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name), None)


async def send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body, ensure_ascii=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Shield:
    """Whatever escapes the application ends here. A client that left (or was dropped at --request-body-timeout)
    while its body was read: nothing to answer, nothing to log. Anything else: logged with its traceback, at most
    once per interval (events.py), never to the client, who gets a plain INTERNAL error if nothing was sent yet."""

    def __init__(self, app, render: Render):
        self.app, self.render = app, render

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            pass
        except Exception as err:  # noqa: BLE001 - a bug must not take the listener's log or the client's view down
            log.error("unexpected error while answering %s %s: %s", scope.get("method"), scope.get("path"),
                      type(err).__name__, exc_info=err)
            if not started:
                await send_json(send, 500, self.render(InternalError("internal error while answering this request")))


class BodyLimit:
    """413 for a body over `max_bytes`: from Content-Length before anything is read, else as soon as the streamed
    body passes it (the application then reads a disconnect, and whatever it sends is dropped)."""

    def __init__(self, app, max_bytes: int, render: Render):
        self.app, self.max_bytes, self.render = app, max_bytes, render

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_json(send, 413, self.render(BodyTooLargeError(
                f"request body of {declared} bytes is over the {self.max_bytes}-byte limit (--max-body-bytes)")))
        received, started, answered = 0, False, False

        async def limited():
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await send_json(send, 413, self.render(BodyTooLargeError(
                            f"request body is over the {self.max_bytes}-byte limit (--max-body-bytes)")))
                    answered = True
            return {"type": "http.disconnect"} if answered else message

        async def tracked(message):
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, tracked)


class RequireKey:
    """401 for any request without a valid API key, but health paths and CORS preflights."""

    def __init__(self, app, keys: ApiKeys, is_exempt: Callable[[str], bool], render: Render):
        self.app, self.keys, self.is_exempt, self.render = app, keys, is_exempt, render

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and not self.is_exempt(scope["path"]):
            error = self.keys.refusal(header(scope, b"authorization"))
            if error is not None:
                return await send_json(send, 401, self.render(error), ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)


def edge_app(app, settings: EdgeSettings, is_health: Callable[[str], bool], render: Render, auth: bool = True):
    """`app` behind the edge's layers, outermost first: CORS, API key, body limit, the shield."""
    app = BodyLimit(Shield(app, render), settings.max_body_bytes, render)
    if auth and settings.api_keys:
        app = RequireKey(app, ApiKeys(settings.api_keys), is_health, render)
    if settings.allowed_origins:
        app = CORSMiddleware(app, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=CORS_HEADERS, expose_headers=["inference-header-content-length"], max_age=600)
    return app


async def _wait_disconnect(receive, on_gone: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


@asynccontextmanager
async def cancel_on_disconnect(request, on_gone: Callable[[], None]):
    """Within the block, `on_gone()` runs as soon as the client disconnects (the request's body must have been
    read: the next ASGI message is then the disconnect)."""
    task = asyncio.create_task(_wait_disconnect(request.receive, on_gone))
    try:
        yield
    finally:
        task.cancel()
