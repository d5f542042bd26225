"""PRM backends behind one interface, registered by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, get_args

from tts_server.prm_worker.backends.arith import ArithBackend
from tts_server.prm_worker.backends.base import (
    BackendError,
    BackendUnavailable,
    ItemsRejected,
    PRMBackend,
    ScoreItem,
)
from tts_server.prm_worker.backends.hf import HFBackend
from tts_server.prm_worker.backends.judge import JudgeBackend
from tts_server.prm_worker.backends.vllm import VLLMBackend
from tts_server.settings import PRMBackendName

# hf.py imports torch and transformers only when an HFBackend is built (vllm.py only for a local
# tokenizer).
BACKENDS: dict[str, Callable[..., PRMBackend]] = {
    "arith": ArithBackend,
    "hf": HFBackend,
    "vllm": VLLMBackend,
    "judge": JudgeBackend,
}
assert tuple(BACKENDS) == get_args(PRMBackendName), "settings name every backend"


def load_backend(name: str, **options: Any) -> PRMBackend:
    """Build the backend registered as `name`; options set to None are left out."""
    factory = BACKENDS.get(name)
    if factory is None:
        known = ", ".join(sorted(BACKENDS))
        raise BackendError(f"unknown PRM backend {name!r} (known: {known})")
    given = {key: value for key, value in options.items() if value is not None}
    try:
        inspect.signature(factory).bind(**given)
    except TypeError as exc:
        raise BackendError(f"bad options for PRM backend {name!r}: {exc}") from exc
    return factory(**given)


__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendUnavailable",
    "ItemsRejected",
    "PRMBackend",
    "ScoreItem",
    "load_backend",
]
