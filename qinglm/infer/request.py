"""What the decode engine is asked for and what it answers: Request, Event, and each request's state."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.speculate import DraftRow, PromptLookup
from qinglm.infer.text import TextDecoder
from qinglm.model.transformer import Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


@dataclass
class Request:
    """One prompt to continue, with its own sampling settings and stop strings."""

    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()
    # Which prompt tokens the repetition penalty counts (None: all); a chat counts its contents only.
    counted: Sequence[bool] | None = None


@dataclass
class Event:
    """What one row produced in one step; finish_reason is set on its last event."""

    row: int
    ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None  # with finish_reason "error" (isolate_rows only)

    def then(self, later: Event) -> Event:
        """Return one Event of this row's tokens, then later's (a speculative step's), finished as later is."""
        return Event(self.row, self.ids + later.ids, self.text + later.text, later.finish_reason, later.error)


class Row:
    """The decoding state of one request: its cache row holds `length` positions."""

    def __init__(self, key: Hashable, req: Request, tokenizer: Tokenizer | None, device: torch.device):
        self.key, self.req, self.cfg = key, req, req.sampling
        self.n_tokens = self.length = len(req.prompt_ids)
        self.generated, self.last = 0, 0  # tokens emitted; the token to feed next
        self.placed = self.cancelled = False  # in a cache row (after its prefill); cancelled while prefilling
        self.generator = None
        if req.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(req.sampling.seed)
        self.text = TextDecoder(tokenizer, req.stop) if tokenizer is not None else None
        self.drafter: PromptLookup | DraftRow | None = None  # a speculating row's (set when it is placed)

    def need(self, max_len: int) -> int:
        """Return the cache positions this row may use: its prompt and every token fed back."""
        return min(max(self.length, len(self.req.prompt_ids) + self.cfg.max_new_tokens - 1), max_len)


def check_request(req: Request, model: Transformer, tokenizer: Tokenizer | None) -> None:
    """Raise QingLMError for a request that cannot run; return None otherwise."""
    req.sampling.validate()  # again: a config may have been changed since it was built
    max_len, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    n = len(req.prompt_ids)
    if n == 0:
        raise QingLMError("the prompt is empty; encode it as [BOS] + tokens")
    if n > max_len:
        raise QingLMError(f"prompt is {n} tokens but the model's context is {max_len}; shorten it")
    if any(not 0 <= t < vocab for t in req.prompt_ids):
        raise QingLMError(
            f"prompt has token ids outside the model's vocabulary of {vocab}; "
            "use the tokenizer that was trained with this model"
        )
    if req.counted is not None and len(req.counted) != n:
        raise QingLMError(f"counted has {len(req.counted)} flags for a prompt of {n} tokens")
    if isinstance(req.stop, str):
        raise QingLMError("stop must be a list of strings, not one string")
    if any(not isinstance(s, str) or not s for s in req.stop):
        raise QingLMError("stop strings must be non-empty strings")
    if req.stop and tokenizer is None:
        raise QingLMError("stop strings need the tokenizer")


def uniform_numbers(rows: list[Row], device: torch.device) -> torch.Tensor:
    """Return the number (n,) each sampling row draws its token with (zeros for greedy rows): from the row's
    own generator when it has a seed, else all at once from torch's global RNG (as torch.multinomial would)."""
    uniform = torch.zeros(len(rows))
    if all(r.cfg.temperature == 0 for r in rows):
        return uniform.to(device)
    shared = [k for k, r in enumerate(rows) if r.cfg.temperature > 0 and r.generator is None]
    if shared:
        uniform[shared] = torch.rand(len(shared))
    for k, r in enumerate(rows):
        if r.cfg.temperature > 0 and r.generator is not None:
            uniform[k] = torch.rand(1, generator=r.generator, device=r.generator.device).item()
    return uniform.to(device)
