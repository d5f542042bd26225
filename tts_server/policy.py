"""The policy client: vLLM's OpenAI-compatible HTTP API.

Prompts travel as token ids, so a partial solution is continued with exactly the tokens the model
produced. Every sample is sent as its own prompt with n=1 in one batched call: vLLM's `usage`
then counts prompt and completion tokens exactly as its `/metrics` counters do (with n>1 it
counts the prompt once). Its `cached_tokens` covers only the last prompt of a batched call
(vLLM 0.32), so the cached count reported here is a lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from tts_server.types import Generation, PolicyUsage, SamplingConfig


class PolicyError(Exception):
    """The policy server failed or refused a call. `status` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 502, upstream_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.upstream_status = upstream_status


class VLLMPolicyClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 300.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(self.base_url + path, json=body)
        except httpx.TimeoutException as exc:
            raise PolicyError("the policy server timed out", status=504) from exc
        except httpx.HTTPError as exc:
            raise PolicyError(f"the policy server is unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            message = _upstream_message(response)
            # The upstream's 4xx is about the request (e.g. prompt over the context length).
            status = 400 if 400 <= response.status_code < 500 else 502
            raise PolicyError(
                f"policy server: {message}", status=status, upstream_status=response.status_code
            )
        data: dict[str, Any] = response.json()
        return data

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
    ) -> list[list[Generation]]:
        if not prompts or n < 1:
            return [[] for _ in prompts]
        expanded = [list(p) for p in prompts for _ in range(n)]
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": expanded,
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
        if sampling.seed is not None and len(expanded) == 1:
            # A shared seed would make duplicate prompts (beam copies) sample identically.
            body["seed"] = sampling.seed
        data = await self._post("/v1/completions", body)
        choices = sorted(data.get("choices", []), key=lambda c: int(c["index"]))
        if len(choices) != len(expanded):
            raise PolicyError(
                f"policy server returned {len(choices)} choices for {len(expanded)} prompts"
            )
        raw_usage = data.get("usage") or {}
        details = raw_usage.get("prompt_tokens_details") or {}
        usage.add(
            PolicyUsage(
                prompt_tokens=int(raw_usage.get("prompt_tokens", 0)),
                completion_tokens=int(raw_usage.get("completion_tokens", 0)),
                cached_tokens=int(details.get("cached_tokens") or 0),
                calls=1,
            )
        )
        generations = [_to_generation(c) for c in choices]
        return [generations[i * n : (i + 1) * n] for i in range(len(prompts))]

    async def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The chat template applied once, with the generation prompt, as vLLM renders it."""
        body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
        data = await self._post("/tokenize", body)
        return [int(t) for t in data["tokens"]]

    async def tokenize_text(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": True}
        data = await self._post("/tokenize", body)
        return [int(t) for t in data["tokens"]]

    async def health(self) -> bool:
        try:
            response = await self._client.get(self.base_url + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


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


def _upstream_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return f"HTTP {response.status_code}"
