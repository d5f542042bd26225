"""Replica affinity: which upstream calls of one request should reach the same replica.

Behind a router (vllm-router with `sticky_least_loaded`) every call that carries the same key is
sent to the same replica, whose prefix cache then holds the request's prompt and partial
solutions. A request draws one opaque random id (never derived from its prompt or its API key)
and every policy and PRM call it makes carries a key made from it. With scope "subtree",
strategies that search independent subtrees (DVTS) label each subtree's prompts and each label
gets a key of its own: a subtree stays on one replica, the subtrees of one request spread.

Nothing here knows the transport: the clients map a key to a header (clients/http.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

AffinityScope = Literal["request", "subtree"]
AFFINITY_SCOPES: tuple[AffinityScope, ...] = ("request", "subtree")


@dataclass
class Affinity:
    """One request's pin: its random id, the scope, and every key handed out (to release)."""

    id: str
    scope: AffinityScope = "request"
    issued: set[str] = field(default_factory=set)

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
