"""A fake vLLM serving a PRM as a pooling model, as an `httpx.MockTransport` handler.

It speaks what the `vllm` PRM backend uses: GET /v1/models, POST /tokenize (a prompt or chat
messages), POST /pooling (`task: token_classify`, token-id inputs): one character is one token, the
chat markers and the step tag are one token each, and every step tag gets a [P(bad), P(good)] row
that depends on the tokens before it. Faults are scripted per path; every call is recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

TAG = "<extra_0>"
SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2, TAG: 3}
TAG_ID = SPECIALS[TAG]
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))


def encode(text: str) -> list[int]:
    ids: list[int] = []
    position = 0
    for match in _SPECIAL_RE.finditer(text):
        ids += [100 + ord(c) for c in text[position : match.start()]]
        ids.append(SPECIALS[match.group()])
        position = match.end()
    return ids + [100 + ord(c) for c in text[position:]]


def render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def p_good(ids: list[int], position: int) -> float:
    return ((sum(ids[:position]) * 7 + position) % 89 + 5) / 100


# A fault: an HTTP status to answer with, or an httpx exception to raise.
Fault = int | Exception


@dataclass
class FakePoolingVLLM:
    model: str = "fake-prm"
    max_model_len: int = 400
    root: str = "org/fake-prm"
    # Pending faults per path, used up one per call.
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    # An input for which /pooling answers 400 with this message (vLLM refusing it).
    refuse: Callable[[list[int]], str | None] = lambda ids: None
    # Rows at every token, as vLLM does when its pooler has no step_tag_id.
    every_token: bool = False
    # Added to usage.prompt_tokens (a server counting differently from what was sent).
    usage_offset: int = 0
    down: bool = False
    # The id the pooler puts rows at (vLLM's --pooler-config step_tag_id).
    tag_id: int = TAG_ID
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def pooled(self) -> list[list[list[int]]]:
        """The inputs of every /pooling call that was answered."""
        return [body["input"] for path, body in self.calls if path == "/pooling"]

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        pending = self.faults.get(path) or []
        if pending:
            fault = pending.pop(0)
            if isinstance(fault, Exception):
                raise fault
            return httpx.Response(fault, json={"error": {"message": f"fault {fault}"}})
        if path == "/v1/models":
            card = {"id": self.model, "max_model_len": self.max_model_len, "root": self.root}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if body is None or (body.get("model") not in (None, self.model)):
            message = f"The model `{(body or {}).get('model')}` does not exist."
            return httpx.Response(404, json={"error": {"message": message}})
        if path == "/tokenize":
            self.calls.append((path, body))
            text = body["prompt"] if "prompt" in body else render(body["messages"])
            ids = encode(text)
            return httpx.Response(200, json={"count": len(ids), "tokens": ids})
        if path == "/pooling":
            return self._pooling(body)
        return httpx.Response(404, json={"error": {"message": "Not Found"}})

    def _pooling(self, body: dict[str, Any]) -> httpx.Response:
        assert body["task"] == "token_classify"
        inputs = body["input"]
        for ids in inputs:
            if len(ids) > self.max_model_len:
                message = f"This model's maximum context length is {self.max_model_len} tokens."
                return httpx.Response(400, json={"error": {"message": message}})
            reason = self.refuse(ids)
            if reason:
                return httpx.Response(400, json={"error": {"message": reason}})
        self.calls.append(("/pooling", body))
        data = []
        for index, ids in enumerate(inputs):
            positions = [k for k, t in enumerate(ids) if self.every_token or t == self.tag_id]
            rows = [[1 - p_good(ids, k), p_good(ids, k)] for k in positions]
            data.append({"index": index, "object": "pooling", "data": rows})
        tokens = sum(len(ids) for ids in inputs) + self.usage_offset
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        return httpx.Response(200, json={"model": self.model, "data": data, "usage": usage})
