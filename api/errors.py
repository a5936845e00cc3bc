"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status and headers.

The server raises an `APIError` subclass (or converts a pydantic `ValidationError` with `from_validation_error`) and
answers with `status_code`, `headers` and `body()`. OpenAI's SDKs pick their exception class from the status
and show `message`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error a client sees. Subclasses fix status and type; this base is a 500 for failures of our own."""

    status_code = 500
    error_type = "internal_server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.error_type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str | None):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class _RetryLaterError(APIError):
    """An error the client should retry after `retry_after` seconds (sent as the Retry-After header)."""

    def __init__(self, message: str, retry_after: float, *, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class RateLimitError(_RetryLaterError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(_RetryLaterError):
    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "overloaded"


def from_validation_error(error: ValidationError | Sequence[Mapping[str, Any]]) -> InvalidRequestError:
    """A 400 from a pydantic ValidationError, or from FastAPI's `RequestValidationError.errors()` (whose locations
    start with "body"). `param` is the dotted path of the first failing field ("max_tokens", "messages.0.role");
    the message lists every failure."""
    errors = error.errors(include_url=False) if isinstance(error, ValidationError) else list(error)
    if not errors:
        return InvalidRequestError("invalid request")
    described = []
    for item in errors:
        path = _dotted_path(item.get("loc", ()))
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        described.append(f"{path}: {message}" if path else message)
    return InvalidRequestError("; ".join(described), param=_dotted_path(errors[0].get("loc", ())) or None)


def _dotted_path(location: Sequence[Any]) -> str:
    parts = list(location)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(part) for part in parts)
