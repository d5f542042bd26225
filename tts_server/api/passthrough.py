"""The OpenAI parameters a strategy hands on: how many choices (`n`), and what vLLM applies to
every sample (`logit_bias`, the penalties, `response_format`), checked once. Whether the chosen
strategy can honour each is `api.options.PARAMETERS`."""

from __future__ import annotations

from tts_server.api.errors import APIError
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest
from tts_server.types import PassThrough, StrategyName


def choices(n: int, strategy: StrategyName, budget: int) -> int:
    """How many choices to answer with: `n` distinct candidates need as many to choose from."""
    if n == 1:
        return 1
    if strategy == "greedy":
        raise APIError(
            400,
            f"n={n} needs {n} distinct candidates, and greedy writes one: ask for a sampling "
            "strategy (majority, best_of_n, beam_search, dvts, auto) or set n to 1",
            param="n",
            code="unsupported_parameter",
        )
    if n > budget:
        raise APIError(
            400,
            f"n={n} asks for more choices than the budget's {budget} candidates: raise the "
            "budget (X-TTS-Budget, tts.budget) or lower n",
            param="n",
        )
    return n


def passthrough(body: CompletionRequest | ChatCompletionRequest) -> PassThrough:
    """The parameters vLLM applies to every sample (the strategy was checked to honour them)."""
    bias = body.logit_bias or None
    if bias is not None:
        for token, value in bias.items():
            if not token.isdigit():
                raise APIError(
                    400,
                    f"'logit_bias' keys are token ids (as strings), got {token!r}",
                    param="logit_bias",
                )
            if not -100 <= value <= 100:
                raise APIError(
                    400,
                    f"'logit_bias' values are between -100 and 100, got {value} for {token}",
                    param="logit_bias",
                )
    response_format = None
    if isinstance(body, ChatCompletionRequest) and body.response_format is not None:
        response_format = _response_format(body.response_format)
    return PassThrough(
        logit_bias=bias,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        response_format=response_format,
    )


def _response_format(value: dict[str, object]) -> dict[str, object] | None:
    """The format to constrain every sample to; None for free text."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(
                400,
                "'response_format' of type json_schema needs a 'json_schema' object with a name "
                "(and its 'schema')",
                param="response_format",
            )
        return value
    if kind == "json_object":
        return value
    raise APIError(
        400,
        f"'response_format' type must be text, json_object or json_schema, got {kind!r}",
        param="response_format",
    )
