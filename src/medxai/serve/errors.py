"""Every answer other than 200 as ``{"error": code, "detail": words}``, built in ONE place (:func:`error_response`).

That place also keeps the answers free of the server's files: whatever text an exception carries (a reader's reason,
a configuration error, a validation message echoing the input), absolute paths in it are replaced by ``<path>``
before it leaves the process. The exception handlers map each kind of failure to its status; an unexpected one is a
500 that says only "internal error" and a reference (:func:`unexpected_error`), with the traceback in the server log
under that reference.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medxai.errors import ConfigError, ImageTooLargeError, InvalidImageError, scrub_paths
from medxai.serve.batcher import QueueFullError

__all__ = ["ANSWER", "RETRY_AFTER_S", "ServiceError", "error_response", "install_error_handlers",
           "queue_full", "scrub_paths", "status_code_name", "unexpected_error"]

logger = logging.getLogger(__name__)

#: Scope key: the :class:`ServiceError` a request was answered with (the gate's audit row and log line read it).
ANSWER = "medxai.answer"
RETRY_AFTER_S = 1  # what a refusal for load (queue full, busy, too many requests) asks to wait

class ServiceError(Exception):
    """An answer other than 200: status, error code, words for the caller, extra headers."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def error_response(scope, error: ServiceError) -> JSONResponse:
    """The JSON answer of ``error`` (its detail scrubbed of paths), noted in ``scope`` for the audit log."""
    error.detail = scrub_paths(error.detail)
    scope[ANSWER] = error
    return JSONResponse({"error": error.error, "detail": error.detail}, status_code=error.status,
                        headers=error.headers)


def queue_full(detail: str) -> ServiceError:
    return ServiceError(503, "queue_full", detail, {"Retry-After": str(RETRY_AFTER_S)})


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "upload_too_large", 415: "unsupported_media_type", 422: "validation_error"}


def status_code_name(status: int) -> str:
    """The error code of an HTTP status nothing more specific named."""
    return _STATUS_CODES.get(status, "internal" if status >= 500 else "error")


#: What a route's failure answers (never a 500 for bad input); anything else is unexpected: a 500.
_EXPECTED = (ServiceError, InvalidImageError, QueueFullError, asyncio.TimeoutError, ConfigError)


def _error_of(error: Exception) -> ServiceError:
    """The answer an expected failure (one of ``_EXPECTED``) deserves."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, ImageTooLargeError):
        return ServiceError(413, "image_too_large", error.reason)
    if isinstance(error, InvalidImageError):
        return ServiceError(400, "invalid_image", error.reason)
    if isinstance(error, QueueFullError):
        return queue_full("too many requests are waiting; try again shortly")
    if isinstance(error, asyncio.TimeoutError):
        return ServiceError(504, "timeout", "the model did not answer in time (--timeout-s); try again")
    return ServiceError(400, "bad_request", str(error))  # ConfigError: an unknown target label, method...


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every expected failure of a route, of FastAPI's validation or of Starlette's parsing as
    :func:`error_response`. Unexpected ones reach the gate, which answers :func:`unexpected_error` (a handler for
    ``Exception`` would run in Starlette's outermost middleware, outside the gate, and re-raise to the server)."""

    async def expected(request: Request, error: Exception) -> JSONResponse:
        return error_response(request.scope, _error_of(error))

    for kind in _EXPECTED:
        app.add_exception_handler(kind, expected)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request.scope, ServiceError(422, "validation_error", _validation_detail(error)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = status_code_name(error.status_code)
        detail = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
        return error_response(request.scope, ServiceError(error.status_code, code, detail,
                                                          dict(error.headers or {})))


def unexpected_error(error: BaseException) -> ServiceError:
    """The 500 of an error nothing expected: logged with its traceback under a reference the answer gives."""
    reference = uuid.uuid4().hex[:12]
    logger.error("internal error (reference %s)", reference, exc_info=error)
    return ServiceError(500, "internal", f"internal error (reference {reference}); see the server log")
