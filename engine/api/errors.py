"""The API's one error shape, `{"error": {"code", "message", "field"}}`, for every failure.

`error_middleware` turns ApiError, aiohttp's own HTTP errors (404, 405, 413) and anything
unexpected into that shape; an unexpected error becomes a 500 `internal_error` whose details go
to the log only, never into the response.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["ApiError", "bad_request", "error_middleware", "error_response"]

log = logging.getLogger(__name__)

# aiohttp's own exceptions, by status, in our vocabulary.
_HTTP_CODES = {
    400: ("bad_request", "the request is malformed"),
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "method not allowed for this resource"),
    413: ("payload_too_large", "request body is larger than 65536 bytes"),
}


class ApiError(Exception):
    """An error response: status, machine-readable code, a message, the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.field, self.headers)


def bad_request(code: str, message: str, field: str | None = None) -> ApiError:
    return ApiError(400, code, message, field)


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "field": field}},
        status=status,
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason.lower()))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, message, headers=headers)
    except Exception:  # the API's last line: log it, answer a bare 500
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_response(500, "internal_error", "internal error; it has been logged")
