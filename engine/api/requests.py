"""Reading requests and writing responses, shared by the handlers: bodies, ids, JSON."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from engine.api.errors import ApiError, bad_request
from engine.api.validation import WEBHOOK_ID

__all__ = [
    "MAX_BODY",
    "delivery_id_of",
    "delivery_not_found",
    "json_response",
    "read_json",
    "read_optional_json",
    "webhook_id_of",
    "webhook_not_found",
]

MAX_BODY = 64 * 1024
DELIVERY_ID = re.compile(r"dlv_[a-z0-9]{1,64}")  # use with fullmatch, like WEBHOOK_ID


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY} bytes")


async def _read_body(request: web.Request) -> bytes:
    """The raw body: 413 over MAX_BODY (declared or streamed), 415 unless JSON."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _too_large()
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    chunks: list[bytes] = []
    size = 0
    # Counted as it streams in: a chunked body has no Content-Length to trust.
    while chunk := await request.content.read(MAX_BODY + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large()
    return b"".join(chunks)


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request("invalid_json", f"request body is not valid JSON: {exc}") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body: 413 over MAX_BODY, 415 unless JSON, 400 if empty or malformed."""
    raw = await _read_body(request)
    if not raw.strip():
        raise bad_request("invalid_json", "request body is empty; expected a JSON object")
    return _parse(raw)


async def read_optional_json(request: web.Request) -> dict[str, Any]:
    """The JSON object body of a POST whose body may be empty; {} when there is none.

    No body at all (whatever the Content-Type says) is empty; a body that is there must be a
    JSON object sent as application/json, within MAX_BODY.
    """
    if not request.body_exists:
        return {}
    raw = await _read_body(request)
    if not raw:  # a chunked body of no chunks
        return {}
    body = _parse(raw)
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "request body must be a JSON object")
    return body


def webhook_id_of(request: web.Request) -> str:
    """The `{id}` of the path, or 404 when it cannot be a webhook id."""
    value = request.match_info["id"]
    if not WEBHOOK_ID.fullmatch(value):
        raise webhook_not_found(value)
    return value


def delivery_id_of(request: web.Request) -> str:
    """The `{deliveryId}` of the path, or 404 when it cannot be a delivery id."""
    value = request.match_info["deliveryId"]
    if not DELIVERY_ID.fullmatch(value):
        raise delivery_not_found(value)
    return value


def webhook_not_found(webhook_id: str) -> ApiError:
    return ApiError(404, "not_found", f"webhook {webhook_id[:80]} not found")


def delivery_not_found(delivery_id: str) -> ApiError:
    return ApiError(404, "not_found", f"delivery {delivery_id[:80]} not found")
