"""The one place where domain errors become HTTP responses: one status per error class (most specific class wins)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from retrieval.errors import (
    BadImage,
    BadInput,
    BadQuery,
    DatasetError,
    EncoderUnavailable,
    IndexCorrupt,
    IndexEncoderMismatch,
    IndexNotFound,
    Overloaded,
    RetrievalError,
    UnknownId,
)

log = logging.getLogger("service.errors")


class PayloadTooLarge(BadInput):
    """A request body or upload is over its limit."""


class Unauthorized(RetrievalError):
    """A required API key is missing or wrong."""


class RateLimited(Overloaded):
    """This client spent its token bucket."""


class NotReady(RetrievalError):
    """The service is starting or shutting down."""


#: Error class -> HTTP status. Looked up along the class's MRO, so subclasses may refine their parent's status.
STATUS: dict[type[RetrievalError], int] = {
    BadQuery: 422,
    BadImage: 422,
    PayloadTooLarge: 413,
    BadInput: 422,
    UnknownId: 404,
    IndexNotFound: 404,
    IndexCorrupt: 422,
    IndexEncoderMismatch: 409,
    Unauthorized: 401,
    RateLimited: 429,
    Overloaded: 429,
    NotReady: 503,
    EncoderUnavailable: 503,
    DatasetError: 500,
    RetrievalError: 500,
}


def status_for(exc: RetrievalError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_body(exc: Exception) -> dict[str, str]:
    """``{"error": "<ClassName>", "detail": "<message>"}`` (schema: :class:`service.schemas.ErrorResponse`)."""
    return {"error": type(exc).__name__, "detail": str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])}


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetrievalError)
    status = status_for(exc)
    headers = {}
    if status == 429:
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "API-Key"
    if status >= 500:
        log.error("request failed", extra={"path": request.url.path, "error": type(exc).__name__, "detail": str(exc)})
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (``detail``: list of ``{loc, msg, type}``) without echoing the input back: inputs can be
    large (a 10,000-character query) or not JSON-serialisable (``NaN`` parsed from a body), which would turn a
    client error into a 500."""
    assert isinstance(exc, RequestValidationError)
    detail = [{"loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())], "msg": str(e.get("msg")),
               "type": str(e.get("type"))} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Register one handler per domain error class, and the request-validation handler."""
    for cls in STATUS:
        app.add_exception_handler(cls, _handle)
    app.add_exception_handler(RequestValidationError, _validation)
