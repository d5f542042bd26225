"""`judge`: a generative verifier as the PRM, for users who have no PRM: any model behind an
OpenAI-compatible chat endpoint (the policy's own vLLM, or another model) is asked whether a step
is correct, and the step's score is its probability of answering yes.

Prompts: mode `step` (default) asks once per step, showing the question and the steps up to it
("Is step k correct? Answer yes or no."); mode `solution` asks once per solution, showing all of
it, and every step of the solution gets that one score (cheaper by a factor of the step count,
but a search then cannot tell its steps apart). The wording is a template (`judge_template`, a
file with the placeholders {question}, {steps} and {last}; literal braces doubled).

The call: `POST /v1/chat/completions` with `max_tokens: 1, temperature: 0, logprobs: true,
top_logprobs: k`. Chat, not /v1/completions, so the endpoint applies the judge model's own chat
template (an instruct model answers a question as it was tuned to). Chat takes one conversation
per request, so a batch's prompts go as concurrent requests (`concurrency` at a time); vLLM
batches them itself (continuous batching), and a step's prompt shares its prefix with the
previous step's, which vLLM's prefix cache reuses. Score = P(yes) / (P(yes) + P(no)), summing
the variants among the top k ("yes", " Yes", "YES", ...). When neither word is among them the
score is `fallback` (0.5: no opinion), counted in `prm_judge_fallbacks_total` and logged once.

Scores are remembered per (question, steps shown) (`memo_size` prompts, LRU): a search that
re-scores a growing solution asks only about its new step.

Failures: a 4xx (a prompt over the judge's context, a refused option) rejects that solution,
naming the endpoint's reason: the worker answers 400 for it; timeouts, connection errors and 5xx
are retried (vllm_http.VLLMServer), then the batch is a 503. Health: the endpoint's /v1/models
lists the model. Tokens: what the endpoint computed for every call made for a solution:
usage.prompt_tokens less the prefix-cache hits it reports (`prompt_tokens_details`), plus
completion_tokens (a prompt two solutions share is counted once, for the first). Parameters:
from the config.json in the model folder the endpoint reports (`root`) when it is on this
machine, else None.
"""

from __future__ import annotations

import logging
import math
import string
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from tts_server.prm_worker import metrics
from tts_server.prm_worker.backends.base import (
    BackendError,
    BackendUnavailable,
    ItemsRejected,
    PRMBackend,
    ScoreItem,
)
from tts_server.prm_worker.backends.vllm_http import (
    Refused,
    VLLMServer,
    folder_parameters,
    local_folder,
)

logger = logging.getLogger("tts_server.prm_worker")

JudgeMode = Literal["step", "solution"]
CHAT_PATH = "/v1/chat/completions"
TEMPLATES: dict[str, str] = {
    "step": (
        "Here is a math problem and the first steps of a solution.\n\n"
        "Problem: {question}\n\n{steps}\n\n"
        "Is step {last} correct? Answer yes or no."
    ),
    "solution": (
        "Here is a math problem and a solution.\n\n"
        "Problem: {question}\n\n{steps}\n\n"
        "Is the solution correct? Answer yes or no."
    ),
}
PLACEHOLDERS = frozenset({"question", "steps", "last"})
# Stripped from a candidate token before comparing: BPE space markers and punctuation.
_AROUND = " \t\n\"'.,:;!?*()[]Ġ▁"

# (question, the steps shown): one prompt.
_Key = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Answer:
    score: float
    tokens: int


