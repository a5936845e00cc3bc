"""The FastAPI application: routes, API-key auth and OpenAI-shaped errors around an `OpenAIServer`."""

import hmac
from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError, AuthenticationError
from .openai_server import OpenAIServer

StatsSource = Callable[[], Awaitable[Mapping[str, Mapping[str, float]]]]


def create_app(server: OpenAIServer, api_key: str | None = None, worker_stats: StatsSource | None = None) -> FastAPI:
    app = FastAPI(title="glmserve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                e = AuthenticationError("Incorrect API key provided.")
                return JSONResponse(e.body(), status_code=e.status_code)
        return await call_next(request)

    async def _respond(result) -> Response:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _respond(await server.chat(await request.body()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(await server.completions(await request.body()))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(server.models().model_dump(mode="json"))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if worker_stats is not None:
            server.metrics.workers.latest = dict(await worker_stats())
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
