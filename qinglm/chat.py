"""The chat format, defined once: ChatML with the reserved <|im_start|> / <|im_end|> tokens.

    [BOS]<|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ... and, to ask for a reply, <|im_start|>assistant\\n

`CHAT_TEMPLATE` is the same format as Jinja; it is saved beside every tokenizer (tokenizer_config.json and
chat_template.jinja) so that transformers' `apply_chat_template` renders exactly what `render_chat` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qinglm.errors import QingLMError

ROLES = ("system", "user", "assistant")
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Return nothing; raise QingLMError unless every message is {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise QingLMError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise QingLMError(
                f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r:.80}"
            )


def turn_prefix(role: str) -> str:
    """Return the text that opens a turn of `role` (its content follows)."""
    return f"{IM_START}{role}\n"


TURN_SUFFIX = f"{IM_END}\n"


def render_chat(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, bos_token: str = "[BOS]"
) -> str:
    """Return the chat as one string, identical to CHAT_TEMPLATE rendered by transformers."""
    check_messages(messages)
    text = bos_token + "".join(turn_prefix(m["role"]) + m["content"] + TURN_SUFFIX for m in messages)
    return text + (turn_prefix("assistant") if add_generation_prompt else "")
