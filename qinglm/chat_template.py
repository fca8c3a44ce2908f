"""The chat template, defined once: ChatML turns, a tool list, tool calls, tool results and thinking.

    [BOS]<|im_start|>system\\n{system}\\n\\n# Tools ... <tools>\\n{tool JSON}\\n</tools> ...<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}\\n
    <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n      (a run of tool messages)

and, to ask for a reply, <|im_start|>assistant\\n (thinking off: <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n,
an empty thinking block pre-filled, as Qwen3 does). A chat without tools, reasoning or a thinking switch
renders exactly as plain ChatML, so tokenizers without the tool tokens keep working for it.

`chat_pieces` gives the chat as Pieces (text, or a control token inserted by id, with what SFT trains on);
`CHAT_TEMPLATE` is the same template as Jinja, saved beside every tokenizer so that transformers'
`apply_chat_template(messages, tools=..., enable_thinking=...)` renders the same text and ids.
`parse_reply` reads a generated reply back into reasoning, text and tool calls.

Messages are OpenAI's: {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message
may add "reasoning_content" (str) and "tool_calls" ([{"type": "function", "function": {"name",
"arguments"}}], arguments a JSON object or its JSON text). Tools are OpenAI function schemas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qinglm.errors import QingLMError

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, THINK_END = "<think>", "</think>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
# The control tokens tools and thinking add, at ids 6-11 of every tokenizer QingLM trains.
TOOL_TOKENS = [THINK, THINK_END, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END]
CONTROL_TOKENS = (IM_START, IM_END, *TOOL_TOKENS)
# Written in the system turn around the tool list (no control token text: it is plain text).
# Short: the tool list is in every prompt of models whose context may be 512 tokens.
TOOLS_HEAD = "# 工具\n可调用的函数：\n<tools>"
TOOLS_TAIL = '\n</tools>\n调用时回复 {"name": 函数名, "arguments": 参数}'
EMPTY_THINKING = "\n\n"  # what the pre-filled block holds between <think> and </think>
MAX_TOOLS = 64


@dataclass(frozen=True)
class Piece:
    """A run of chat text, or one control token (inserted by id, never encoded from text)."""

    text: str
    control: bool = False
    content: bool = False  # message content (the repetition penalty counts it)
    train: bool = False  # an assistant token SFT trains on


def _bad(i: int, why: str) -> QingLMError:
    return QingLMError(f"message {i} {why}")


def call_parts(call: Any, i: int = 0) -> tuple[str, str]:
    """Return (name, arguments as JSON text) of one tool call (OpenAI's {"function": {...}} or bare)."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad(i, "has a tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        return fn["name"], args
    if not isinstance(args, Mapping):
        raise _bad(i, "has tool call arguments that are neither a JSON object nor its text")
    return fn["name"], json.dumps(args, ensure_ascii=False)


def tool_schema(tool: Any) -> Mapping[str, Any]:
    """Return the function of one tool ({"type": "function", "function": {...}} or a bare function)."""
    fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise QingLMError(
            "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}"
        )
    return fn


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Return nothing; raise QingLMError unless messages are a non-empty list of well-formed messages."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise QingLMError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise _bad(
                i, f"must be {{'role': 'system'|'user'|'assistant'|'tool', 'content': str}}, got {m!r:.80}"
            )
        content = m.get("content")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if not isinstance(content, str) and not (content is None and calls):
            raise _bad(i, f"must have a string 'content', got {m!r:.80}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
            raise _bad(i, "has 'reasoning_content' that is not an assistant's string")
        if calls is not None:
            if not isinstance(calls, list):
                raise _bad(i, "has 'tool_calls' that is not a list")
            for call in calls:
                call_parts(call, i)


def uses_tool_tokens(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None, thinking: bool | None
) -> bool:
    """Return True when rendering needs the tool/thinking control tokens."""
    return (
        bool(tools)
        or thinking is not None
        or any(
            m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning_content") is not None
            for m in messages
        )
    )


def _system(content: str | None, tools: Sequence[Any]) -> list[Piece]:
    out = [Piece(IM_START, control=True), Piece("system\n")]
    if tools:
        if content:
            out += [Piece(content, content=True), Piece("\n\n")]
        out.append(Piece(TOOLS_HEAD))
        out += [Piece("\n" + json.dumps(tool_schema(tool), ensure_ascii=False)) for tool in tools]
        out.append(Piece(TOOLS_TAIL))
    else:
        out.append(Piece(content or "", content=True))
    return out + [Piece(IM_END, control=True), Piece("\n")]


def _assistant(m: Mapping[str, Any]) -> list[Piece]:
    out = [Piece(IM_START, control=True), Piece("assistant\n")]
    reasoning = m.get("reasoning_content")
    if reasoning is not None:
        t = bool(reasoning)  # an empty block is the pre-fill of thinking off: prompt, not a target
        out += [Piece(THINK, True, train=t), Piece("\n", train=t), Piece(reasoning, content=True, train=t)]
        out += [Piece("\n", train=t), Piece(THINK_END, True, train=t), Piece("\n\n", train=t)]
    content = m.get("content") or ""
    out.append(Piece(content, content=True, train=True))
    for k, call in enumerate(m.get("tool_calls") or ()):
        name, args = call_parts(call)
        sep = "\n" if content or k else ""
        out += [Piece(sep, train=True), Piece(TOOL_CALL, True, train=True)]
        out.append(
            Piece(f'\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n', train=True)
        )
        out.append(Piece(TOOL_CALL_END, True, train=True))
    return out + [Piece(IM_END, True, train=True), Piece("\n")]


def chat_turns(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
) -> list[tuple[list[int], list[Piece]]]:
    """Return the turns of a chat: (the indices of its messages, its pieces), in order.

    Each turn starts with <|im_start|> and ends with "<|im_end|>\\n", so turns encode independently.
    A run of tool messages is one user turn; tools go in the first turn (the system prompt's, or one of
    their own). Tools may also ride on the first system message as its "tools" key (SFT rows do).
    """
    check_messages(messages)
    if tools is None and messages[0]["role"] == "system":
        tools = messages[0].get("tools")
    if tools:
        if not isinstance(tools, Sequence) or isinstance(tools, str) or len(tools) > MAX_TOOLS:
            raise QingLMError(f"'tools' must be a list of at most {MAX_TOOLS} function schemas")
        for tool in tools:
            tool_schema(tool)
    turns: list[tuple[list[int], list[Piece]]] = []
    start = 0
    if tools or messages[0]["role"] == "system":
        first_is_system = messages[0]["role"] == "system"
        turns.append(
            (
                [0] if first_is_system else [],
                _system(messages[0]["content"] if first_is_system else None, tools or ()),
            )
        )
        start = 1 if first_is_system else 0
    for i in range(start, len(messages)):
        m = messages[i]
        if m["role"] == "assistant":
            turns.append(([i], _assistant(m)))
        elif m["role"] == "tool":
            if i == start or messages[i - 1]["role"] != "tool":
                turns.append(([], [Piece(IM_START, True), Piece("user")]))
            idx, pieces = turns[-1]
            idx.append(i)
            pieces += [Piece("\n"), Piece(TOOL_RESPONSE, True), Piece("\n")]
            pieces += [Piece(m["content"], content=True), Piece("\n"), Piece(TOOL_RESPONSE_END, True)]
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                pieces += [Piece(IM_END, True), Piece("\n")]
        else:
            pieces = [Piece(IM_START, True), Piece(m["role"] + "\n"), Piece(m["content"], content=True)]
            turns.append(([i], pieces + [Piece(IM_END, True), Piece("\n")]))
    return turns


def generation_pieces(thinking: bool | None = None) -> list[Piece]:
    """Return the pieces that ask for a reply; thinking False pre-fills an empty thinking block."""
    out = [Piece(IM_START, True), Piece("assistant\n")]
    if thinking is False:
        out += [Piece(THINK, True), Piece(EMPTY_THINKING), Piece(THINK_END, True), Piece("\n\n")]
    return out


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    bos_token: str = "[BOS]",
    *,
    tools: Sequence[Any] | None = None,
    thinking: bool | None = None,
) -> str:
    """Return the chat as one string, identical to CHAT_TEMPLATE rendered by transformers."""
    pieces = [p for _, turn in chat_turns(messages, tools) for p in turn]
    if add_generation_prompt:
        pieces += generation_pieces(thinking)
    return bos_token + "".join(p.text for p in pieces)


