"""How a PRM family wants a solution laid out, shared by the backends that serve it.

Qwen2.5-Math-PRM: the conversation [system prompt, user question, assistant = the steps, each
followed by the step tag `<extra_0>`], rendered with the model's chat template; the PRM scores
the position of every tag. The tag is a special token, so one inside a step's own text would
split that step in two: it is stripped (there is no way to escape a special token in text),
from the question too, until none is left (`<extra_<extra_0>0>` would otherwise reassemble one).
Each step is also stripped of surrounding whitespace; an empty step stays a step (its tag right
after the previous one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tts_server.prm_worker.backends.base import ScoreItem


@dataclass(frozen=True)
class StepFormat:
    step_tag: str
    system_prompt: str

    def strip_tags(self, text: str) -> str:
        while self.step_tag in text:
            text = text.replace(self.step_tag, "")
        return text

    def messages(self, item: ScoreItem) -> list[dict[str, str]]:
        """The chat messages of one solution, every step followed by the tag."""
        question, steps = item
        content = "".join(self.strip_tags(step).strip() + self.step_tag for step in steps)
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.strip_tags(question)},
            {"role": "assistant", "content": content},
        ]

    def render(self, tokenizer: Any, item: ScoreItem) -> str:
        """The text the PRM reads, through a transformers tokenizer's chat template (to be
        tokenized without adding special tokens: the template has put them in)."""
        text: str = tokenizer.apply_chat_template(
            self.messages(item), tokenize=False, add_generation_prompt=False
        )
        return text


QWEN_MATH_PRM = StepFormat(
    step_tag="<extra_0>",
    system_prompt="Please reason step by step, and put your final answer within \\boxed{}.",
)
