"""`vllm`: a PRM served by vLLM as a pooling model (`POST /pooling`, `"task": "token_classify"`).

Each solution is rendered in its family's format (from the registry: vLLM serves the families of
Qwen2.5-Math-PRM's kind, `chat_tagged` + `class_head`; default `formats.QWEN_MATH_PRM`: a step tag
inside a step's text is stripped, see there), tokenized, checked against the PRM's context, and
sent as token ids, so that what was counted and checked is what vLLM computes, in `/pooling`
requests of at most `max_batch_tokens` tokens (a longer solution goes alone). vLLM answers one
[P(bad), P(good)] row per step tag; a step's score is P(good), and a solution must get exactly one
row per step.

Rendering and counting: by vLLM's own `/tokenize` with the chat messages by default, so the worker
needs no model files and no transformers (it may run in its own container) and cannot drift from
the tokenizer and chat template the server scores with; that costs one round trip per solution.
`tokenizer` (a local folder with the PRM's tokenizer) renders locally through transformers instead.

Failures: a solution over the PRM's context (vLLM's max_model_len) is rejected before sending,
never cut (vLLM would refuse it too, for the whole request); a 4xx of vLLM rejects the solutions of
that request (retried one by one to find which) naming vLLM's reason: the worker answers 400.
Timeouts, connection errors and 5xx are retried, then the batch fails with `BackendUnavailable`:
503, which the gateway retries; the worker's /health follows vLLM's (the served model listed in
/v1/models), so the gateway's readiness and degrade-to-majority see a PRM that is down.

Tokens: vLLM's `usage.prompt_tokens` of each request, shared among its solutions by length (it
does not read its prefix cache for token-wise pooling: every token sent is computed).
Parameters: from the config.json in `tokenizer`, else in the model folder vLLM reports (`root`)
when that folder is on this machine; else None (unknown: set TTS_PRM_PARAMS on the gateway).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tts_server.prm_worker.backends import registry
from tts_server.prm_worker.backends.base import (
    BackendError,
    BackendUnavailable,
    ItemsRejected,
    PRMBackend,
    ScoreItem,
)
from tts_server.prm_worker.backends.formats import Family
from tts_server.prm_worker.backends.vllm_http import (
    Refused,
    VLLMServer,
    folder_parameters,
    local_folder,
)

logger = logging.getLogger("tts_server.prm_worker")


@dataclass(frozen=True)
class _ServedPRM:
    """What the backend learns from the server once: its context and the step tag's id."""

    max_model_len: int
    tag_id: int


@dataclass(frozen=True)
class _Rendered:
    index: int  # in the batch
    ids: list[int]
    steps: int


