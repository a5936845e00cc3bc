"""Batch input lines in, result lines out: what the server's runner and `glmserve batch` share.

`scan_lines` reads an input file line by line and sorts each into a request (`Request`: its line number, custom_id,
url, body and where its bytes lie in the file) or a `LineError` that names the line and what is wrong. The checks
here are the cheap, structural ones (JSON, the line's fields, the url, a custom_id used twice); the body itself is
judged by the endpoint's own handler when the line runs, so a bad body fails exactly as it would online.

Result lines have OpenAI's batch output shape: `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`; a line that never reached an endpoint has `response: null` and `error: {"code", "message",
"line"}`.
"""

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from .models import InputLine

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")
PREFIX_CHARS = 2048  # how much of a prompt's start is kept to group requests that share it


@dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]
    offset: int  # where the line's bytes start in the file, and how many
    length: int

    @property
    def raw_body(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode()

    def ref(self) -> "RequestRef":
        return RequestRef(self.line, self.custom_id, self.offset, self.length, prompt_start(self.body))


@dataclass(frozen=True)
class RequestRef:
    """A request without its body: where to read it again (a batch's pending lines, held while it runs)."""

    line: int
    custom_id: str
    offset: int
    length: int
    prefix: str  # the prompt's first PREFIX_CHARS characters


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str


def parse_line(raw: bytes, line: int, urls: tuple[str, ...], offset: int = 0) -> Request | LineError:
    """One input line against the endpoints a request may name (`urls`)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return LineError(line, None, "invalid_json", f"line {line}: not valid JSON ({e})")
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) and custom_id else None
    try:
        parsed = InputLine.model_validate(data)
    except ValidationError as e:
        return LineError(line, custom_id, "invalid_request", f"line {line}: {_describe(e)}")
    if parsed.url not in urls:
        return LineError(
            line, custom_id, "invalid_url", f"line {line}: url {parsed.url!r} is not one of {', '.join(urls)}"
        )
    if parsed.body.get("stream"):
        return LineError(line, custom_id, "invalid_request", f"line {line}: body.stream: a batch line cannot stream")
    return Request(line, parsed.custom_id, parsed.url, parsed.body, offset, len(raw))


def _describe(error: ValidationError) -> str:
    """Every failure with its field's dotted path ("body: Field required"; a line's field may be named body, which
    `api.errors.from_validation_error` takes for FastAPI's location prefix)."""
    parts = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)


def scan_lines(source: BinaryIO, urls: tuple[str, ...], max_lines: int | None = None) -> Iterator[Request | LineError]:
    """Every non-blank line of `source`, parsed; a custom_id seen before on a valid line makes a later line an error.
    Raises `TooManyLines` past `max_lines` requests."""
    seen: set[str] = set()
    offset, count = 0, 0
    for number, raw in enumerate(source, 1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        count += 1
        if max_lines is not None and count > max_lines:
            raise TooManyLines(f"the input file has more than {max_lines} requests")
        item = parse_line(raw.rstrip(b"\r\n"), number, urls, start)
        if isinstance(item, Request):
            if item.custom_id in seen:
                item = LineError(
                    number,
                    item.custom_id,
                    "duplicate_custom_id",
                    f"line {number}: custom_id {item.custom_id!r} is used by an earlier line",
                )
            else:
                seen.add(item.custom_id)
        yield item


class TooManyLines(ValueError):
    pass


def read_request(path: Path, request_offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(request_offset)
        return f.read(length)


def prompt_start(body: dict[str, Any]) -> str:
    """The first PREFIX_CHARS characters of a request's prompt as text (chat: each message's role and text, in
    order; completions: the prompt): requests about one document share theirs."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{message.get('role')}>{content if isinstance(content, str) else ''}")
        text = "".join(parts)
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:PREFIX_CHARS]


def _line_id() -> str:
    return f"batch_req_{secrets.token_hex(16)}"


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """A line that reached its endpoint: 200 with the response body, or the endpoint's 4xx/5xx with its error body
    (that one goes to the error file)."""
    response = {"status_code": status_code, "request_id": f"req_{secrets.token_hex(16)}", "body": body}
    return {"id": _line_id(), "custom_id": custom_id, "response": response, "error": None}


def error_line(custom_id: str | None, code: str, message: str, line: int | None = None) -> dict[str, Any]:
    """A line that never reached an endpoint (malformed, expired)."""
    return {
        "id": _line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line},
    }
