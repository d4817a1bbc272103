"""Domain errors and the one handler that renders them.

Every error leaves the service as ``{"error": {"message", "type", "code"}}`` (OpenAI's envelope). Deep modules raise
the ``EmbedError`` subclasses below; they never raise ``HTTPException``. Unexpected exceptions are answered (500) and
logged once by the access-log middleware, which sees every request, not by a handler here.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.config import limit_hint

logger = logging.getLogger(__name__)


class EmbedError(Exception):
    """The base of every error a client is answered with: its HTTP status, OpenAI-style type and our code. A subclass
    names what differs: ``class QueueFull(EmbedError, status=429, type="rate_limit_error", code="queue_full")``."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None, code: str | None = None) -> None:
        super().__init_subclass__()
        cls.status = status or cls.status
        cls.type = type or cls.type
        cls.code = code or cls.code

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


# 400: the input itself is wrong.
class InvalidInput(EmbedError, status=400, type="invalid_request_error", code="invalid_input"): ...


class InvalidImage(InvalidInput, code="invalid_image"): ...


class UnsupportedImage(InvalidInput, code="unsupported_image"): ...


class UnsupportedInput(InvalidInput, code="unsupported_input"):
    """An input kind the model does not read (an image sent to a text-only service)."""


class InvalidHost(InvalidInput, code="invalid_host"):
    """A Host header the service does not answer to (a DNS-rebinding page, or a name not in allowed_hosts)."""


class InvalidRequestBody(EmbedError, status=422, type="invalid_request_error", code="invalid_request"):
    """The body does not match the route's schema (wrong types, missing fields, invalid JSON)."""


class NotFound(EmbedError, status=404, type="invalid_request_error", code="not_found"):
    """No route at that path (the framework's own 404 has the same envelope)."""


class PayloadTooLarge(EmbedError, status=413, type="invalid_request_error", code="payload_too_large"): ...


class ImageTooLarge(PayloadTooLarge, code="image_too_large"): ...


class TooManyItems(PayloadTooLarge, code="too_many_items"): ...


class Unauthorized(EmbedError, status=401, type="authentication_error", code="invalid_api_key"): ...


class AdminKeyRequired(EmbedError, status=403, type="permission_error", code="admin_key_required"):
    """The embedding key, sent to a route that only the admin key may call (sleep, wake)."""


class CrossOrigin(EmbedError, status=403, type="permission_error", code="cross_origin"):
    """A browser page of another origin (not in cors_origins) tried to post to the service."""


class BodyTimeout(EmbedError, status=408, type="invalid_request_error", code="body_timeout"):
    """The client did not send its whole request body in time."""


class HeaderTimeout(BodyTimeout, code="header_timeout"):
    """The client did not send its request line and headers in time (answered by the HTTP protocol)."""


class HeadersTooLarge(EmbedError, status=431, type="invalid_request_error", code="headers_too_large"): ...


class QueueFull(EmbedError, status=429, type="rate_limit_error", code="queue_full"): ...


# 500: the service failed this input, and would again (retrying does not help).
class NonFiniteVector(EmbedError, status=500, code="non_finite_vector"):
    """The model produced NaN or infinity for an input (a numerical overflow); the vector is never returned."""


# 503: the service cannot answer now; a client retries after Retry-After.
class RequestTimeout(EmbedError, status=503, code="timeout"): ...


class OutOfMemory(EmbedError, status=503, code="out_of_memory"):
    """A single item did not fit in device memory even alone."""


class NotReady(EmbedError, status=503, code="not_ready"): ...


class ModelChanged(EmbedError, status=503, code="model_changed"):
    """A wake found other weights in the model's folder than the ones loaded at start: they are never served under
    the old identity; a restart serves them, under their own."""


class Asleep(EmbedError, status=503, code="asleep"):
    """The model is held asleep on demand (its GPU lent to another program) until it is woken."""


class TooManyConnections(EmbedError, status=503, code="too_many_connections"): ...


def error_body(message: str, type_: str, code: str) -> dict[str, dict[str, str]]:
    return {"error": {"message": message, "type": type_, "code": code}}


def error_json(error: EmbedError) -> bytes:
    """The envelope as bytes, for the layers below the framework (middlewares, the HTTP protocol)."""
    return orjson.dumps(error_body(error.message, error.type, error.code))


def _response(
    request: Request, status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    response = JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        response.headers["X-Request-ID"] = request_id
    request.state.error_code = code
    return response


def _describe_validation_error(exc: RequestValidationError) -> str:
    # loc + msg only: pydantic's "input" would echo the client's (possibly huge) payload back.
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _classify_parse_error(detail: str) -> tuple[int, str]:
    """Starlette's multipart messages ("Too many files. Maximum number of files is 257.") -> status and code."""
    if detail.startswith(("Too many files", "Too many fields")):
        return 413, "too_many_items"
    if "exceeded maximum size" in detail:
        return 413, "payload_too_large"
    return 422, "invalid_request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EmbedError)
    async def _embed_error(request: Request, exc: EmbedError) -> JSONResponse:
        message = exc.message
        if exc.status == 500:
            # The service failed, not the client: the log has it with the request id, and so does the answer.
            request_id = getattr(request.state, "request_id", None)
            logger.error("%s: %s (request id %s)", exc.code, exc.message, request_id)
            message = f"{message}; see the server log for request id {request_id}"
        return _response(request, exc.status, message, exc.type, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = _describe_validation_error(exc)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body_not_json = any(tuple(err.get("loc", ())) == ("body",) for err in exc.errors()[:5])
        if body_not_json and "json" not in content_type:
            # FastAPI reads a body without a JSON content type as bytes, then reports a type error on them.
            message = f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'none'})"
        return _response(request, 422, message, "invalid_request_error", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, EmbedError):
            # FastAPI turns any error while it reads the body into "400 error parsing the body"; ours (413 from
            # the body-size limit) is the real answer.
            return await _embed_error(request, exc.__cause__)
        if exc.status_code == 400:
            # The framework's body parsers (multipart, JSON nesting): limits are 413, anything else a bad body.
            status, code = _classify_parse_error(str(exc.detail))
            message = str(exc.detail)
            if code == "too_many_items":
                limit = request.app.state.runtime.settings.max_items_per_request  # apps from create_app
                message = f"too many files or fields; the limit is {limit_hint('max_items_per_request', limit)}"
            return _response(request, status, message, "invalid_request_error", code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _response(request, exc.status_code, str(exc.detail), type_, code, getattr(exc, "headers", None))
