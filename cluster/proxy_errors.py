"""An OpenAI-shaped 503 from Ray Serve's HTTP proxy when a request fails before its replica answered.

When the decode replica serving a request dies (or the proxy cannot reach it), the proxy has nothing to send and
its web server falls back to a plain-text 500. This middleware, installed in the proxy (Serve reads
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, see `serve_env`), watches whether a response started; if the request
ends without one, it answers 503 `{"error": {...}}` with `Retry-After`, which OpenAI clients retry. Responses a
replica started are passed through untouched (a stream cut by a dying replica ends without `[DONE]`, which clients
report as an error).
"""

import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
_BODY = json.dumps(
    {
        "error": {
            "message": "the replica serving this request stopped before it answered; retry",
            "type": "service_unavailable_error",
            "param": None,
            "code": "replica_unavailable",
        }
    }
).encode()


class UnansweredAs503:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if not started:
                await _send_503(send)


async def _send_503(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BODY)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": _BODY})
    except Exception:  # the client is gone too
        log.debug("could not send the 503", exc_info=True)


def proxy_middlewares() -> list[Middleware]:
    """What `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names."""
    return [Middleware(UnansweredAs503)]
