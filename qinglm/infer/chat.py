"""Chat ids: the template of qinglm.chat_template (ChatML turns, tools, tool calls and results, thinking)
encoded turn by turn, and the chat policy.

`CHAT_TEMPLATE` is the same template as Jinja, saved beside every tokenizer (tokenizer_config.json and
chat_template.jinja), so that transformers' `apply_chat_template` renders exactly what `render_chat` does.

`encode_chat` gives the ids: the control tokens are inserted by id and message contents are encoded as
text, so a message that contains "<|im_end|>" or "[EOS]" cannot forge a turn or end a document. For
contents without such strings the ids are the ones transformers' apply_chat_template gives.

Chat policy, the same for LM.chat, `qinglm chat` and the server: `prompt_budget` leaves room for the
reply, and `fit_history` drops the oldest turns until the prompt fits that budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qinglm.chat_template import (
    IM_END,
    IM_START,
    ROLES,
    Piece,
    chat_turns,
    check_messages,
    generation_pieces,
    render_chat,
    uses_tool_tokens,
)
from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError
from qinglm.tokenizer import Tokenizer

__all__ = ["IM_END", "IM_START", "ROLES", "check_messages", "render_chat"]


@dataclass
class ChatIds:
    """Chat ids (one turn, or a whole chat), which of them are message content, which SFT trains on."""

    ids: list[int]
    content: list[bool]  # True for the tokens of a message's content (not the template's)
    train: list[bool] | None = None  # True for an assistant's thinking, text, tool calls and <|im_end|>


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> ChatIds:
    """Return the ids of pieces: control tokens by id; each run of text between two of them encoded as one
    piece, as transformers does, so the ids match apply_chat_template's. Contents are normalised like
    training text; a token takes the flags of the piece it starts in."""
    ids: list[int] = []
    content: list[bool] = []
    train: list[bool] = []
    run: list[Piece] = []

    def flush() -> None:
        texts = [normalize_text(p.text) if p.content else p.text for p in run]
        if len({(p.content, p.train) for p in run}) == 1:  # one kind of text: no offsets needed
            enc_ids = tokenizer.encode("".join(texts))
            ids.extend(enc_ids)
            content.extend([run[0].content] * len(enc_ids))
            train.extend([run[0].train] * len(enc_ids))
        elif any(texts):
            ends, total = [], 0
            for t in texts:
                total += len(t)
                ends.append(total)
            enc = tokenizer.backend.encode("".join(texts), add_special_tokens=False)
            for tok, (start, _) in zip(enc.ids, enc.offsets):
                piece = run[next(k for k, e in enumerate(ends) if start < e)]
                ids.append(tok)
                content.append(piece.content)
                train.append(piece.train)
        run.clear()

    for p in pieces:
        if p.control:
            flush()
            ids.append(tokenizer.control_id(p.text))
            content.append(False)
            train.append(p.train)
        else:
            run.append(p)
    flush()
    return ChatIds(ids, content, train)


def encode_turn(tokenizer: Tokenizer, role: str, content: str) -> ChatIds:
    """Return one plain turn's ids; control tokens by id, content normalised and encoded as text."""
    return encode_pieces(tokenizer, chat_turns([{"role": role, "content": content}])[0][1])


def generation_prompt(tokenizer: Tokenizer, thinking: bool | None = None) -> list[int]:
    """Return the ids that ask for a reply: <|im_start|>assistant\\n (+ an empty thinking block if off)."""
    return encode_pieces(tokenizer, generation_pieces(thinking)).ids


def join_turns(
    tokenizer: Tokenizer,
    turns: Sequence[ChatIds],
    add_generation_prompt: bool = False,
    thinking: bool | None = None,
) -> ChatIds:
    """Return [BOS] + the turns (+ the generation prompt) as one ChatIds."""
    ids, mask, train = [tokenizer.bos_id], [False], [False]
    for t in turns:
        ids += t.ids
        mask += t.content
        train += t.train or [False] * len(t.ids)
    if add_generation_prompt:
        tail = generation_prompt(tokenizer, thinking)
        ids += tail
        mask += [False] * len(tail)
        train += [False] * len(tail)
    return ChatIds(ids, mask, train)


