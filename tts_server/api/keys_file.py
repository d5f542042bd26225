"""The keys file (`TTS_API_KEYS_FILE`): API keys by SHA-256 digest, each with its own quotas.

```toml
[[keys]]
hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # tts-server hash-key
requests_per_minute = 60
tokens_per_minute = 200000
flops_per_minute = 1e15
flops_per_day = 1e17
```

A limit left out is the setting's (`TTS_QUOTA_*`), else none. Light on imports: the CLI reads
its error.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

# The file's field for each quota kind (api/quota_store.py KINDS).
FIELDS = {
    "requests": "requests_per_minute",
    "tokens": "tokens_per_minute",
    "flops_minute": "flops_per_minute",
    "flops_day": "flops_per_day",
}


class KeysFileError(ValueError):
    pass


def load_keys_file(path: Path) -> dict[str, dict[str, int]]:
    """The keys file: full SHA-256 hex digest -> its own limits by kind."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from exc
    keys: dict[str, dict[str, int]] = {}
    for i, entry in enumerate(data.get("keys", [])):
        where = f"keys file {path}, entry {i + 1}"
        digest = str(entry.get("hash", "")).strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysFileError(
                f"{where}: 'hash' must be a SHA-256 hex digest (tts-server hash-key)"
            )
        unknown = set(entry) - {"hash", *FIELDS.values()}
        if unknown:
            raise KeysFileError(f"{where}: unknown fields {sorted(unknown)}")
        keys[digest] = {
            kind: _limit(entry[f], where, f) for kind, f in FIELDS.items() if f in entry
        }
    return keys


def _limit(value: object, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise KeysFileError(f"{where}: {name} must be a number >= 0")
    return int(value)
