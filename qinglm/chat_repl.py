"""The interactive terminal chat behind `qinglm chat`: multi-turn, streamed, /reset and /exit, tools, thinking.

History that outgrows the model's context is cut from the oldest turns by LM.stream_chat; the system
prompt is always kept. With `--tools builtin` the model is offered the built-in tools
(qinglm.data.builtin_tools: calculator, date_calc, idiom_lookup); its tool calls are run in-process (with
the tools' time and output limits), each result goes back as a `tool` turn and the reply resumes, up to
`--max-tool-calls` calls per user turn. `--thinking` lets the model think first (shown dimmed on a
terminal); off, an empty thinking block is pre-filled as the template defines (qinglm.chat_template).
The reply is read as it streams with the server's reader (qinglm.serve.tools.StreamReader), so the
terminal and the API split thinking, text and tool calls the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from qinglm.config import _f, check_choices
from qinglm.errors import QingLMError
from qinglm.typecheck import check_types

if TYPE_CHECKING:
    from qinglm.api import LM

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D) to leave"
TOOL_SETS = ("none", "builtin")  # what `--tools` may offer
DIM, UNDIM = "\x1b[2m", "\x1b[0m"


@dataclass
class ChatConfig:
    """What `qinglm chat` offers the model beyond plain turns: tools and thinking."""

    tools: str = _f(
        "none", "tools offered to the model (builtin: calculator, date_calc, idiom_lookup)", TOOL_SETS
    )
    max_tool_calls: int = _f(
        4, "tool calls run per user turn; the reply stops when they are used up", within="[1, inf)"
    )
    thinking: bool | None = _f(
        None,
        "let the model think before it answers (--no-thinking: pre-fill an empty thinking block, as tools-sft "
        "trains; default: that with --tools, else no thinking markup, as chats without reasoning train)",
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_choices(self)


class _Printer:
    """Writes a reply's stream deltas (StreamReader's) to out: thinking dimmed on a terminal, tool calls on
    their own lines."""

    def __init__(self, out: IO[str]):
        self.out, self.tty = out, out.isatty()
        self.where = "label"  # after "assistant> "; then in "text", "thinking" or a "call", or at a "start"
        self.fresh = False  # whether the last thing written ended a line

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.fresh = text.endswith("\n")

    def _to(self, where: str) -> None:
        if self.where == where:
            return
        if self.where == "thinking" and self.tty:
            self._write(UNDIM)
        if not self.fresh and (self.where != "label" or where in ("call", "start")):
            self._write("\n")
        if where == "thinking":
            self._write(DIM if self.tty else "(thinking) ")
        self.where = where

    def delta(self, d: dict[str, Any]) -> None:
        """Write one delta: reasoning_content, content or a tool call's name or arguments."""
        if "reasoning_content" in d:
            self._to("thinking")
            self._write(d["reasoning_content"])
        if d.get("content"):
            self._to("text")
            self._write(d["content"])
        for call in d.get("tool_calls") or ():
            fn = call.get("function", {})
            if "id" in call:  # a new call: its name, then its arguments as they come
                self._to("start")
                self._to("call")
                self._write(f"[tool call] {fn.get('name')} ")
            self._write(fn.get("arguments", ""))
        self.out.flush()

    def end(self) -> None:
        """End the line in progress (and the dimming)."""
        self._to("start")
        self.out.flush()

    def line(self, text: str) -> None:
        """Write text on a line of its own."""
        self._to("start")
        self._write(text + "\n")
        self.where = "start"
        self.out.flush()


def _run_calls(message: dict[str, Any], budget: int, printer: _Printer) -> list[dict[str, Any]]:
    """Return the tool turns of the calls in message that budget allows (run now, results printed); the
    calls beyond it are taken out of message."""
    from qinglm.data.builtin_tools import run_tool

    calls = message.get("tool_calls") or []
    run, message["tool_calls"] = calls[:budget], calls[:budget] or None
    if message["tool_calls"] is None:
        del message["tool_calls"]
        message["content"] = message.get("content") or ""
    turns = []
    for call in run:
        args = json.loads(call["function"]["arguments"])  # parse_reply's JSON object, written back as text
        result = run_tool(call["function"]["name"], args)
        printer.line(f"[tool result] {result}")
        turns.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return turns


def chat_loop(
    lm: LM,
    *,
    system: str | None = None,
    sampling: dict[str, Any] | None = None,
    chat: ChatConfig | None = None,
    read: Callable[[str], str] = input,
    out: IO[str] | None = None,
) -> list[dict[str, Any]]:
    """Return the conversation when the user leaves (/exit or end of input), after chatting turn by turn.

    read(prompt) returns one line of user input (raising EOFError at the end); replies are written
    to out piece by piece as they are generated. Raises QingLMError before the first turn when chat asks
    for tools or thinking of a tokenizer without their control tokens.
    """
    import sys

    from qinglm.data.builtin_tools import TOOL_SCHEMAS, TOOLS
    from qinglm.serve.tools import StreamReader, ToolUse, reply_message

    out = out or sys.stdout
    chat = chat or ChatConfig()
    tokenizer = lm.tokenizer
    if (chat.tools != "none" or chat.thinking) and not tokenizer.has_tool_tokens:
        tokenizer.control_id("<tool_call>")  # raises the one-line QingLMError
    # Thinking off pre-fills an empty block (tools-sft's chats have one or a reasoning): asked for, or by default
    # with tools. Without tools the default is plain ChatML, what a model SFT'd on chats without reasoning saw
    # (with the block it answered the pinyin demo's questions with one syllable); so does a pre-thinking tokenizer.
    off = chat.thinking is False or (chat.thinking is None and chat.tools != "none")
    thinking = True if chat.thinking else (False if off and tokenizer.has_tool_tokens else None)
    tools = TOOL_SCHEMAS if chat.tools == "builtin" else None
    use = ToolUse(tools, thinking, names=set(TOOLS) if tools else set())
    start = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, Any]] = list(start)
    print(HELP, file=out, flush=True)
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return history
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = list(start)
            print("(conversation reset)", file=out, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=out, flush=True)
            continue
        before = len(history)
        history.append({"role": "user", "content": line})
        calls_left = chat.max_tool_calls
        while True:  # one reply, then one more after each round of tool results
            print("assistant> ", end="", file=out, flush=True)
            printer, reader, pieces = _Printer(out), StreamReader(use), []
            try:
                for piece in lm.stream_chat(history, **(sampling or {}), tools=tools, thinking=thinking):
                    pieces.append(piece)
                    for d in reader.feed(piece) if use.parses else [{"content": piece}]:
                        printer.delta(d)
            except QingLMError as e:  # e.g. one message longer than the context: say so and go on
                del history[before:]
                print(f"\n(error: {e})", file=out, flush=True)
                break
            for d in reader.feed("", final=True) if use.parses else []:
                printer.delta(d)
            message, _ = reply_message(use, "".join(pieces), "stop")
            asked = len(message.get("tool_calls") or ())
            results = _run_calls(message, calls_left, printer)
            history += [message, *results]
            calls_left -= len(results)
            if asked > len(results):
                printer.line(
                    f"(tool-call limit of {chat.max_tool_calls} per turn reached; "
                    f"{asked - len(results)} call(s) not run)"
                )
            printer.end()
            if not results or asked > len(results):
                break
