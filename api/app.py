"""The FastAPI application: routes, API-key auth and OpenAI-shaped errors around an `OpenAIServer`."""

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import URL, Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, AuthenticationError
from .metrics import Stats
from .openai_server import OpenAIServer

StatsSource = Callable[[], Awaitable[Stats]]


class _ApiKeyAuth:
    """'Authorization: Bearer KEY' on /v1/*, as plain ASGI middleware (Starlette's `@app.middleware` costs a task
    group and two memory streams per request)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and URL(scope=scope).path.startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key):
                e = AuthenticationError("Incorrect API key provided.")
                await JSONResponse(e.body(), status_code=e.status_code)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: OpenAIServer, api_key: str | None = None, replica_stats: StatsSource | None = None) -> FastAPI:
    """`replica_stats`, when given, returns every replica's latest stats: /metrics then reports the whole
    deployment (API totals, per-replica worker stats) rather than this process alone."""
    app = FastAPI(title="glmserve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)

    if api_key:
        app.add_middleware(_ApiKeyAuth, api_key=api_key)

    async def _respond(result) -> Response:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _respond(await server.chat(await request.body()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(await server.completions(await request.body()))

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
