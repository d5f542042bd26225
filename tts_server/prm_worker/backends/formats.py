"""How a PRM family wants a solution laid out, and where in the tokens each step is scored.

A `StepFormat` is one of four layouts (the registry, `prm_worker/registry.toml`, names one per
family and cites the model card or reference code it follows):

- `chat_tagged` (Qwen2.5-Math-PRM): the conversation [system prompt, user question, assistant =
  the steps, each followed by the step tag], rendered with the model's chat template; a step is
  scored at its tag token. The tag is a special token, so one inside a step's own text would
  split that step in two: it is stripped (there is no way to escape a special token in text),
  from the question too, until none is left (`<extra_<extra_0>0>` would otherwise reassemble one).
- `chat_turns` (RLHFlow): one user turn per step (the first is question + `question_sep` + step),
  each answered by an assistant turn `reply`; a step is scored at the token that predicts the
  reply (the last token of the assistant header).
- `text_tagged` (Math-Shepherd): plain text question + `question_sep` + the steps, each followed
  by the tag, joined by `step_sep`, tokenized whole with the tokenizer's special tokens (BOS);
  a step is scored at the last token of its tag.
- `token_pieces` (Skywork): BOS + question + `question_sep` tokenized, then each step tokenized
  alone followed by the tag's (last) token id; a step is scored at that token.

Outside `chat_tagged` the scored positions come from where the format put each tag or turn (by
character offset or by construction), never from searching the tokens for a tag id, so no text
inside a step can add a score; the tag is still cleaned out of the text (`tag_in_text`) so the
model does not read a false step end. Every step is stripped of surrounding whitespace; an empty
step stays a step (its tag right after the previous one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from tts_server.prm_worker.backends.base import BackendError, ScoreItem

Layout = Literal["chat_tagged", "chat_turns", "text_tagged", "token_pieces"]
# What a tag-like string inside a question or step becomes: deleted (a special token), deleted
# where it stands as a word (an ordinary word such as " ки", kept inside longer words), or a
# space (a whitespace separator such as "\n", so words stay apart).
TagInText = Literal["remove", "remove_word", "space"]
ScoreKind = Literal["class_head", "token_pair", "value_head"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
TAG_IN_TEXT: tuple[str, ...] = get_args(TagInText)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
# The backends that serve learned PRMs (arith is a rule checker: no family).
MODEL_BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Encoded:
    """A solution's token ids and, per step, the index of the token whose output scores it."""

    ids: list[int]
    positions: list[int]