def _check_tokens(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Any, thinking: bool | None
) -> None:
    if not tokenizer.has_tool_tokens and uses_tool_tokens(messages, tools, thinking):
        tokenizer.control_id("<tool_call>")  # raises the one-line QingLMError


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    *,
    tools: Sequence[Any] | None = None,
    thinking: bool | None = None,
) -> ChatIds:
    """Return the ids of render_chat(messages, tools=, thinking=) built turn by turn, with the masks.

    thinking: None leaves the template's thinking markup out (plain ChatML); False pre-fills an empty
    thinking block in the generation prompt; True lets the model think. Raises QingLMError when tools or
    thinking are asked of a tokenizer without their control tokens.
    """
    check_messages(messages)
    _check_tokens(tokenizer, messages, tools, thinking)
    turns = [encode_pieces(tokenizer, pieces) for _, pieces in chat_turns(messages, tools)]
    return join_turns(tokenizer, turns, add_generation_prompt, thinking)


# ---------------------------------------------------------------------------- chat policy


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Return how many tokens a prompt may take: the context less room for the reply.

    The reply gets max_new_tokens, at most half the context, so a long reply never leaves the prompt
    less than half of it. LM.chat, `qinglm chat` and the server's chats and truncated prompts use this.
    """
    return context - min(max_new_tokens, context // 2)


def fit_history(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    budget: int,
    longest_token: int | None = None,
    *,
    tools: Sequence[Any] | None = None,
    thinking: bool | None = None,
) -> tuple[list[dict[str, Any]], ChatIds]:
    """Return (messages, prompt) after dropping the oldest non-system turns until the prompt fits budget.

    The prompt is encode_chat(messages, add_generation_prompt=True, tools=, thinking=); each turn is
    encoded at most once. System messages (and the tool list) and the last message are always kept;
    raises QingLMError when even that is longer than budget tokens. A dropped user turn takes the
    assistant and tool turns after it along, so the history still starts with a question. With
    longest_token (the most characters one token covers), a turn too long to ever fit is not encoded at
    all, and an oversize system prompt or last message is refused on its length alone.
    """
    check_messages(messages)
    _check_tokens(tokenizer, messages, tools, thinking)
    msgs = [dict(m) for m in messages]
    turns = chat_turns(msgs, tools)
    n_chars = [sum(len(p.text) for p in pieces) for _, pieces in turns]
    fixed_turn = [k == len(turns) - 1 or not idx or msgs[idx[0]]["role"] == "system" for k, (idx, _) in
                  enumerate(turns)]  # fmt: skip
    if longest_token is not None:
        chars = sum(n for n, fixed in zip(n_chars, fixed_turn) if fixed)
        if chars > budget * longest_token:
            raise QingLMError(
                f"the chat's system prompt and last message are {chars} characters, more than the "
                f"{budget} tokens that fit the model's context with room for a reply; shorten them"
            )

    def hopeless(k: int) -> bool:  # so long that it would be dropped whatever its ids
        return longest_token is not None and not fixed_turn[k] and n_chars[k] > budget * longest_token

    encoded = [None if hopeless(k) else encode_pieces(tokenizer, p) for k, (_, p) in enumerate(turns)]
    size = [budget + 1 if t is None else len(t.ids) for t in encoded]
    total = 1 + len(generation_prompt(tokenizer, thinking)) + sum(size)  # [BOS], the turns, the prompt
    keep = [True] * len(turns)
    droppable = [k for k in range(len(turns)) if not fixed_turn[k]]
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
        # Drop the replies (and tool results) of a dropped question too.
        while d < len(droppable) and msgs[turns[droppable[d]][0][0]]["role"] in ("assistant", "tool"):
            keep[droppable[d]] = False
            total -= size[droppable[d]]
            d += 1
    kept = [k for k in range(len(turns)) if keep[k]]
    prompt = join_turns(tokenizer, [encoded[k] for k in kept], True, thinking)
    return [msgs[i] for k in kept for i in turns[k][0]], prompt
