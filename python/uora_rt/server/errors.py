"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Types are vLLM's (BadRequestError, NotFoundError, ...); `code` is the HTTP status. Validation
errors of the request body are 400 (as vLLM and OpenAI answer, not FastAPI's 422), with `param`
the offending field. An exception nobody expected is a 500 with an error body, logged with its
traceback; the server keeps serving.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("uora_rt.server")

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
         404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
         415: "UnsupportedMediaTypeError", 500: "InternalServerError",
         503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def _printable(text):
    """Text that survives UTF-8 encoding whatever a client sent (lone surrogates escaped)."""
    return None if text is None else str(text).encode("utf-8", "backslashreplace").decode()


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    message, param = _printable(message), _printable(param)
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """'field.sub: what was wrong' for the first error, and the top-level field as param."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg', '')}", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field: this server does not implement it"
    return f"{where}: {msg}{more}", (loc[0] if loc else None)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette re-raises after this response, so the server log gets the traceback too.
        log.error("%s %s failed: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
