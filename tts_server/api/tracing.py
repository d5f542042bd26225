"""Whether a request's search trace is written: the operator's setting first (TTS_TRACE_DIR,
TTS_TRACE_MODE), then the request's opt-in (X-TTS-Trace-Export, else `tts.trace_export`); and
whether it goes in the response (X-TTS-Return-Trace, else `tts.return_trace`; off by default)."""

from __future__ import annotations

from collections.abc import Mapping

from tts_server.api.errors import APIError
from tts_server.api.protocol import HEADER_RETURN_TRACE, HEADER_TRACE, TTSOptions
from tts_server.settings import Settings

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _asked(
    headers: Mapping[str, str], header: str, body: bool | None, field: str
) -> tuple[str, bool | None]:
    """What the request asked (the header wins over the body's field), and the name it used."""
    raw = headers.get(header.lower())
    if raw is None:
        return field, body
    value = raw.strip().lower()
    if value not in _TRUE + _FALSE:
        raise APIError(400, f"'{header}' must be true or false, got {raw!r}", param=header)
    return header, value in _TRUE


def return_trace_wanted(headers: Mapping[str, str], opts: TTSOptions) -> bool:
    """True when the response carries its search trace (`tts.trace`)."""
    return bool(_asked(headers, HEADER_RETURN_TRACE, opts.return_trace, "tts.return_trace")[1])


def trace_wanted(headers: Mapping[str, str], opts: TTSOptions, settings: Settings) -> bool:
    """True when the trace is written. A request that asks for one where the server writes
    none is a 400 naming what it asked with (never silently ignored)."""
    param, asked = _asked(headers, HEADER_TRACE, opts.trace_export, "tts.trace_export")
    enabled = settings.trace_dir is not None and settings.trace_mode != "off"
    if asked and not enabled:
        raise APIError(
            400,
            f"'{param}': this server does not write search traces "
            "(the operator turns them on with TTS_TRACE_DIR and TTS_TRACE_MODE)",
            param=param,
            code="unsupported_parameter",
        )
    if not enabled:
        return False
    return settings.trace_mode == "all" or bool(asked)
