"""Whether a request's search trace is written: the operator's setting first (TTS_TRACE_DIR,
TTS_TRACE_MODE), then the request's opt-in (X-TTS-Trace-Export, else `tts.trace_export`)."""

from __future__ import annotations

from collections.abc import Mapping

from tts_server.api.errors import APIError
from tts_server.api.protocol import HEADER_TRACE, TTSOptions
from tts_server.settings import Settings

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def trace_wanted(headers: Mapping[str, str], opts: TTSOptions, settings: Settings) -> bool:
    """True when the trace is written. A request that asks for one where the server writes
    none is a 400 naming what it asked with (never silently ignored)."""
    raw = headers.get(HEADER_TRACE.lower())
    if raw is not None:
        param, value = HEADER_TRACE, raw.strip().lower()
        if value not in _TRUE + _FALSE:
            raise APIError(400, f"'{HEADER_TRACE}' must be true or false, got {raw!r}", param=param)
        asked: bool | None = value in _TRUE
    else:
        param, asked = "tts.trace_export", opts.trace_export
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
