"""Tools and thinking on the OpenAI wire: a request's tools / tool_choice / thinking switch, and the reply
read back (qinglm.chat_template.parse_reply) as OpenAI's message or stream deltas.

- ``tools``: OpenAI function schemas, rendered in the system turn by the chat template.
- ``tool_choice``: "auto" (default: the model decides), "none" (the tools are not offered), "required"
  or {"type": "function", "function": {"name": ...}}: the reply is pre-filled with the start of a tool
  call (its name too, for a named function), so the model writes the arguments.
- thinking: ``chat_template_kwargs: {"enable_thinking": bool}`` (as vLLM takes it) or ``enable_thinking``;
  off pre-fills an empty thinking block, on lets the model think and returns ``reasoning_content``.
- the built-in tools (qinglm.data.builtin_tools) for a client's own function-calling loop, as the chat page
  runs it: ``GET /v1/tools/builtin`` lists their schemas, ``POST /v1/tools/builtin/run`` runs one call
  (run_builtin) with the tools' time and output limits.
A reply's tool calls come back as ``tool_calls`` (finish_reason "tool_calls"); calls to a tool the request
did not offer, or whose JSON does not parse, stay in the content as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from qinglm.chat_template import (
    MAX_TOOLS,
    THINK,
    THINK_END,
    TOOL_CALL,
    TOOL_CALL_END,
    Piece,
    parse_reply,
    tool_schema,
)
from qinglm.errors import QingLMError


@dataclass
class ToolUse:
    """What a chat request asks of tools and thinking, and how its reply is read back."""

    tools: list[dict[str, Any]] | None = None  # offered to the model (None: none, or tool_choice "none")
    thinking: bool | None = None
    prefill: str = ""  # reply text the prompt already holds (a forced tool call's start)
    names: set[str] = field(default_factory=set)

    @property
    def parses(self) -> bool:
        """Return True when the reply is read for tool calls or reasoning (else it is returned as is)."""
        return bool(self.tools) or self.thinking is not None


def parse_tool_use(body: dict[str, Any]) -> ToolUse:
    """Return the ToolUse of a chat request body; raise QingLMError for bad tools, tool_choice or thinking."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise QingLMError(f"'tools' must be a list of at most {MAX_TOOLS} function schemas")
        names = [tool_schema(t)["name"] for t in tools]
    else:
        names = []
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise QingLMError("'chat_template_kwargs' must be an object")
    thinking = kwargs.get("enable_thinking", body.get("enable_thinking"))
    if thinking is not None and not isinstance(thinking, bool):
        raise QingLMError(f"'enable_thinking' must be true or false, got {thinking!r:.40}")
    choice = body.get("tool_choice", "auto")
    use = ToolUse(tools or None, thinking, names=set(names))
    if choice in ("auto", None):
        return use
    if choice == "none":
        return ToolUse(None, thinking)
    if not names:
        raise QingLMError("'tool_choice' needs 'tools' to choose from")
    if choice == "required":
        use.prefill = TOOL_CALL
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise QingLMError(f"'tool_choice' names {name!r:.40}, which is not one of the request's tools")
        use.prefill = f'{TOOL_CALL}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
    else:
        raise QingLMError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', ...}")
    use.thinking = False if thinking is not None else None  # a forced call starts at once
    return use


def prefill_pieces(use: ToolUse) -> list[Piece]:
    """Return the pieces of use.prefill (its control token by id) to append to the prompt."""
    if not use.prefill:
        return []
    return [Piece(TOOL_CALL, control=True), Piece(use.prefill.removeprefix(TOOL_CALL))]


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    args = json.dumps(call["arguments"], ensure_ascii=False)
    fn = {"name": call["name"], "arguments": args}
    return {"id": _call_id(), "type": "function", "function": fn}


# The start of a call as the template writes it, up to its arguments object: {"name": "...", "arguments": {
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def _args_end(body: str, done: bool) -> int:
    """Return how much of body (a call's arguments and what follows them so far) is surely arguments: the
    text before the last "}" when only blanks or the start of </tool_call> follow it (the call's own "}"),
    less, while the call is open, an end that may begin </tool_call>."""
    last = body.rfind("}")
    after = body[last + 1 :].strip() if done else body[last + 1 :].lstrip()
    if last >= 0 and (not after if done else TOOL_CALL_END.startswith(after)):
        return last
    if done:
        return len(body)
    keep = next((k for k in range(min(len(TOOL_CALL_END) - 1, len(body)), 0, -1)
                 if body.endswith(TOOL_CALL_END[:k])), 0)  # fmt: skip
    return len(body) - keep


def reply_message(use: ToolUse, text: str, finish: str) -> tuple[dict[str, Any], str]:
    """Return (the assistant message of a generated text, the finish_reason) in OpenAI's form."""
    if not use.parses:
        return {"role": "assistant", "content": text}, finish
    reply = parse_reply(use.prefill + text)
    calls = [c for c in reply.tool_calls or () if c["name"] in use.names]
    content = reply.content
    for c in reply.tool_calls or ():
        if c["name"] not in use.names:  # not a tool of this request: back into the text
            call = json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
            content += f"{TOOL_CALL}\n{call}\n{TOOL_CALL_END}"
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if calls:
        message["tool_calls"] = [_openai_call(c) for c in calls]
        finish = "tool_calls" if finish == "stop" else finish
    return message, finish


