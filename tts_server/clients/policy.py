"""The policy client: vLLM's OpenAI-compatible HTTP API.

Prompts travel as token ids, so a partial solution is continued with exactly the tokens the model
produced. Every sample is sent as its own prompt with n=1: vLLM's `usage` then counts prompt and
completion tokens exactly as its `/metrics` counters do (with n>1 it counts the prompt once).

Two ways to send a step's prompts (`call_mode`):
- "per_prompt" (default): one request per prompt, all sent at once. vLLM's scheduler batches
  concurrent requests into the same forward passes, and each response reports its own prefix-cache
  hits, so cached tokens (and the FLOPs count) are measured exactly.
- "batched": one request carrying every prompt. vLLM 0.32 then reports the cached tokens of the
  last prompt only, so the cached count is a lower bound. A seeded request is sent per prompt
  all the same: vLLM takes one seed per request, and the copies of a prompt would share it
  (sample alike), so a batched call could honour no seed.

Affinity keys (tts_server/affinity.py) go in `affinity_header`: per prompt in "per_prompt" mode
(so a DVTS subtree's requests share one key), and in "batched" mode the first prompt's key for
the whole call (one request has one header: a step's subtrees then share a replica).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx

from tts_server.clients.http import RetryPolicy, Upstream, UpstreamError
from tts_server.confidence import TokenLogprob
from tts_server.flops import context_sum
from tts_server.types import Generation, PolicyUsage, SamplingConfig, TokenWatch

CallMode = Literal["per_prompt", "batched"]


class PolicyError(UpstreamError):
    """The policy server failed or refused a call. `status` is the HTTP status to answer with:
    400 for its 4xx (the request is wrong), 504 when it timed out, else 502."""

    TIMEOUT = "the policy server timed out"
    UNREACHABLE = "the policy server is unreachable ({error})"
    REFUSED = "policy server: {message}"
    UNEXPLAINED = "HTTP {status}"
    UNREADABLE = "the policy server answered with {what}"


class VLLMPolicyClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 300.0,
        client: httpx.AsyncClient | None = None,
        call_mode: CallMode = "per_prompt",
        retry: RetryPolicy | None = None,
        affinity_header: str | None = None,
    ) -> None:
        self.model = model
        self.call_mode = call_mode
        # Up to 256 connections: a step sends each of its prompts as its own request.
        self._upstream = Upstream(
            base_url,
            error=PolicyError,
            timeout=timeout,
            connections=256,
            retry=retry,
            client=client,
            affinity_header=affinity_header,
        )

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
        affinity: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        if not prompts or n < 1:
            return [[] for _ in prompts]
        expanded = [list(p) for p in prompts for _ in range(n)]
        keys: list[str | None] = [None] * len(expanded)
        if affinity is not None:
            keys = [key for key in affinity for _ in range(n)]
        if self.call_mode == "batched" and sampling.seed is None:
            generations = await self._complete(
                expanded, sampling, usage, seed=None, affinity=keys[0]
            )
        else:
            generations = await self._complete_each(expanded, sampling, usage, keys)
        usage.calls += 1
        return [generations[i * n : (i + 1) * n] for i in range(len(prompts))]

    async def _complete_each(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        keys: list[str | None],
    ) -> list[Generation]:
        """One request per prompt, all in flight together; the first failure cancels the rest."""

        async def one(i: int, prompt: list[int]) -> list[Generation]:
            generations = await self._complete(
                [prompt],
                sampling,
                usage,
                # Distinct seeds: copies of one prompt must not sample identically.
                seed=None if sampling.seed is None else sampling.seed + i,
                affinity=keys[i],
            )
            if sampling.on_sample is not None:
                sampling.on_sample(i, generations[0])
            return generations

        tasks = [asyncio.ensure_future(one(i, prompt)) for i, prompt in enumerate(prompts)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [g for result in results for g in result]

    async def _complete(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        seed: int | None,
        affinity: str | None = None,
    ) -> list[Generation]:
        body = self._body(prompts, sampling, seed)
        data = await self._upstream.post_json("/v1/completions", body, affinity=affinity)
        choices = sorted(data.get("choices", []), key=lambda c: int(c["index"]))
        if len(choices) != len(prompts):
            raise PolicyError(
                f"policy server returned {len(choices)} choices for {len(prompts)} prompts"
            )
        generations = [_to_generation(c) for c in choices]
        raw_usage = data.get("usage") or {}
        details = raw_usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
        # Only one prompt's cached count is known (the last, or the only one).
        cached_by_prompt = [0] * (len(prompts) - 1) + [cached]
        call = PolicyUsage(
            prompt_tokens=int(raw_usage.get("prompt_tokens", 0)),
            completion_tokens=int(raw_usage.get("completion_tokens", 0)),
            cached_tokens=cached,
            requests=1,
        )
        for prompt, generation, hit in zip(prompts, generations, cached_by_prompt, strict=True):
            end = len(prompt) + len(generation.token_ids)
            call.context_computed += context_sum(hit, end)
            call.context_cached += context_sum(0, hit)
        usage.add(call)
        return generations

    def _body(
        self, prompts: list[list[int]], sampling: SamplingConfig, seed: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompts,
            "n": 1,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "include_stop_str_in_output": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if seed is not None:
            body["seed"] = seed
        if sampling.logprobs is not None:
            body["logprobs"] = sampling.logprobs
        body.update(sampling.passthrough.body())
        return body

    async def stream(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        watch: TokenWatch,
        *,
        affinity: str | None = None,
    ) -> Generation:
        """One sample streamed (`"stream": true`, usage on every chunk), closed as soon as
        `watch` says so. What a closed sample cost is what its chunks reported: vLLM aborts the
        request when the connection closes, and tokens it generated after the last chunk read
        are not known here (docs/confidence.md says how many that was, measured)."""
        body = self._body([list(prompt)], sampling, sampling.seed)
        body["prompt"] = list(prompt)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        text: list[str] = []
        token_ids: list[int] = []
        tokens: list[TokenLogprob] = []
        finish: str | None = None
        stop_reason: object = None
        cancelled = False
        prompt_tokens, cached = len(prompt), 0
        async with self._upstream.stream("/v1/completions", body, affinity=affinity) as lines:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                chunk = _chunk(payload)
                raw_usage = chunk.get("usage") or {}
                prompt_tokens = int(raw_usage.get("prompt_tokens") or prompt_tokens)
                details = raw_usage.get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens") or cached)
                for choice in chunk.get("choices") or []:
                    text.append(choice.get("text") or "")
                    token_ids.extend(int(t) for t in choice.get("token_ids") or [])
                    arrived = _token_logprobs(choice.get("logprobs"))
                    tokens.extend(arrived)
                    finish = choice.get("finish_reason") or finish
                    stop_reason = choice.get("stop_reason") or stop_reason
                    if finish is None and any([watch(t) for t in arrived]):
                        cancelled = True
                if cancelled:
                    break  # leaving the block closes the stream: vLLM aborts the request
        end = prompt_tokens + len(token_ids)
        usage.add(
            PolicyUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(token_ids),
                cached_tokens=cached,
                calls=1,
                requests=1,
                context_computed=context_sum(cached, end),
                context_cached=context_sum(0, cached),
            )
        )
        return Generation(
            text="".join(text),
            token_ids=token_ids,
            finish_reason="length" if finish == "length" or cancelled else "stop",
            stop_reason=stop_reason if isinstance(stop_reason, str) else None,
            logprobs=tokens if sampling.logprobs is not None else None,
            cancelled=cancelled,
        )

    async def tokenize_chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        affinity: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template applied once, with the generation prompt (and the tools, if any),
        as vLLM renders it."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "add_generation_prompt": True,
        }
        if tools:
            body["tools"] = [dict(tool) for tool in tools]
        data = await self._upstream.post_json("/tokenize", body, affinity=affinity)
        return [int(t) for t in data["tokens"]]

    async def tokenize_text(self, text: str, *, affinity: str | None = None) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": True}
        data = await self._upstream.post_json("/tokenize", body, affinity=affinity)
        return [int(t) for t in data["tokens"]]

    async def model_root(self) -> str | None:
        """Where vLLM loaded the served model from (`root` in /v1/models), if it says."""
        try:
            data = await self._upstream.get_json("/v1/models")
        except PolicyError:
            return None
        cards = data.get("data")
        for card in cards if isinstance(cards, list) else []:
            if isinstance(card, dict) and card.get("id") == self.model and card.get("root"):
                return str(card["root"])
        return None

    async def health(self) -> bool:
        return await self._upstream.health()


def _to_generation(choice: dict[str, Any]) -> Generation:
    finish = choice.get("finish_reason") or "stop"
    stop_reason = choice.get("stop_reason")
    raw_logprobs = choice.get("logprobs")
    return Generation(
        text=choice.get("text") or "",
        token_ids=[int(t) for t in (choice.get("token_ids") or [])],
        finish_reason="length" if finish == "length" else "stop",
        # An int stop_reason is a stop token id: treat like EOS.
        stop_reason=stop_reason if isinstance(stop_reason, str) else None,
        logprobs=None if raw_logprobs is None else _token_logprobs(raw_logprobs),
    )


def _token_logprobs(raw: Any) -> list[TokenLogprob]:
    """vLLM's completions logprobs ({tokens, token_logprobs, top_logprobs}) as tokens, each
    with its top candidates most likely first. A null logprob (vLLM sends one for a token it
    could not score) counts as -inf, as vLLM's own -9999.0 does."""
    if not isinstance(raw, dict):
        return []
    tokens = raw.get("tokens") or []
    chosen = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    result: list[TokenLogprob] = []
    for i, token in enumerate(tokens):
        logprob = chosen[i] if i < len(chosen) and chosen[i] is not None else -9999.0
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        ranked = sorted(
            ((str(t), float(lp) if lp is not None else -9999.0) for t, lp in top.items()),
            key=lambda pair: -pair[1],
        )
        result.append(TokenLogprob(str(token), float(logprob), tuple(ranked)))
    return result


def _chunk(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise PolicyError(
            PolicyError.UNREADABLE.format(what="a stream chunk that is not JSON")
        ) from exc
    if not isinstance(data, dict):
        raise PolicyError(PolicyError.UNREADABLE.format(what="a stream chunk that is no object"))
    if "error" in data:
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else None
        raise PolicyError(PolicyError.REFUSED.format(message=message or "a stream error"))
    return data
