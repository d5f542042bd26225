"""A fake vLLM OpenAI server (ASGI) for unit tests: one character = one token, scripted text.

It speaks the subset of vLLM's API the gateway uses (/tokenize, /v1/completions with token-id
prompts, return_token_ids, stop strings, logprobs, `stream` with usage on every chunk, /health,
/metrics) and records every call; `streams` says how each streamed request ended (a client that
closes one midway shows up as `closed`, the tokens sent by then counted). Given a
`judge`, it also serves /v1/models and one-token /v1/chat/completions with top logprobs (what the
`judge` PRM backend asks); without one those paths are 404, as before.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tests.support.fakes import decode, encode

# (prompt text, sample number within the call) -> the text the "model" would write next.
Script = Callable[[str, int], str]
# Rendered chat prompt -> the next token's candidates as (token, logprob), most likely first.
Judge = Callable[[str], list[tuple[str, float]]]
# (sample number, token position) -> the token's top logprobs, its own first.
TopLogprobs = Callable[[int, int], list[float]]
EOS = "<eos>"


@dataclass
class StreamEnd:
    """How a streamed request ended: tokens sent, and whether its client closed it first."""

    sample: int
    sent: int
    closed: bool


def render_chat(messages: list[dict[str, Any]]) -> str:
    turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
    return turns + "<assistant>"


@dataclass
class FakeVLLM:
    script: Script
    model: str = "fake-model"
    calls: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(
        default_factory=lambda: {"prompt": 0, "generation": 0, "cached": 0}
    )
    # Prefix-cache hits to report: each prompt's first `cached_tokens` tokens (at most all of
    # it) count as cached in `usage` (summed over a request's prompts). 0: never a hit.
    cached_tokens: int = 0
    # Seconds each /v1/completions request takes (a slow model), 0: none.
    delay_s: float = 0.0
    # Plus up to this many seconds more, drawn uniformly per request (calls that end apart).
    delay_jitter_s: float = 0.0
    # Sample as a sampling model would: the script's sample number is the request's seed (plus
    # the copy), a random one without a seed. False: the copy's index, whatever the seed.
    sample_by_seed: bool = False
    # The path of every request received, in order (/tokenize included).
    paths: list[str] = field(default_factory=list)
    # Serve /v1/models and /v1/chat/completions (max_tokens 1, logprobs) with these candidates.
    judge: Judge | None = None
    # Chat prompts longer than this (in tokens) are refused with a 400, as vLLM does.
    max_model_len: int = 2048
    # Token ids a logit_bias may name (one token = one character: Unicode's code points); others
    # are refused as vLLM refuses them, with `param` naming the field.
    vocab_size: int = 0x110000
    # The model folder /v1/models reports (`root`).
    root: str = "org/fake-model"
    chat_calls: list[dict[str, Any]] = field(default_factory=list)
    # (path, the affinity header's value or None) of every request, in order.
    affinity_header: str = "x-session-id"
    keys: list[tuple[str, str | None]] = field(default_factory=list)
    # Each token's top logprobs when a request asks for `logprobs` (None: -0.1, -3.0, ...).
    top_logprobs: TopLogprobs | None = None
    # Seconds between a stream's chunks (one token each), and how each stream ended.
    token_delay_s: float = 0.0
    streams: list[StreamEnd] = field(default_factory=list)
    streamed: int = 0  # streams started; without sample_by_seed, a stream's sample number

    def sample_number(self, copy: int, body: dict[str, Any]) -> int:
        if not self.sample_by_seed:
            return copy
        seed = body.get("seed")
        return random.randrange(1 << 30) if seed is None else int(seed) + copy

    def complete(self, prompt: list[int], sample: int, body: dict[str, Any]) -> dict[str, Any]:
        prompt_text = decode(prompt)
        full = self.script(prompt_text, sample)
        text, finish, stop_reason = full, "stop", None
        cut = len(full)
        for stop in body.get("stop") or []:
            at = full.find(stop)
            if at != -1 and at + len(stop) <= cut:
                cut, stop_reason = at + len(stop), stop
        if stop_reason is not None:
            text = full[:cut]
        elif full.endswith(EOS):
            text = full[: -len(EOS)]
        max_tokens = int(body.get("max_tokens") or 16)
        if len(text) > max_tokens:
            text, finish, stop_reason = text[:max_tokens], "length", None
        elif stop_reason is None and not full.endswith(EOS):
            finish = "length"
        choice: dict[str, Any] = {
            "text": text,
            "token_ids": encode(text),
            "finish_reason": finish,
            "stop_reason": stop_reason,
            "logprobs": None,
        }
        if body.get("logprobs") is not None:
            choice["logprobs"] = self.logprobs(text, sample, int(body["logprobs"]))
        return choice

    def logprobs(self, text: str, sample: int, k: int) -> dict[str, Any]:
        """vLLM's completions shape; each position's dict holds the top k and the token."""
        top = self.top_logprobs or (lambda _s, _p: [-0.1, -3.0, -4.0, -5.0, -6.0, -7.0])
        tops: list[dict[str, float]] = []
        for position, token in enumerate(text):
            values = top(sample, position)
            ranked = {f"alt{r}": lp for r, lp in enumerate(values[1 : k + 1], 1)}
            tops.append({token: values[0], **ranked})
        return {
            "text_offset": list(range(len(text))),
            "token_logprobs": [top(sample, p)[0] for p in range(len(text))],
            "tokens": list(text),
            "top_logprobs": tops,
        }

    async def stream(
        self, prompt: list[int], sample: int, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        """One chunk per token, usage on each (continuous_usage_stats), then [DONE]."""
        whole = self.complete(prompt, sample, body)
        text, sent, closed = whole["text"], 0, True
        try:
            for position, token in enumerate(text):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                logprobs = None
                if whole["logprobs"] is not None:
                    logprobs = {
                        "text_offset": [position],
                        "token_logprobs": [whole["logprobs"]["token_logprobs"][position]],
                        "tokens": [token],
                        "top_logprobs": [whole["logprobs"]["top_logprobs"][position]],
                    }
                last = position == len(text) - 1
                choice = {
                    "index": 0,
                    "text": token,
                    "token_ids": [ord(token)],
                    "logprobs": logprobs,
                    "finish_reason": whole["finish_reason"] if last else None,
                    "stop_reason": whole["stop_reason"] if last else None,
                }
                sent += 1
                self.counters["generation"] += 1
                usage = {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": sent,
                    "total_tokens": len(prompt) + sent,
                }
                yield "data: " + json.dumps({"choices": [choice], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
            closed = False
        finally:
            self.streams.append(StreamEnd(sample, sent, closed))

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            self.paths.append(request.url.path)
            self.keys.append((request.url.path, request.headers.get(self.affinity_header)))
            return await call_next(request)

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            body = await request.json()
            text = render_chat(body["messages"]) if "messages" in body else body["prompt"]
            if body.get("tools"):  # as a template that renders tools would, before the turns
                text = f"<tools>{json.dumps(body['tools'])}</tools>" + text
            return {"tokens": encode(text), "count": len(text)}

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            self.calls.append(body)
            if self.delay_s or self.delay_jitter_s:
                await asyncio.sleep(self.delay_s + random.uniform(0, self.delay_jitter_s))
            unknown = [t for t in body.get("logit_bias") or {} if int(t) >= self.vocab_size]
            if unknown:
                message = f"token_id(s) {unknown} in logit_bias contain out-of-vocab token ids."
                error = {"message": message, "type": "BadRequestError", "param": "logit_bias"}
                return JSONResponse({"error": {**error, "code": 400}}, status_code=400)
            prompts = body["prompt"]
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            if body.get("stream"):
                self.counters["prompt"] += len(prompts[0])
                sample = self.sample_number(0, body) if self.sample_by_seed else self.streamed
                self.streamed += 1
                return StreamingResponse(  # type: ignore[return-value]
                    self.stream(prompts[0], sample, body), media_type="text/event-stream"
                )
            choices: list[dict[str, Any]] = []
            prompt_tokens = completion_tokens = cached = 0
            for i, prompt in enumerate(prompts):
                for j in range(int(body.get("n", 1))):
                    choice = self.complete(prompt, self.sample_number(j, body), body)
                    choice["index"] = len(choices)
                    choices.append(choice)
                    prompt_tokens += len(prompt)
                    completion_tokens += len(choice["token_ids"])
                    cached += min(self.cached_tokens, len(prompt))
                del i
            self.counters["prompt"] += prompt_tokens
            self.counters["generation"] += completion_tokens
            self.counters["cached"] += cached
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            return JSONResponse({"id": "cmpl-fake", "choices": choices, "usage": usage})

        if self.judge is not None:
            self._judge_routes(app, self.judge)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            c = self.counters
            return PlainTextResponse(
                f"vllm:prompt_tokens_total {c['prompt']}\n"
                f"vllm:generation_tokens_total {c['generation']}\n"
            )

        return app

    def _judge_routes(self, app: FastAPI, judge: Judge) -> None:
        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            card = {"id": self.model, "object": "model", "root": self.root}
            return {"object": "list", "data": [{**card, "max_model_len": self.max_model_len}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            if body.get("model") != self.model:
                message = f"The model `{body.get('model')}` does not exist."
                return JSONResponse({"error": {"message": message}}, status_code=404)
            prompt = render_chat(body["messages"])
            if len(prompt) + 1 > self.max_model_len:
                message = f"This model's maximum context length is {self.max_model_len} tokens."
                return JSONResponse({"error": {"message": message}}, status_code=400)
            self.chat_calls.append(body)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            candidates = judge(prompt)
            token, logprob = candidates[0]
            content: dict[str, Any] = {"token": token, "logprob": logprob}
            if body.get("logprobs"):
                top = candidates[: int(body.get("top_logprobs") or 0)]
                content["top_logprobs"] = [{"token": t, "logprob": lp} for t, lp in top]
            cached = min(self.cached_tokens, len(prompt))
            self.counters["prompt"] += len(prompt)
            self.counters["cached"] += cached
            self.counters["generation"] += 1
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": 1,
                "total_tokens": len(prompt) + 1,
                "prompt_tokens_details": {"cached_tokens": cached} if cached else None,
            }
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": token},
                "logprobs": {"content": [content]} if body.get("logprobs") else None,
                "finish_reason": "length",
            }
            return JSONResponse({"id": "chat-fake", "choices": [choice], "usage": usage})
