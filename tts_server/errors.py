"""Why the engine refuses or cannot finish a job. The API maps each to one HTTP answer
(`api/errors.py`); nothing here knows HTTP."""

from __future__ import annotations


class JobError(Exception):
    """A job the engine refused or could not finish."""


class UpstreamDown(JobError):
    """An upstream the job needs failed its last health probe: fail fast."""


class PromptTooLong(JobError):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt is {tokens} tokens after templating; at most {limit} are allowed"
        )
        self.tokens = tokens
        self.limit = limit


class FlopsUnknown(JobError):
    """A FLOPs ceiling was asked for but the models' parameter counts are not known."""


class DeadlineExceeded(JobError):
    """The job's deadline passed before any candidate finished."""