class VLLMBackend(PRMBackend):
    name = "vllm"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        family: Family | None = None,
        tokenizer: str | None = None,
        max_batch_tokens: int = 8192,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`url`: the vLLM server; `model`: its served model name; `max_batch_tokens`: tokens per
        /pooling request (bounds one request's size and time, so `timeout_s` fits it); the worst
        case, 1 + `retries` timeouts, should stay under the gateway's TTS_PRM_TIMEOUT_S."""
        if not url.startswith(("http://", "https://")):
            raise BackendError(f"the vLLM URL must start with http:// or https://, not {url!r}")
        if max_batch_tokens < 1 or timeout_s <= 0 or retries < 0:
            raise BackendError("max_batch_tokens >= 1, timeout_s > 0 and retries >= 0, please")
        self.family = family or registry.shipped().default.family
        self.family.require(self.name)
        self.format = self.family.format
        self.model_name = model
        self.max_batch_tokens = max_batch_tokens
        self._folder = Path(tokenizer) if tokenizer else None
        self.parameters = folder_parameters(self._folder)  # else from vLLM's model folder, if local
        self._tokenizer = _load_tokenizer(tokenizer, self.format.step_tag) if tokenizer else None
        self._server = VLLMServer(url, timeout_s=timeout_s, retries=retries, transport=transport)
        self._served: _ServedPRM | None = None
        # Tokens vLLM computed per solution of the last batch, for `count_tokens`.
        self._computed: dict[tuple[str, tuple[str, ...]], deque[int]] = {}
        try:  # vLLM may start after the worker: learn about it now if it is up, else later
            self._served_prm(probe=True)
        except (BackendUnavailable, ValueError) as exc:
            logger.warning("the PRM's vLLM server is not ready yet: %s", exc)

    def close(self) -> None:
        self._server.close()

    def healthy(self) -> bool:
        try:
            self._served_prm(probe=True, refresh=True)
        except (BackendUnavailable, ValueError):
            return False
        return True

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        served = self._served_prm()
        self._computed.clear()
        reasons: dict[int, str] = {}
        too_long: set[int] = set()
        ready: list[_Rendered] = []
        for i, item in enumerate(items):
            try:
                ids = self._ids(item)
            except Refused as exc:
                reasons[i] = f"the PRM's vLLM server cannot render it ({exc})"
                continue
            if len(ids) > served.max_model_len:
                reasons[i] = (
                    f"it is {len(ids)} tokens in the PRM's format, over the PRM's context of "
                    f"{served.max_model_len} tokens (refused, not truncated)"
                )
                too_long.add(i)
                continue
            if ids.count(served.tag_id) != len(item[1]):  # the format strips stray tags
                raise RuntimeError(f"{ids.count(served.tag_id)} tags for {len(item[1])} steps")
            ready.append(_Rendered(i, ids, len(item[1])))
        scores: list[list[float]] = [[] for _ in items]
        for chunk in _chunks(ready, self.max_batch_tokens):
            self._pool(chunk, items, scores, reasons)
        if reasons:
            raise ItemsRejected(reasons, scores, frozenset(too_long))
        return scores

    def count_tokens(self, item: ScoreItem) -> int:
        counted = self._computed.get(_key(item))
        if counted:
            return counted.popleft()
        return len(self._ids(item))  # not scored in the last batch: what it would compute

    # --- the server ---

    def _served_prm(self, *, probe: bool = False, refresh: bool = False) -> _ServedPRM:
        """The served model's context and tag id; `refresh` checks it is still served."""
        if self._served is not None and not refresh:
            return self._served
        try:
            cards = self._server.get("/v1/models", probe=probe).get("data")
        except Refused as exc:
            raise BackendUnavailable(f"vLLM's /v1/models refused: {exc}") from exc
        card = next(
            (c for c in cards or [] if isinstance(c, dict) and c.get("id") == self.model_name),
            None,
        )
        if card is None:
            served = [c.get("id") for c in cards or [] if isinstance(c, dict)]
            raise BackendUnavailable(f"vLLM serves {served}, not {self.model_name!r}")
        if self._served is not None:
            return self._served
        max_len = card.get("max_model_len")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError("vLLM's /v1/models gives no max_model_len for the PRM")
        self._served = _ServedPRM(max_len, self._tag_id(probe))
        if self.parameters is None:
            self.parameters = folder_parameters(local_folder(card.get("root")))
        return self._served

    def _tag_id(self, probe: bool) -> int:
        tag = self.format.step_tag
        if self._tokenizer is not None:
            return int(self._tokenizer.convert_tokens_to_ids(tag))
        body = {"model": self.model_name, "prompt": tag, "add_special_tokens": False}
        try:
            tokens = self._server.post("/tokenize", body, probe=probe).get("tokens")
        except Refused as exc:
            raise BackendUnavailable(f"vLLM's /tokenize refused the step tag: {exc}") from exc
        if not (isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], int)):
            raise BackendUnavailable(f"the PRM's tokenizer has no {tag} token")
        return tokens[0]

    def _ids(self, item: ScoreItem) -> list[int]:
        """The token ids of `item` in the PRM's format (Refused: vLLM cannot render it)."""
        if self._tokenizer is not None:
            text = self.format.render(self._tokenizer, item)
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        body = {
            "model": self.model_name,
            "messages": self.format.messages(item),
            "add_generation_prompt": False,
            "add_special_tokens": False,  # the chat template has put them in
        }
        tokens = self._server.post("/tokenize", body).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError("vLLM's /tokenize answered without token ids")
        return tokens

    def _pool(
        self,
        chunk: list[_Rendered],
        items: Sequence[ScoreItem],
        scores: list[list[float]],
        reasons: dict[int, str],
    ) -> None:
        """Score `chunk` in one /pooling request into `scores`; refusals go to `reasons`."""
        body = {
            "model": self.model_name,
            "input": [r.ids for r in chunk],
            "task": "token_classify",
            "use_activation": True,  # softmax: [P(bad), P(good)] rows
        }
        try:
            data = self._server.post("/pooling", body)
        except Refused as exc:
            if len(chunk) == 1:
                reasons[chunk[0].index] = f"the PRM's vLLM server refused it ({exc})"
            else:  # which of them? (nothing was computed)
                for one in chunk:
                    self._pool([one], items, scores, reasons)
            return
        rows = _step_rows(data, len(chunk))
        for rendered, row in zip(chunk, rows, strict=True):
            if len(row) != rendered.steps:
                raise RuntimeError(
                    f"vLLM gave {len(row)} step scores for {rendered.steps} steps: is its "
                    f"--pooler-config step_tag_id {self._served_prm().tag_id}?"
                )
            scores[rendered.index] = row
        usage = data.get("usage")
        used = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        lengths = [len(r.ids) for r in chunk]
        shares = _share(used, lengths) if isinstance(used, int) else lengths
        for rendered, tokens in zip(chunk, shares, strict=True):
            self._computed.setdefault(_key(items[rendered.index]), deque()).append(tokens)


