"""Text in and out of the model: a prompt encoded as a document start, and ids decoded as they stream.

``encode_prompt`` gives [BOS] + the prompt's ids, as training data starts a document. ``TextDecoder`` /
``stream_text`` turn ids into text pieces that never end in half a character (so a byte-level
tokenizer can be streamed safely) nor in part of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from qinglm.data.sources import normalize_text

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


class TextDecoder:
    """Turns token ids, one at a time, into text that never ends in half a character or a stop string.

    Ids are held back until they decode to text that does not end in U+FFFD (an incomplete UTF-8
    sequence); splitting only after a complete character keeps the joined pieces equal to
    tokenizer.decode(all ids). Text that might be the start of a stop string is held back too, and
    a stop string ends the text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.pending: list[int] = []  # ids that do not decode to whole characters yet
        self.held = ""  # decoded text that may begin a stop string

    def feed(self, tok: int) -> tuple[str, bool]:
        """Return (text now safe to emit, True when a stop string ended the text) after one more id."""
        self.pending.append(tok)
        text = self.tokenizer.decode(self.pending)
        if not text or text.endswith(REPLACEMENT):
            return "", False
        self.pending = []
        return self._release(self.held + text, final=False)

    def finish(self) -> str:
        """Return everything still held back; an unfinished last character decodes to U+FFFD."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return self._release(self.held + text, final=True)[0]

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        """Return (the part of text to emit, whether a stop string was found); keep the rest held."""
        self.held = ""
        if not self.stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if not final:
            keep = max((_prefix_overlap(text, s) for s in self.stop), default=0)
            if keep:
                text, self.held = text[:-keep], text[-keep:]
        return text, False


def _prefix_overlap(text: str, stop: str) -> int:
    """Return the length of the longest end of text that is a proper beginning of stop."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def stream_text(ids_iter: Iterable[int], tokenizer: Tokenizer) -> Iterator[str]:
    """Return an iterator of text pieces for the ids, none ending in half a character (see TextDecoder).

    Whatever is left at the end is flushed, so "".join(pieces) == tokenizer.decode(all ids).
    """
    decoder = TextDecoder(tokenizer)
    for tok in ids_iter:
        text, _ = decoder.feed(tok)
        if text:
            yield text
    tail = decoder.finish()
    if tail:
        yield tail


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Return the ids of prompt as a document start: [BOS] + encode(prompt), as in training data.

    The prompt is normalised as training text is (full-width ASCII made half-width, see
    qinglm.data.sources.normalize_text) and encoded as text: "[EOS]" in it is not the control token.
    """
    return [tokenizer.bos_id] + tokenizer.encode(normalize_text(prompt))
