"""Wire shapes of the PRM worker: the score request and response, limits and errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from tts_server.api.protocol import ErrorDetail, ErrorResponse

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    question: StrictStr
    solutions: list[list[StrictStr]]
    # Per solution, how many leading steps are context: the client has their scores (from an
    # earlier call), so they are read but not scored, and `scores[i]` holds the rest.
    context_steps: list[StrictInt] | None = None


class ScoreResponse(BaseModel):
    scores: list[list[float]]  # per solution, its steps after the context
    model: str
    steps_scored: int  # scores returned
    # Of steps_scored, those answered from the score cache (no backend compute, no tokens).
    steps_cached: int = 0
    tokens: int


@dataclass(frozen=True)
class ScoreLimits:
    """Caps on one request; a request over any of them is answered with 400."""

    max_solutions: int = 512
    max_steps: int = 256  # per solution
    max_question_chars: int = 32_000
    max_solution_chars: int = 200_000  # all steps of one solution together

    def check(self, request: ScoreRequest) -> None:
        if len(request.question) > self.max_question_chars:
            raise WorkerError(
                400, f"question is over {self.max_question_chars} characters", param="question"
            )
        if len(request.solutions) > self.max_solutions:
            raise WorkerError(
                400, f"more than {self.max_solutions} solutions in one request", param="solutions"
            )
        context = request.context_steps
        if context is not None and len(context) != len(request.solutions):
            message = (
                f"context_steps has {len(context)} entries for {len(request.solutions)} solutions"
            )
            raise WorkerError(400, message, param="context_steps")
        for i, steps in enumerate(request.solutions):
            if context is not None and not 0 <= context[i] <= len(steps):
                message = (
                    f"context_steps.{i} must be between 0 and the solution's {len(steps)} steps"
                )
                raise WorkerError(400, message, param=f"context_steps.{i}")
            if len(steps) > self.max_steps:
                message = f"solution {i} has more than {self.max_steps} steps"
                raise WorkerError(400, message, param=f"solutions.{i}")
            if sum(len(step) for step in steps) > self.max_solution_chars:
                message = f"solution {i} is over {self.max_solution_chars} characters"
                raise WorkerError(400, message, param=f"solutions.{i}")


class WorkerError(Exception):
    """An error answered in the gateway's shape (`ErrorResponse`)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "error")

    def response(self) -> JSONResponse:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=self.status)


def validation_error(errors: list[Any]) -> WorkerError:
    """The first pydantic validation error of a request body as a 400 naming its field."""
    if not errors:
        return WorkerError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return WorkerError(400, "the request body is not valid JSON", code="invalid_json")
    parts = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(parts) or None
    if param is None:
        return WorkerError(400, "the request body must be a JSON object")
    if first.get("type") == "missing":
        return WorkerError(400, f"'{param}' is required", param=param, code="missing_field")
    message = str(first.get("msg", "invalid value"))
    return WorkerError(400, f"invalid value for '{param}': {message}", param=param)
