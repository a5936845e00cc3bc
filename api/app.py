"""The FastAPI application: routes, API-key auth, a body-size limit and OpenAI-shaped errors around an
`OpenAIServer`.

What the API key covers: every /v1/* route; /metrics too when `metrics_need_api_key`; /openapi.json, when served
at all (`openapi`), whenever there is a key. /health stays open (load balancers and Serve probe it).
"""

import hmac
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import URL, Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, AuthenticationError, RequestTooLargeError
from .metrics import Stats
from .openai_server import OpenAIServer

log = logging.getLogger(__name__)
StatsSource = Callable[[], Awaitable[Stats]]
OPENAPI_PATH = "/openapi.json"


class _ApiKeyAuth:
    """'Authorization: Bearer KEY' on the guarded paths, as plain ASGI middleware (Starlette's `@app.middleware`
    costs a task group and two memory streams per request). The matching key's name goes into the request's state
    (`api_key_name`), for its quota."""

    def __init__(self, app: ASGIApp, keys: dict[str, str], exact: frozenset[str] = frozenset()):
        self.app = app
        self.keys = [(name, key.encode()) for name, key in keys.items()]
        self.exact = exact  # guarded beyond /v1/*

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = URL(scope=scope).path
            if path.startswith("/v1/") or path in self.exact:
                given = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ").strip().encode()
                # every key compared, in constant time each: the time taken says nothing about which one matched
                matches = [name for name, key in self.keys if hmac.compare_digest(given, key)]
                if not matches:
                    e = AuthenticationError("Incorrect API key provided.")
                    await JSONResponse(e.body(), status_code=e.status_code)(scope, receive, send)
                    return
                scope.setdefault("state", {})["api_key_name"] = matches[0]
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuse a body over `max_bytes` with a 413: at once when Content-Length says so, else as soon as the bytes
    received pass it (nothing beyond the limit is kept)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            e = self._error()
            await JSONResponse(e.body(), status_code=e.status_code)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # answered by the APIError handler
            return message

        await self.app(scope, limited, send)

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"the request body is larger than {self.max_bytes} bytes")


def create_app(
    server: OpenAIServer,
    api_keys: dict[str, str] | None = None,
    replica_stats: StatsSource | None = None,
    max_body_bytes: int = 16 << 20,
    metrics_need_api_key: bool = False,
    openapi: bool = False,
) -> FastAPI:
    """`api_keys`: name -> key; with any, /v1/* needs one of them. `replica_stats`, when given, returns every
    replica's latest stats: /metrics then reports the whole deployment (API totals, per-replica worker stats) rather
    than this process alone."""
    app = FastAPI(title="glmserve", docs_url=None, redoc_url=None, openapi_url=OPENAPI_PATH if openapi else None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        server.metrics.errored(e.status_code)
        return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if api_keys:  # added last, so it runs first: no body is read for a request without a key
        guarded = {OPENAPI_PATH} | ({"/metrics"} if metrics_need_api_key else set())
        app.add_middleware(_ApiKeyAuth, keys=api_keys, exact=frozenset(guarded))

    async def _respond(result) -> Response:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return Response(result.model_dump_json(), media_type="application/json")

    def key_name(request: Request) -> str | None:
        return getattr(request.state, "api_key_name", None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _respond(await server.chat(await request.body(), key_name(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(await server.completions(await request.body(), key_name(request)))

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(server.models().model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        replicas = await replica_stats() if replica_stats is not None else None
        return Response(server.metrics.render(replicas), media_type="text/plain; version=0.0.4")

    return app