@dataclass(frozen=True)
class StepFormat:
    step_tag: str = ""
    system_prompt: str = ""
    layout: Layout = "chat_tagged"
    question_sep: str = ""
    step_sep: str = ""
    reply: str = ""
    tag_in_text: TagInText = "remove"

    def strip_tags(self, text: str) -> str:
        tag = self.step_tag
        if not tag:
            return text
        if self.tag_in_text == "space":
            return re.sub(f"(?:{re.escape(tag)})+", " ", text)
        if self.tag_in_text == "remove_word":
            word = re.compile(rf"(?<!\w){re.escape(tag.strip())}(?!\w)")
            while word.search(text):
                text = word.sub("", text)
            return text
        while tag in text:
            text = text.replace(tag, "")
        return text

    def clean_step(self, step: str) -> str:
        return self.strip_tags(step).strip()

    def messages(self, item: ScoreItem) -> list[dict[str, str]]:
        """The chat messages of one solution (the chat layouts)."""
        question, steps = item
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.layout == "chat_turns":
            turns: list[dict[str, str]] = []
            for k, step in enumerate(steps):
                text = self.clean_step(step)
                if k == 0:
                    text = self.strip_tags(question) + self.question_sep + text
                turns += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": self.reply},
                ]
            return system + turns
        content = "".join(self.clean_step(step) + self.step_tag for step in steps)
        return [
            *system,
            {"role": "user", "content": self.strip_tags(question)},
            {"role": "assistant", "content": content},
        ]

    def render(self, tokenizer: Any, item: ScoreItem) -> str:
        """The text the PRM reads. Chat layouts: through the tokenizer's chat template (to be
        tokenized without adding special tokens: the template has put them in)."""
        if self.layout in ("chat_tagged", "chat_turns"):
            return _chat(tokenizer, self.messages(item), generation_prompt=False)
        if self.layout == "text_tagged":
            return self._tagged_text(item)[0]
        question, steps = item
        head = f"{tokenizer.bos_token}{self.strip_tags(question)}{self.question_sep}"
        return head + "".join(self.clean_step(step) + self.step_tag for step in steps)

    def encode(self, tokenizer: Any, item: ScoreItem) -> Encoded:
        """Token ids and scored positions of `item` (RuntimeError if they cannot be found)."""
        if self.layout == "chat_tagged":
            ids = list(
                tokenizer(self.render(tokenizer, item), add_special_tokens=False)["input_ids"]
            )
            tag_id = tokenizer.convert_tokens_to_ids(self.step_tag)
            return Encoded(ids, [i for i, token in enumerate(ids) if token == tag_id])
        if self.layout == "token_pieces":
            return self._pieces(tokenizer, item)
        if self.layout == "text_tagged":
            text, ends = self._tagged_text(item)
            encoded = tokenizer(text, return_offsets_mapping=True)
            # The tag's last character: its last token, as the references read the tag's id.
            chars = [end - 1 for end in ends]
            return Encoded(list(encoded["input_ids"]), _tokens_at(encoded, chars))
        messages = self.messages(item)
        text = _chat(tokenizer, messages, generation_prompt=False)
        replies = []
        skip = 1 if self.system_prompt else 0
        for k in range(len(item[1])):
            prefix = _chat(tokenizer, messages[: skip + 2 * k + 1], generation_prompt=True)
            if not text.startswith(prefix):
                raise RuntimeError("the chat template does not render the turns as a prefix")
            replies.append(len(prefix))  # the reply's first character
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # The token before the reply's first token predicts it (RLHFlow reads logits there).
        positions = [i - 1 for i in _tokens_at(encoded, replies)]
        return Encoded(list(encoded["input_ids"]), positions)

    def check_tokenizer(self, tokenizer: Any) -> str | None:
        """Why `tokenizer` cannot serve this format, or None."""
        if self.layout in ("chat_tagged", "chat_turns") and not getattr(
            tokenizer, "chat_template", None
        ):
            return "has no chat template"
        if self.layout == "chat_tagged":
            tag_id = tokenizer.convert_tokens_to_ids(self.step_tag)
            if not isinstance(tag_id, int) or tag_id == tokenizer.unk_token_id:
                return f"has no {self.step_tag} token"
        if self.layout in ("chat_turns", "text_tagged") and not getattr(
            tokenizer, "is_fast", False
        ):
            return "is not a fast tokenizer (the format needs its character offsets)"
        if self.layout == "token_pieces" and not tokenizer.bos_token:
            return "has no BOS token (the format starts with it)"
        return None

    def _tagged_text(self, item: ScoreItem) -> tuple[str, list[int]]:
        """The text and, per step, the character index just after its tag."""
        question, steps = item
        text = self.strip_tags(question) + self.question_sep
        ends: list[int] = []
        for k, step in enumerate(steps):
            text += (self.step_sep if k else "") + self.clean_step(step) + self.step_tag
            ends.append(len(text))
        return text, ends

    def _pieces(self, tokenizer: Any, item: ScoreItem) -> Encoded:
        question, steps = item
        ids = list(
            tokenizer.encode(f"{tokenizer.bos_token}{self.strip_tags(question)}{self.question_sep}")
        )
        tag_id = tokenizer.encode(self.step_tag)[-1]
        positions: list[int] = []
        for step in steps:
            text = self.clean_step(step)
            if text:  # an empty step is its tag alone
                ids += tokenizer.encode(text)
            ids.append(tag_id)
            positions.append(len(ids) - 1)
        return Encoded(ids, positions)


@dataclass(frozen=True)
class ScoreReading:
    """How a step's score is read from the model at its position.

    `class_head`: softmax over a 2-way head's logits, P(`positive_class`). `token_pair`: softmax
    over the LM logits of two tokens (each the last id of encoding `good_token` / `bad_token`, as
    the references take them), P(good). `value_head`: sigmoid of a Linear(hidden, 1) on the last
    hidden state, its weights under `head` in the checkpoint (e.g. `v_head.summary`).
    """

    kind: ScoreKind
    positive_class: int = 1
    good_token: str = ""
    bad_token: str = ""
    head: str = ""


@dataclass(frozen=True)
class Family:
    """PRMs sharing a format and a score reading; the backends that can serve them."""

    name: str
    format: StepFormat
    score: ScoreReading
    backends: tuple[str, ...]
    source: str = ""

    def require(self, backend: str) -> None:
        """BackendError unless `backend` can serve this family."""
        if backend not in self.backends:
            can = ", ".join(self.backends)
            raise BackendError(
                f"the {backend} backend cannot serve the {self.name} family "
                f"({self.format.layout}, {self.score.kind}); use --backend {can}"
            )


def _chat(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return text


def _tokens_at(encoded: Any, chars: list[int]) -> list[int]:
    """For each character index, the index of the token covering it."""
    spans: list[tuple[int, int]] = list(encoded["offset_mapping"])
    found: list[int] = []
    start = 0
    for char in chars:  # ascending: resume the scan where the last one stopped
        index = next(
            (i for i in range(start, len(spans)) if spans[i][0] <= char < spans[i][1]), None
        )
        if index is None:
            raise RuntimeError(f"no token covers character {char} of the rendered solution")
        found.append(index)
        start = index
    return found


QWEN_MATH_PRM = StepFormat(
    step_tag="<extra_0>",
    system_prompt="Please reason step by step, and put your final answer within \\boxed{}.",
)