class JudgeBackend(PRMBackend):
    name = "judge"

    def __init__(
        self,
        judge_url: str,
        model: str,
        *,
        judge_mode: JudgeMode = "step",
        top_logprobs: int = 20,
        judge_template: str | None = None,
        fallback: float = 0.5,
        concurrency: int = 8,
        memo_size: int = 4096,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`judge_url`: the endpoint; `model`: its served model name; `top_logprobs`: candidates
        read (vLLM allows up to its --max-logprobs, 20 by default); `judge_template`: a file."""
        if not judge_url.startswith(("http://", "https://")):
            raise BackendError(f"the judge URL must start with http:// or https://: {judge_url!r}")
        if judge_mode not in TEMPLATES:
            raise BackendError(f"judge mode is step or solution, not {judge_mode!r}")
        if top_logprobs < 1 or concurrency < 1 or memo_size < 0:
            raise BackendError("top_logprobs >= 1, concurrency >= 1 and memo_size >= 0, please")
        if not 0.0 <= fallback <= 1.0 or timeout_s <= 0 or retries < 0:
            raise BackendError("fallback in [0, 1], timeout_s > 0 and retries >= 0, please")
        self.model_name = model
        self.mode: JudgeMode = judge_mode
        self.top_logprobs = top_logprobs
        self.template = _read_template(judge_template) if judge_template else TEMPLATES[judge_mode]
        self.fallback = fallback
        self.memo_size = memo_size
        self.parameters = None  # from the endpoint's model folder, once it answers
        self._server = VLLMServer(
            judge_url,
            timeout_s=timeout_s,
            retries=retries,
            transport=transport,
            name="the judge endpoint",
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prm-judge")
        self._memo: OrderedDict[_Key, float] = OrderedDict()
        self._listed = False
        self._warned = False
        # Tokens the endpoint computed per solution of the last batch, for `count_tokens`.
        self._computed: dict[tuple[str, tuple[str, ...]], deque[int]] = {}
        try:  # the endpoint may start after the worker
            self._check_served(probe=True)
        except BackendUnavailable as exc:
            logger.warning("the judge endpoint is not ready yet: %s", exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._server.close()

    def healthy(self) -> bool:
        try:
            self._check_served(probe=True)
        except BackendUnavailable:
            return False
        return True

    def count_tokens(self, item: ScoreItem) -> int:
        counted = self._computed.get((item[0], tuple(item[1])))
        return counted.popleft() if counted else 0  # not asked in the last batch: nothing

    def prompt(self, question: str, steps: Sequence[str]) -> str:
        """The verification prompt showing `steps` (the last of them is judged)."""
        shown = "\n".join(f"Step {k}: {step.strip()}" for k, step in enumerate(steps, 1))
        return self.template.format(question=question.strip(), steps=shown, last=len(steps))

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        return self.score_tails(items, [0] * len(items))

    def score_tails(self, items: Sequence[ScoreItem], first: Sequence[int]) -> list[list[float]]:
        """Step mode asks only about the steps from first[i] on: a judge pays per step, so the
        steps a search has scores for are never asked again."""
        if not self._listed:
            self._check_served()
        self._computed.clear()
        # The prompts each solution needs, in step order, and who needs each prompt first.
        needs = [self._keys(item, start) for item, start in zip(items, first, strict=True)]
        asked: dict[_Key, None] = {}
        for keys in needs:
            for key in keys:
                if key in self._memo:
                    self._memo.move_to_end(key)  # least recently used goes first
                else:
                    asked[key] = None
        answers, refusals = self._ask(list(asked))
        reasons: dict[int, str] = {}
        scores: list[list[float]] = [[] for _ in items]
        for i, (item, keys) in enumerate(zip(items, needs, strict=True)):
            refused = next((key for key in keys if key in refusals), None)
            if refused is not None:
                what = f"step {len(refused[1])}" if self.mode == "step" else "it"
                reasons[i] = f"the judge endpoint refused {what} ({refusals[refused]})"
                continue
            row = [answers[key].score if key in answers else self._memo[key] for key in keys]
            scores[i] = row if self.mode == "step" else (row * len(item[1]))[first[i] :]
        for key, answer in answers.items():
            self._remember(key, answer.score)
        self._attribute(items, needs, answers, reasons)
        if reasons:
            raise ItemsRejected(reasons, scores)
        return scores

    # --- internals ---

    def _keys(self, item: ScoreItem, start: int = 0) -> list[_Key]:
        question, steps = item
        if self.mode == "solution":
            return [(question, tuple(steps))]
        return [(question, tuple(steps[:k])) for k in range(start + 1, len(steps) + 1)]

    def _ask(self, keys: list[_Key]) -> tuple[dict[_Key, _Answer], dict[_Key, str]]:
        """Ask every prompt, concurrently. A refusal (4xx) is that prompt's; any other failure
        (BackendUnavailable after the retries) fails the batch and cancels what has not started."""
        futures: dict[Future[_Answer], _Key] = {
            self._pool.submit(self._ask_one, key): key for key in keys
        }
        answers: dict[_Key, _Answer] = {}
        refusals: dict[_Key, str] = {}
        try:
            for future in as_completed(futures):
                try:
                    answers[futures[future]] = future.result()
                except Refused as exc:
                    refusals[futures[future]] = str(exc)
        finally:
            for future in futures:
                future.cancel()
        return answers, refusals

    def _ask_one(self, key: _Key) -> _Answer:
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": self.prompt(key[0], key[1])}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        data = self._server.post(CHAT_PATH, body)
        probability = yes_probability(_candidates(data))
        if probability is None:
            probability = self.fallback
            metrics.JUDGE_FALLBACKS.inc()
            if not self._warned:
                self._warned = True
                logger.warning(
                    "the judge answered neither yes nor no among its top %d tokens: score %g "
                    "(logged once; counted in prm_judge_fallbacks_total)",
                    self.top_logprobs,
                    self.fallback,
                )
        return _Answer(probability, _used_tokens(data))

    def _remember(self, key: _Key, score: float) -> None:
        if self.memo_size == 0:
            return
        self._memo[key] = score
        self._memo.move_to_end(key)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    def _attribute(
        self,
        items: Sequence[ScoreItem],
        needs: list[list[_Key]],
        answers: dict[_Key, _Answer],
        reasons: dict[int, str],
    ) -> None:
        """Each answered prompt's tokens go to the first scored solution that needed it."""
        unclaimed = dict(answers)
        for i, (item, keys) in enumerate(zip(items, needs, strict=True)):
            if i in reasons:
                continue
            tokens = sum(unclaimed.pop(key).tokens for key in keys if key in unclaimed)
            self._computed.setdefault((item[0], tuple(item[1])), deque()).append(tokens)

    def _check_served(self, *, probe: bool = False) -> None:
        try:
            cards = self._server.get("/v1/models", probe=probe).get("data")
        except Refused as exc:
            raise BackendUnavailable(f"the judge endpoint's /v1/models refused: {exc}") from exc
        except ValueError as exc:
            raise BackendUnavailable(f"the judge endpoint's /v1/models: {exc}") from exc
        cards = [c for c in cards or [] if isinstance(c, dict)]
        card = next((c for c in cards if c.get("id") == self.model_name), None)
        if card is None:
            served = [c.get("id") for c in cards]
            raise BackendUnavailable(f"the judge endpoint serves {served}, not {self.model_name!r}")
        if not self._listed:
            self._listed = True
            self.parameters = folder_parameters(local_folder(card.get("root")))


def yes_probability(candidates: Iterable[tuple[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the candidate tokens, case and spacing variants summed;
    None when neither word is among them."""
    yes = no = 0.0
    for token, logprob in candidates:
        word = token.strip(_AROUND).lower()
        if word not in ("yes", "no") or not math.isfinite(logprob):
            continue
        probability = math.exp(min(logprob, 0.0))
        if word == "yes":
            yes += probability
        else:
            no += probability
    if yes + no <= 0.0:
        return None
    return yes / (yes + no)


def _candidates(data: dict[str, Any]) -> list[tuple[str, float]]:
    """The first generated token's top logprobs, plus that token itself if it is not among them."""
    try:
        [first, *_] = data["choices"][0]["logprobs"]["content"]
        top = [(str(c["token"]), float(c["logprob"])) for c in first.get("top_logprobs") or []]
        chosen = (str(first["token"]), float(first["logprob"]))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError("the judge endpoint answered without the token's logprobs") from exc
    return top if chosen[0] in {token for token, _ in top} else [*top, chosen]


def _used_tokens(data: dict[str, Any]) -> int:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        raise ValueError("the judge endpoint answered without usage")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion or 0, int):
        raise ValueError("the judge endpoint's usage has no token counts")
    # Computed, not read: a step's prompt repeats the previous step's, which the endpoint's
    # prefix cache serves (vLLM says how much with --enable-prompt-tokens-details).
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return prompt - (cached if isinstance(cached, int) else 0) + int(completion or 0)


def _read_template(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BackendError(f"cannot read the judge template {path!r}: {exc}") from exc
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise BackendError(f"the judge template {path!r} is not a format string: {exc}") from exc
    unknown = fields - PLACEHOLDERS
    if unknown or "steps" not in fields:
        raise BackendError(
            f"the judge template {path!r} must use {{steps}} and only {sorted(PLACEHOLDERS)} "
            f"(literal braces doubled); it has {sorted(fields)}"
        )
    return text