class StreamReader:
    """Turns a reply's text, as it streams, into OpenAI deltas: reasoning_content, content and tool_calls.

    Text that may begin a marker (</think>, <tool_call>) is held back until it is known. A call to an
    offered tool is streamed as OpenAI streams one: its id and name once they are read, then its arguments
    as they come (the model's own JSON text, which the client joins); once its name is sent a call stays a
    call, even if its JSON then turns out malformed (a whole reply keeps such a call in its text). Any
    other call (keys in another order, arguments as a JSON string) is read whole at its </tool_call>.
    """

    def __init__(self, use: ToolUse):
        self.use = use
        self.buf = use.prefill
        self.thinking = False
        self.starting = True  # whether the reply opens with <think> is not known yet
        self.sent_reasoning = False
        self.after_think = False  # the newlines after </think> are the template's, not content
        self.calls = 0
        self.open: tuple[int, int] | None = None  # a call being streamed: (where its arguments start, sent)

    def _split(self, marker: str) -> tuple[str, str | None]:
        """Return (text safe to send, the rest after marker or None when marker has not come yet)."""
        at = self.buf.find(marker)
        if at >= 0:
            return self.buf[:at], self.buf[at + len(marker) :]
        keep = next((k for k in range(min(len(marker) - 1, len(self.buf)), 0, -1)
                     if self.buf.endswith(marker[:k])), 0)  # fmt: skip
        return self.buf[: len(self.buf) - keep], None

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """Return the deltas that text (and, final, whatever is held back) completes."""
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            if self.starting:  # a reply that opens with <think> streams it as reasoning_content
                self.buf = self.buf.lstrip("\n")
                if not final and len(self.buf) < len(THINK) and THINK.startswith(self.buf):
                    return out
                self.starting = False
                self.thinking = self.buf.startswith(THINK)
                self.buf = self.buf.removeprefix(THINK)
            if self.thinking:
                if not self.sent_reasoning:
                    self.buf = self.buf.lstrip("\n")
                sent, rest = self._split(THINK_END)
                if rest is None and final:
                    sent, rest = self.buf, ""
                text = sent.rstrip("\n")  # newlines that may precede </think> wait for it
                if text:
                    out.append({"reasoning_content": text})
                    self.sent_reasoning = True
                if rest is None:
                    self.buf = self.buf[len(text) :]
                    return out
                self.buf, self.thinking, self.after_think = rest, False, True
                continue
            if self.after_think:  # they may come in a later piece than </think>
                self.buf = self.buf.lstrip("\n")
                if not self.buf and not final:
                    return out
                self.after_think = False
            sent, rest = self._split(TOOL_CALL)
            if sent:
                out.append({"content": sent})
            if rest is None:
                self.buf = self.buf[len(sent) :]
                if final and self.buf:
                    out.append({"content": self.buf})
                    self.buf = ""
                return out
            body, end, after = rest.partition(TOOL_CALL_END)
            head = _CALL_HEAD.match(body) if self.open is None else None
            if head and head.group(1) in self.use.names:  # a call to an offered tool: its id and name now
                out.append({"tool_calls": [{"index": self.calls, "id": _call_id(), "type": "function",
                                            "function": {"name": head.group(1), "arguments": ""}}]})  # fmt: skip
                self.open, self.calls = (head.end(), 0), self.calls + 1
            if self.open is not None:
                start, sent = self.open
                upto = _args_end(body[start:], bool(end) or final)
                if upto > sent:
                    args = body[start + sent : start + upto]
                    out.append({"tool_calls": [{"index": self.calls - 1, "function": {"arguments": args}}]})
                    self.open = (start, upto)
                if not end and not final:
                    self.buf = TOOL_CALL + rest
                    return out
                self.open, self.buf = None, after
                continue
            if not end and not final:
                self.buf = TOOL_CALL + rest
                return out
            message, _ = reply_message(self.use_without_prefill(), TOOL_CALL + body + end, "stop")
            for call in message.get("tool_calls") or ():
                fn = call["function"]
                head_delta = {"index": self.calls, "id": call["id"], "type": "function",
                              "function": {"name": fn["name"], "arguments": ""}}  # fmt: skip
                out.append({"tool_calls": [head_delta]})
                out.append(
                    {"tool_calls": [{"index": self.calls, "function": {"arguments": fn["arguments"]}}]}
                )
                self.calls += 1
            if message.get("content"):
                out.append({"content": message["content"]})
            self.buf = after

    def use_without_prefill(self) -> ToolUse:
        return ToolUse(self.use.tools, None, "", self.use.names)


def run_builtin(body: dict[str, Any]) -> dict[str, str]:
    """Return {"name", "content"}: the result of one built-in tool call, given as a tool call's "function"
    ({"name": ..., "arguments": JSON text or an object}); raise QingLMError for a body that is not one.

    Arguments that are not a JSON object are the model's mistake, not the client's: they give an
    "error: ..." result, which goes back to the model as the tool's answer (qinglm.data.builtin_tools).
    """
    from qinglm.data.builtin_tools import TOOLS, run_tool

    name, args = body.get("name"), body.get("arguments", "{}")
    if not isinstance(name, str) or name not in TOOLS:
        raise QingLMError(f"'name' must be one of the built-in tools ({', '.join(TOOLS)}), got {name!r:.40}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return {"name": name, "content": "error: the arguments are not valid JSON"}
    elif not isinstance(args, dict):
        raise QingLMError("'arguments' must be JSON text or an object")
    return {"name": name, "content": run_tool(name, args)}
