"""The OpenAI parameters a strategy hands on: how many choices (`n`), what vLLM applies to every
sample (`logit_bias`, the penalties, `response_format`) and the tools (rendered into the prompt;
a call constrains greedy's one generation to its JSON), checked once. Whether the chosen
strategy can honour each is `api.parameters.PARAMETERS`."""

from __future__ import annotations

import re
from typing import Any

from tts_server.api.errors import APIError
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest
from tts_server.types import PassThrough, StrategyName, Tools

# OpenAI's rule for a function's name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
            if not (token.isascii() and token.isdigit()):
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


_AUTO = (
    "tool_choice 'auto' (OpenAI's default with tools: a call or text, as the model likes) is not "
    "supported: the gateway reads no tool call out of free text; use 'required', name a function "
    '({"type": "function", "function": {"name": ...}}), or \'none\''
)


def tools(body: CompletionRequest | ChatCompletionRequest, strategy: StrategyName) -> Tools | None:
    """The tools to render into the prompt and the call the answer must be, if any: a call is
    answered by greedy only (one whole generation, constrained to the call's JSON)."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(
                400, "'tool_choice' asks for a call, and no tools are given", param="tool_choice"
            )
        return None
    names = [_tool_name(i, tool) for i, tool in enumerate(body.tools)]
    if choice is None or choice == "auto":
        raise APIError(400, _AUTO, param="tool_choice", code="unsupported_parameter")
    if choice == "none":
        return Tools(tuple(body.tools))
    call: object = Tools.ANY_TOOL
    if choice != "required":
        function = choice.get("function") if isinstance(choice, dict) else None
        call = function.get("name") if isinstance(function, dict) else None
        if not isinstance(call, str) or call not in names:
            raise APIError(
                400,
                "'tool_choice' must be 'none', 'required', or name one of the tools' functions "
                '({"type": "function", "function": {"name": ...}})',
                param="tool_choice",
            )
    if strategy != "greedy":
        raise APIError(
            400,
            "a 'tool_choice' that asks for a call is answered by greedy only: one call has no "
            "answer to vote on or steps to search; ask for greedy, or 'none'",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if body.response_format not in (None, {"type": "text"}):
        raise APIError(
            400,
            "'response_format' and a tool call both say what the answer is: send one",
            param="response_format",
        )
    return Tools(tuple(body.tools), str(call))


def _tool_name(index: int, tool: dict[str, Any]) -> str:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    parameters = function.get("parameters", {}) if isinstance(function, dict) else None
    if (
        tool.get("type") != "function"
        or not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or not isinstance(parameters, dict)
    ):
        raise APIError(
            400,
            'each tool must be {"type": "function", "function": {"name": ..., '
            '"parameters": {...}}} with a name of letters, digits, _ and - (at most 64)',
            param=f"tools.{index}",
        )
    return name


def call_format(calling: Tools) -> dict[str, Any]:
    """A JSON-schema response format whose every match is one call of an allowed function:
    {"name": ..., "arguments": {...}} (vLLM's structured outputs keep every token to it)."""
    options: list[dict[str, Any]] = []
    for tool in calling.definitions:
        function = tool["function"]
        if calling.call not in (Tools.ANY_TOOL, function["name"]):
            continue
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
