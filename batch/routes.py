"""/v1/files and /v1/batches in OpenAI's shapes, as a FastAPI router over a `BatchStore`, and `attach_batch_api`,
which adds them, the runner and the online-load counter to the API app of a replica.

Errors are OpenAI's (`api.errors`): a 400 naming the field, 404 for an unknown id, 409 for a cancel that cannot be,
413 for a file over the limit, 429 when too many batches are queued. Everything a client sends is checked before it
is stored: the multipart form (one file, a few small fields), the purpose, the filename's length, query parameters.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from glmserve.api.errors import (
    APIError,
    InvalidRequestError,
    RateLimitError,
    RequestTooLargeError,
    from_validation_error,
)

from .models import COMPLETION_WINDOWS, MAX_FILENAME, BatchList, CreateBatch, FileDeleted, FileList
from .options import BatchOptions
from .runner import BatchRunner, OnlineLoad, OnlineLoadMiddleware
from .store import BatchStore, StoreError

log = logging.getLogger(__name__)
UPLOAD_PURPOSES = ("batch",)
MAX_FORM_FIELDS = 8
MAX_FIELD_BYTES = 4096


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


def _api_error(e: StoreError, param: str | None = None) -> APIError:
    if e.kind == "not_found":
        return NotFoundError(e.message, param=param)
    if e.kind == "conflict":
        return ConflictError(e.message)
    if e.kind == "too_large":
        return RequestTooLargeError(e.message, param="file")
    if e.kind == "limit":
        return RateLimitError(e.message, retry_after=60)
    return InvalidRequestError(e.message, param=param)


@contextlib.contextmanager
def _store_errors(param: str | None = None):
    try:
        yield
    except StoreError as e:
        raise _api_error(e, param) from None


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _limit(request: Request, default: int, most: int) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise InvalidRequestError(f"limit must be an integer from 1 to {most}", param="limit")
    return int(text)


def batch_router(store: BatchStore, runner: BatchRunner, options: BatchOptions) -> APIRouter:
    router = APIRouter(prefix="/v1")

    # ---- files ----
    @router.post("/files")
    async def create_file(request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
        except APIError:
            raise
        except Exception as e:  # starlette's MultiPartException and friends: a malformed form
            raise InvalidRequestError(f"the body must be multipart/form-data with a file and a purpose: {e}") from None
        async with _closing(form):
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise InvalidRequestError("purpose is required", param="purpose")
            if purpose not in UPLOAD_PURPOSES:
                raise InvalidRequestError(
                    f"purpose {purpose[:40]!r} is not supported; this server takes {', '.join(UPLOAD_PURPOSES)}",
                    param="purpose",
                )
            if not isinstance(upload, UploadFile):
                raise InvalidRequestError("file is required (a multipart file part)", param="file")
            filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME]
            with _store_errors("file"):
                record = await asyncio.to_thread(
                    store.create_file, purpose, filename, upload.file, options.max_file_bytes
                )
        log.info("file %s: %d bytes (%s)", record.id, record.bytes, purpose)
        return _json(record.to_api())

    @router.get("/files")
    async def list_files(request: Request) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be 'asc' or 'desc'", param="order")
        limit = _limit(request, 10_000, 10_000)
        records, more = await asyncio.to_thread(
            store.list_files, request.query_params.get("purpose"), limit, request.query_params.get("after"), order
        )
        data = [r.to_api() for r in records]
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return _json(FileList(data=data, first_id=first, last_id=last, has_more=more))

    @router.get("/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        with _store_errors("file_id"):
            return _json(store.get_file(file_id).to_api())

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        with _store_errors("file_id"):
            record = store.get_file(file_id)
            path = store.file_path(file_id)
        return FileResponse(path, media_type="application/octet-stream", filename=record.filename)

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        with _store_errors("file_id"):
            await asyncio.to_thread(store.delete_file, file_id)
        return _json(FileDeleted(id=file_id))

    # ---- batches ----
    @router.post("/batches")
    async def create_batch(request: Request) -> Response:
        try:
            body = CreateBatch.model_validate_json(await request.body())
        except ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors()):
                raise InvalidRequestError("the body is not valid JSON") from None
            raise from_validation_error(e) from None
        if body.endpoint not in runner.endpoints:
            raise InvalidRequestError(
                f"endpoint {body.endpoint!r} is not supported; use one of {', '.join(runner.endpoints)}",
                param="endpoint",
            )
        with _store_errors("input_file_id"):
            record = await asyncio.to_thread(
                store.create_batch,
                body.input_file_id,
                body.endpoint,
                COMPLETION_WINDOWS[body.completion_window],
                body.completion_window,
                body.metadata,
                options.max_active_batches,
                runner.served_by,
            )
        runner.poke()
        log.info("batch %s: created on %s (%s)", record.id, record.input_file_id, record.endpoint)
        return _json(record.to_api())

    @router.get("/batches")
    async def list_batches(request: Request) -> Response:
        limit = _limit(request, 20, 100)
        records, more = await asyncio.to_thread(store.list_batches, limit, request.query_params.get("after"))
        data = [r.to_api() for r in records]
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return _json(BatchList(data=data, first_id=first, last_id=last, has_more=more))

    @router.get("/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        with _store_errors("batch_id"):
            return _json((await asyncio.to_thread(store.get_batch, batch_id)).to_api())

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        with _store_errors("batch_id"):
            record = await asyncio.to_thread(store.request_cancel, batch_id)
        runner.poke()
        return _json(record.to_api())

    return router


@contextlib.asynccontextmanager
async def _closing(form: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await form.close()


def attach_batch_api(app: FastAPI, server: Any, options: BatchOptions | None = None) -> BatchRunner | None:
    """Serve /v1/files and /v1/batches on `app` from the store `options` names, and run its batches through
    `server` (an `OpenAIServer`: its own chat and completions handlers) below the priority of online requests.

    The runner starts with the app (its lifespan; call `runner.start()` from the event loop when the app is served
    without one) and resumes the batches an earlier process left unfinished."""
    options = options or BatchOptions()
    if not options.enabled:
        return None
    store = BatchStore(options.store_path)
    load = OnlineLoad(options.idle_s)
    handlers = {"/v1/chat/completions": server.chat, "/v1/completions": server.completions}
    runner = BatchRunner(store, handlers, options, load, served_by=server.model_name)
    app.include_router(batch_router(store, runner, options))
    app.add_middleware(OnlineLoadMiddleware, load=load)
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with outer(a) as state:
            runner.start()
            try:
                yield state
            finally:
                await runner.stop()

    app.router.lifespan_context = lifespan
    return runner
