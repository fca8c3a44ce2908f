"""The interactive terminal chat behind `qinglm chat`: multi-turn, streamed, /reset and /exit.

History that outgrows the model's context is cut from the oldest turns by LM.stream_chat; the system
prompt is always kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from qinglm.errors import QingLMError

if TYPE_CHECKING:
    from qinglm.api import LM

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D) to leave"


def chat_loop(
    lm: LM,
    *,
    system: str | None = None,
    sampling: dict[str, Any] | None = None,
    read: Callable[[str], str] = input,
    out: IO[str] | None = None,
) -> list[dict[str, str]]:
    """Return the conversation when the user leaves (/exit or end of input), after chatting turn by turn.

    read(prompt) returns one line of user input (raising EOFError at the end); replies are written
    to out piece by piece as they are generated.
    """
    import sys

    out = out or sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
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
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", file=out, flush=True)
        pieces = []
        try:
            for piece in lm.stream_chat(history, **(sampling or {})):
                pieces.append(piece)
                print(piece, end="", file=out, flush=True)
        except QingLMError as e:  # e.g. one message longer than the context: say so and go on
            history.pop()
            print(f"\n(error: {e})", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