# ---------------------------------------------------------------------------- the same, as Jinja


def _lit(text: str) -> str:
    """Return text as a Jinja string literal."""
    return json.dumps(text)


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = messages[0].role == 'system' -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if sys and messages[0].content -%}{{ messages[0].content + '\\n\\n' }}{%- endif -%}"
    "{{ " + _lit(TOOLS_HEAD) + " }}"
    "{%- for tool in tools -%}{{ '\\n' }}"
    "{{ (tool.function if tool.function is defined else tool) | tojson }}{%- endfor -%}"
    "{{ " + _lit(TOOLS_TAIL) + " }}{{ '<|im_end|>\\n' }}"
    "{%- elif sys -%}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and sys -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none -%}"
    "{{ '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{{ content }}"
    "{%- if message.tool_calls -%}{%- for tool_call in message.tool_calls -%}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call -%}"
    "{%- if content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": ' }}{{ call.name | tojson }}{{ ', \"arguments\": ' }}"
    "{%- if call.arguments is string -%}{{ call.arguments }}"
    "{%- elif call.arguments is defined -%}{{ call.arguments | tojson }}{%- else -%}{{ '{}' }}{%- endif -%}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


# ---------------------------------------------------------------------------- reading a reply


@dataclass
class Reply:
    """A generated assistant reply read back: its thinking, its text and its tool calls."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{"name": str, "arguments": dict}]


_CALL = re.compile(re.escape(TOOL_CALL) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_END), re.S)


def _call(text: str) -> dict[str, Any] | None:
    """Return {"name", "arguments"} of one tool call's JSON, or None when it is not one."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def parse_reply(text: str) -> Reply:
    """Return the Reply in a generated text (the text after the generation prompt).

    A reply that opens with a <think> block has that block as its reasoning (thinking on: the model
    opens it; thinking off pre-fills an empty one in the prompt, so the reply has none). Well-formed
    tool calls are taken out of the text; a malformed one stays in it, as text.
    """
    reasoning = None
    body = text
    if text.lstrip("\n").startswith(THINK):
        reasoning, _, body = text.lstrip("\n").removeprefix(THINK).partition(THINK_END)
        reasoning = reasoning.strip("\n")
    calls = []

    def take(match: re.Match) -> str:
        call = _call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    content = _CALL.sub(take, body).strip()
    return Reply(content, reasoning, calls or None)
