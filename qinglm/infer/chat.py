"""The chat format, defined once: ChatML with the reserved <|im_start|> / <|im_end|> tokens.

    [BOS]<|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ... and, to ask for a reply, <|im_start|>assistant\\n

`CHAT_TEMPLATE` is the same format as Jinja; qinglm.tokenizer defines it, since it is saved beside every
tokenizer (tokenizer_config.json and chat_template.jinja), so that transformers' `apply_chat_template`
renders exactly what `render_chat` does.

`encode_chat` gives the ids: the control tokens are inserted by id and message contents are encoded as
text, so a message that contains "<|im_end|>" or "[EOS]" cannot forge a turn or end a document. For
contents without such strings the ids are the ones transformers' apply_chat_template gives.

Chat policy, the same for LM.chat, `qinglm chat` and the server: `prompt_budget` leaves room for the
reply, and `fit_history` drops the oldest turns until the prompt fits that budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError
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


# ---------------------------------------------------------------------------- chat policy


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Return how many tokens a prompt may take: the context less room for the reply.

    The reply gets max_new_tokens, at most half the context, so a long reply never leaves the prompt
    less than half of it. LM.chat, `qinglm chat` and the server's chats and truncated prompts use this.
    """
    return context - min(max_new_tokens, context // 2)


def fit_history(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    budget: int,
    longest_token: int | None = None,
) -> tuple[list[dict[str, str]], ChatIds]:
    """Return (messages, prompt) after dropping the oldest non-system turns until the prompt fits budget.

    The prompt is qinglm.infer.chat.encode_chat(messages, add_generation_prompt=True); each turn is encoded
    at most once. System messages and the last message are always kept; raises QingLMError when even
    that is longer than budget tokens. With longest_token (the most characters one token covers), a
    turn too long to ever fit is not encoded at all, and an oversize system prompt or last message is
    refused on its length alone.
    """
    check_messages(messages)
    msgs = [dict(m) for m in messages]
    last = len(msgs) - 1
    if longest_token is not None:
        chars = sum(len(m["content"]) for i, m in enumerate(msgs) if m["role"] == "system" or i == last)
        if chars > budget * longest_token:
            raise QingLMError(
                f"the chat's system prompt and last message are {chars} characters, more than the "
                f"{budget} tokens that fit the model's context with room for a reply; shorten them"
            )

    def hopeless(i: int) -> bool:  # so long that it would be dropped whatever its ids
        return longest_token is not None and i != last and len(msgs[i]["content"]) > budget * longest_token

    turns = [
        None if hopeless(i) else encode_turn(tokenizer, m["role"], m["content"]) for i, m in enumerate(msgs)
    ]
    size = [budget + 1 if t is None else len(t.ids) for t in turns]
    fixed = 1 + len(generation_prompt(tokenizer))  # [BOS] and the generation prompt
    total = fixed + sum(size)
    keep = [True] * len(msgs)
    droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
    d = 0
    while total > budget:
        if d == len(droppable):
            raise QingLMError(
                f"the chat prompt is {total} tokens but only {budget} fit the model's context "
                "with room for a reply; shorten the message or the system prompt"
            )
        keep[droppable[d]] = False
        total -= size[droppable[d]]
        d += 1
        # Drop the reply of a dropped question too, so the history still starts with a user turn.
        if d < len(droppable) and msgs[droppable[d]]["role"] == "assistant":
            keep[droppable[d]] = False
            total -= size[droppable[d]]
            d += 1
    kept = [i for i in range(len(msgs)) if keep[i]]
    prompt = join_turns(tokenizer, [turns[i] for i in kept], add_generation_prompt=True)
    return [msgs[i] for i in kept], prompt
