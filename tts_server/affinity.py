"""Replica affinity: which upstream calls of one request should reach the same replica.

Behind a router (vllm-router with `sticky_least_loaded`) every call that carries the same key is
sent to the same replica, whose prefix cache then holds the request's prompt and partial
solutions. A request draws one opaque random id (never derived from its prompt or its API key)
and every policy and PRM call it makes carries a key made from it. With scope "subtree",
strategies that search independent subtrees (DVTS) label each subtree's prompts and each label
gets a key of its own: a subtree stays on one replica, the subtrees of one request spread.

With `key = "prompt"` the id is instead a keyed digest of the request's prompt (HMAC-SHA256
under a secret: the process's own random one unless configured), so requests that ask the same
question share one pin and land on the replica that already holds its prefix. Such a pin is
shared while several requests hold it and is released when the last one ends (`Pins`).

Nothing here knows the transport: the clients map a key to a header (clients/http.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

AffinityScope = Literal["request", "subtree"]
AFFINITY_SCOPES: tuple[AffinityScope, ...] = ("request", "subtree")
# How a request's id is drawn: at random, or from its prompt (same question, same replica).
AffinityKey = Literal["random", "prompt"]


@dataclass
class Affinity:
    """One request's pin: its random id, the scope, and every key handed out (to release)."""

    id: str
    scope: AffinityScope = "request"
    issued: set[str] = field(default_factory=set)
    holders: int = 1  # requests holding a shared (prompt-derived) pin

    @classmethod
    def new(cls, scope: AffinityScope = "request") -> Affinity:
        # 128 random bits: unguessable, so one client cannot steer into another's session.
        return cls(secrets.token_hex(16), scope)

    def key(self, label: str | None = None) -> str:
        """The key of the calls labelled `label` (None: the request's own)."""
        key = self.id if label is None or self.scope == "request" else f"{self.id}-{label}"
        self.issued.add(key)
        return key

    def keys(self, labels: Sequence[str] | None, count: int) -> list[str]:
        """One key per prompt of a call of `count` prompts, labelled by `labels` (or not)."""
        if labels is None:
            return [self.key()] * count
        if len(labels) != count:
            raise ValueError(f"{len(labels)} affinity labels for {count} prompts")
        return [self.key(label) for label in labels]

    def issued_keys(self) -> list[str]:
        """Every key issued so far, once each (what to release when the request ends)."""
        return sorted(self.issued)


class Pins:
    """Hands out requests' pins and says which keys to release when a request ends.

    Random pins are one request's own. Prompt pins are shared: a second request with the same
    prompt holds the first one's `Affinity` (and so the same keys) until both have ended, so the
    router never forgets a session that another request is still using.
    """

    def __init__(
        self, scope: AffinityScope = "request", key: AffinityKey = "random", secret: str = ""
    ) -> None:
        self.scope = scope
        self.by_prompt = key == "prompt"
        # Per process unless set: gateway replicas that should agree share a configured secret.
        self._secret = (secret or secrets.token_hex(32)).encode()
        self._shared: dict[str, Affinity] = {}
        self.held = 0  # distinct pins held by requests in flight (each a session at the router)

    def acquire(self, prompt: str) -> Affinity:
        """The pin of a new request whose prompt (canonical text) is `prompt`."""
        if not self.by_prompt:
            self.held += 1
            return Affinity.new(self.scope)
        # 128 bits of a keyed digest: the prompt cannot be read back nor guessed without the
        # secret, and two prompts collide with negligible probability.
        pin = hmac.new(self._secret, prompt.encode(), hashlib.sha256).hexdigest()[:32]
        held = self._shared.get(pin)
        if held is not None:
            held.holders += 1
            return held
        affinity = Affinity(pin, self.scope)
        self._shared[pin] = affinity
        self.held += 1
        return affinity

    def release(self, affinity: Affinity) -> list[str]:
        """`affinity`'s holder is done: the keys to release at the router now (none while
        another request still holds the pin)."""
        affinity.holders -= 1
        if affinity.holders > 0:
            return []
        self.held -= 1
        if self._shared.get(affinity.id) is affinity:
            del self._shared[affinity.id]
        return affinity.issued_keys()

    @property
    def shared(self) -> int:
        """Prompt pins held right now."""
        return len(self._shared)
