"""The chat format, defined once: ChatML with the reserved <|im_start|> / <|im_end|> tokens.

    [BOS]<|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ... and, to ask for a reply, <|im_start|>assistant\\n

`CHAT_TEMPLATE` is the same format as Jinja; qinglm.tokenizer defines it, since it is saved beside every
tokenizer (tokenizer_config.json and chat_template.jinja), so that transformers' `apply_chat_template`
renders exactly what `render_chat` does.

`encode_chat` gives the ids: the control tokens are inserted by id and message contents are encoded as
text, so a message that contains "<|im_end|>" or "[EOS]" cannot forge a turn or end a document. For
contents without such strings the ids are the ones transformers' apply_chat_template gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError
from qinglm.tokenizer import CHAT_TEMPLATE as CHAT_TEMPLATE  # defined with the tokenizer, which saves it
from qinglm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


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


@dataclass
class ChatIds:
    """Chat ids (one turn, or a whole chat) and which of them are message content."""

    ids: list[int]
    content: list[bool]  # True for the tokens of the message's content (not the template's)


def encode_turn(tokenizer: Tokenizer, role: str, content: str) -> ChatIds:
    """Return one turn's ids; control tokens by id, content normalised like training text and encoded as text.

    "role\\ncontent" is encoded as one piece, as transformers does with the text between two control
    tokens, so the ids match apply_chat_template's; a token is content when it starts inside content.
    """
    head = f"{role}\n"
    enc = tokenizer.backend.encode(head + normalize_text(content), add_special_tokens=False)
    newline = tokenizer.encode("\n")
    ids = [tokenizer.im_start_id, *enc.ids, tokenizer.im_end_id, *newline]
    mask = [False] + [start >= len(head) for start, _ in enc.offsets] + [False] * (1 + len(newline))
    return ChatIds(ids, mask)


def generation_prompt(tokenizer: Tokenizer) -> list[int]:
    """Return the ids that ask for a reply: <|im_start|>assistant\\n."""
    return [tokenizer.im_start_id, *tokenizer.encode("assistant\n")]


def join_turns(
    tokenizer: Tokenizer, turns: Sequence[ChatIds], add_generation_prompt: bool = False
) -> ChatIds:
    """Return [BOS] + the turns (+ the generation prompt) as one ChatIds."""
    ids, mask = [tokenizer.bos_id], [False]
    for t in turns:
        ids += t.ids
        mask += t.content
    if add_generation_prompt:
        tail = generation_prompt(tokenizer)
        ids += tail
        mask += [False] * len(tail)
    return ChatIds(ids, mask)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> ChatIds:
    """Return the ids of render_chat(messages) built turn by turn, with the content mask."""
    check_messages(messages)
    turns = [encode_turn(tokenizer, m["role"], m["content"]) for m in messages]
    return join_turns(tokenizer, turns, add_generation_prompt)