def _step_rows(data: dict[str, Any], expected: int) -> list[list[float]]:
    """P(good) per step tag of each input, in input order, from a /pooling answer."""
    entries = data.get("data")
    if not isinstance(entries, list) or len(entries) != expected:
        raise ValueError(f"vLLM's /pooling answered without {expected} results")
    rows: list[list[float]] = []
    for entry in sorted(entries, key=lambda e: e.get("index", 0) if isinstance(e, dict) else 0):
        pairs = entry.get("data") if isinstance(entry, dict) else None
        if not isinstance(pairs, list):
            raise ValueError("vLLM's /pooling answered a result without data")
        row: list[float] = []
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError("vLLM's /pooling rows are not [P(bad), P(good)] pairs")
            bad, good = float(pair[0]), float(pair[1])
            if not (math.isfinite(bad + good) and abs(bad + good - 1.0) < 1e-3):
                raise ValueError("vLLM's /pooling rows are not probabilities")
            row.append(min(1.0, max(0.0, good)))
        rows.append(row)
    return rows


def _chunks(rendered: list[_Rendered], budget: int) -> list[list[_Rendered]]:
    """Consecutive groups of at most `budget` tokens (one solution over it goes alone)."""
    chunks: list[list[_Rendered]] = []
    size = 0
    for r in rendered:
        if chunks and size + len(r.ids) <= budget:
            chunks[-1].append(r)
            size += len(r.ids)
        else:
            chunks.append([r])
            size = len(r.ids)
    return chunks


def _share(total: int, lengths: list[int]) -> list[int]:
    """`total` split in proportion to `lengths` (largest remainders), summing to `total`."""
    whole = sum(lengths)
    if total == whole or whole == 0:
        return list(lengths)
    exact = [total * n / whole for n in lengths]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _key(item: ScoreItem) -> tuple[str, tuple[str, ...]]:
    return item[0], tuple(item[1])


def _load_tokenizer(folder: str, step_tag: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendError(
            "a local tokenizer needs transformers (pip install 'tts-server[hf]'); "
            "without one, vLLM's /tokenize renders"
        ) from exc
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot load a tokenizer from {folder!r}: {exc}") from exc
    tag_id = tokenizer.convert_tokens_to_ids(step_tag)
    if not isinstance(tag_id, int) or tag_id == tokenizer.unk_token_id:
        raise BackendError(f"the tokenizer in {folder!r} has no {step_tag} token")
    if not getattr(tokenizer, "chat_template", None):
        raise BackendError(f"the tokenizer in {folder!r} has no chat template")
    return tokenizer
