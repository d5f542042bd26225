"""Every error leaves the gateway in OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import dataclasses
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_server.api.protocol import HEADER_MAX_FLOPS, ErrorDetail, ErrorResponse
from tts_server.clients import PolicyError, PRMError
from tts_server.errors import (
    DeadlineExceeded,
    FlopsUnknown,
    JobError,
    PromptTooLong,
    UpstreamDown,
)
from tts_server.prompting import ToolsNotRendered
from tts_server.types import PassThrough

logger = logging.getLogger("tts_server.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ClientGone(Exception):
    """The client closed the connection; the work was cancelled."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "error")


# The client's parameters the policy client sends vLLM as they are: a refusal naming one is theirs.
SENT_ON = frozenset(field.name for field in dataclasses.fields(PassThrough))
# What the engine and its clients raise, answered as HTTP.
ENGINE_ERRORS = (JobError, PolicyError, PRMError)
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code, also the PRM worker's


def from_engine(exc: Exception, *, prompt_param: str | None = None) -> APIError:
    """The one HTTP answer to each engine or upstream failure. `prompt_param` names the prompt's
    field while it is being rendered (an upstream 400 then is about the prompt)."""
    if isinstance(exc, UpstreamDown):
        return APIError(503, str(exc), code="upstream_down")
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), param=prompt_param, code="prompt_too_long")
    if isinstance(exc, FlopsUnknown):
        return APIError(400, str(exc), param=HEADER_MAX_FLOPS)
    if isinstance(exc, ToolsNotRendered):
        return APIError(400, str(exc), param="tools", code="unsupported_parameter")
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, str(exc), code="deadline_exceeded")
    if isinstance(exc, PolicyError):
        param = prompt_param if exc.status == 400 else None
        if exc.status == 400 and exc.upstream_param in SENT_ON:
            param = exc.upstream_param  # vLLM refused a value the client gave (logit_bias...)
        return APIError(exc.status, exc.message, param=param)
    if isinstance(exc, PRMError):
        if exc.upstream_status == 400 and exc.upstream_code == CONTEXT_LENGTH_EXCEEDED:
            # The request asked for solutions longer than the PRM can read: the client can fix
            # that (the PRM never scores a solution cut short).
            message = f"a candidate solution is longer than the PRM reads: {exc}; lower max_tokens"
            return APIError(400, message, param="max_tokens", code=CONTEXT_LENGTH_EXCEEDED)
        return APIError(504 if exc.status == 504 else 502, f"PRM worker: {exc}")
    raise TypeError(f"not an engine error: {type(exc).__name__}")


def error_body(error: APIError) -> ErrorResponse:
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=detail)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error).model_dump(), status_code=error.status, headers=error.headers or None
    )


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "header")]
    # pydantic adds the union member's type name to the location ("prompt.str",
    # "tool_choice.dict[str,any]"); drop those.
    scalars = ("str", "int", "float", "bool")
    parts = [p for p in parts if p not in scalars and "[" not in p]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    param = _param_from_loc(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if param is None:
        return APIError(400, f"invalid request body: {message}")
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param=param, code="missing_field")
    if first.get("type") == "extra_forbidden":
        # Not an OpenAI parameter (nor this server's `tts`): a typo or another server's extension.
        return APIError(
            400,
            f"unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    return APIError(400, f"invalid value for '{param}': {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail)))

    async def on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_engine(exc))

    async def on_client_gone(_: Request, exc: Exception) -> JSONResponse:
        # Nobody reads this; the status is for the metrics.
        return error_response(APIError(499, "the client closed the request", type_="client_closed"))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Log the type only: the message could carry prompt text.
        logger.error("unhandled %s in request", type(exc).__name__)
        return error_response(APIError(500, "internal server error", type_="server_error"))

    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(APIError, on_api_error)
    for kind in ENGINE_ERRORS:
        app.add_exception_handler(kind, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
