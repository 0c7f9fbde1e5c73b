"""Turning conversations into token ids and labels, with the loss on the assistant's answers only.

Examples are rendered with the model's own chat template, as the service renders its prompts, and
question/answer pairs get the service's system prompt (`app.rag.prompts.SYSTEM_PROMPT`), so the adapter
learns its style under the prompt it will be served with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from app.llm.base import ChatMessage
from app.rag.prompts import SYSTEM_PROMPT
from app.training.errors import FinetuneError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# The same text as the service's fallback for models without a chat template (HFLoraBackend._encode), plus
# the end-of-text token after each answer so the model learns where to stop.
# ('\n' is written as an expression: transformers renders templates with trim_blocks, which would eat a
# newline that follows a block tag.)
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class EncodedExample(TypedDict):
    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]


def question_messages(question: str, context: str | None, answer: str) -> list[ChatMessage]:
    """A question/answer pair as the service asks it: its system prompt, with the context where there is one."""
    system = SYSTEM_PROMPT if context is None else f"{SYSTEM_PROMPT}\n\nContext:\n{context}"
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a template-less tokenizer the service's fallback format; True when that was needed."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], max_length: int
) -> tuple[EncodedExample, bool]:
    """(ids, mask, labels) cut to max_length, and whether it was cut; labels are IGNORE_INDEX except on the
    assistant turns (their text and the template's end-of-turn token)."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    answer_spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            # Templates that rewrite earlier turns (e.g. dropping past reasoning) give no stable answer span.
            raise FinetuneError(
                "the model's chat template renders earlier turns differently once later turns follow, "
                "so the answer tokens cannot be located: use question/answer lines or another model"
            )
        # Whitespace after the end-of-turn token is never generated, so it is not learned either.
        answer_spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(start <= offset < end for start, end in answer_spans) else IGNORE_INDEX
        for token, (offset, _) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, truncated


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    conversation = [{"role": message["role"], "content": message["content"]} for message in messages]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise FinetuneError("the model's chat template did not render text")
    return text


@dataclass(frozen=True)
class PaddingCollator:
    """Pads a batch on the right to its longest example; padding is masked out and never in the loss."""

    pad_token_id: int

    def __call__(self, features: list[EncodedExample]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(feature["input_ids"]) for feature in features)

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [feature[key] + [value] * (width - len(feature[key])) for feature in features]  # type: ignore[literal-required]
            return torch.tensor(rows, dtype=torch.long)

        return {
            "input_ids": padded("input_ids", self.pad_token_id),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX),
        }
