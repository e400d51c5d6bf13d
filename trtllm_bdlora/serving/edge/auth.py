"""API keys (`--api-key`, or API_KEY), as vLLM's `--api-key`: every request but health must carry
`Authorization: Bearer KEY` (gRPC: the `authorization` metadata entry, which `tritonclient`'s `headers=` sends),
compared in constant time; several keys may be valid at once (rotation)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import grpc

from trtllm_bdlora.errors import UnauthenticatedError

GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_HEALTH = frozenset(GRPC_SERVICE + m for m in ("ServerLive", "ServerReady", "ModelReady"))
MISSING = "missing API key: send the header `Authorization: Bearer <key>`"
WRONG = "invalid API key"


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is one of the keys: every key is compared, each in constant time (the digests have
        one length, so neither the keys' lengths nor which key matched shows in the time taken)."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for key in self.digests:
            matched |= hmac.compare_digest(digest, key)
        return matched

    def refusal(self, authorization: str | None) -> UnauthenticatedError | None:
        """None when the `Authorization` value carries a valid key, else the error to answer with."""
        if not authorization:
            return UnauthenticatedError(MISSING)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return UnauthenticatedError(MISSING)
        return None if self.accepts(token.strip()) else UnauthenticatedError(WRONG)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every call without a valid key but the health ones (ServerLive, ServerReady, ModelReady)."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in GRPC_HEALTH:
            return handler
        authorization = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        error = self.keys.refusal(authorization if isinstance(authorization, str) else None)
        if error is None:
            return handler

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
