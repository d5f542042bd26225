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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx

from tts_server.clients.http import RetryPolicy, Upstream, UpstreamError
from tts_server.flops import context_sum
from tts_server.types import Generation, PolicyUsage, SamplingConfig

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
        body.update(sampling.passthrough.body())
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
    return Generation(
        text=choice.get("text") or "",
        token_ids=[int(t) for t in (choice.get("token_ids") or [])],
        finish_reason="length" if finish == "length" else "stop",
        # An int stop_reason is a stop token id: treat like EOS.
        stop_reason=stop_reason if isinstance(stop_reason, str) else None,
    )
