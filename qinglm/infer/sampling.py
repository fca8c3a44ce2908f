"""Sampling: the one function that picks the next token, used by every way QingLM generates text.

``sample_rows`` applies each row's temperature, top-k and top-p (a SamplingConfig's, whose checks run when
it is built: qinglm.config) to a batch of logits at once and picks each row's token with a uniform
number of its own (drawn from the row's seeded generator by the engine, qinglm.infer.engine), so a row
samples the same tokens alone or in any batch. ``SeenTokens`` is the engine's per-row record of the
tokens the repetition penalty counts, and applies it; ``sample_next`` is the penalty and the draw with one
SamplingConfig for every row.
"""

from __future__ import annotations

import torch

from qinglm.config import SamplingConfig
from qinglm.tokenizer import SPECIAL_TOKENS

# Ids 0..5 are control tokens in every QingLM tokenizer (qinglm.tokenizer's layout); tokenizers with the
# tool and thinking tokens have more (Tokenizer.n_control_ids), which callers pass as n_control.
N_CONTROL_IDS = len(SPECIAL_TOKENS)


def apply_repetition_penalty(
    logits: torch.Tensor,
    prev_ids: torch.Tensor,
    penalty: float,
    counted: torch.Tensor | None = None,
    n_control: int = N_CONTROL_IDS,
) -> torch.Tensor:
    """Return logits (B, V) with the tokens in prev_ids (B, L) made less likely (CTRL-style).

    A positive logit is divided by the penalty and a negative one multiplied by it, so the token
    loses probability whatever its sign (dividing a negative logit would raise it). Each token is
    penalised once however often it occurs. Only positions where `counted` (B, L) is True count
    (None: all); callers count the generated text and the prompt's text, not a chat template's
    structure (role names, the newlines around turns). Control tokens (ids below n_control: [BOS],
    [EOS], <|im_start|>, <|im_end|> ..., and <think> ... </tool_response> in a tokenizer that has them,
    Tokenizer.n_control_ids) are never penalised, so a chat's history never makes the end of a turn or
    a second tool call less likely.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    prev_ids = prev_ids.to(logits.device, torch.long)
    weight = (
        torch.ones_like(prev_ids, dtype=torch.float) if counted is None else counted.to(logits.device).float()
    )
    seen = torch.zeros_like(logits).scatter_add_(1, prev_ids, weight) > 0  # (B, V)
    seen[:, :n_control] = False
    return torch.where(seen, _penalised(logits, penalty), logits)


def _penalised(logits: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Return logits made less likely by penalty: a positive one divided by it, a negative one multiplied."""
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    prev_ids: torch.Tensor | None = None,
    counted: torch.Tensor | None = None,
    n_control: int = N_CONTROL_IDS,
) -> torch.Tensor:
    """Return the next token id for each row of logits (B, V) as a (B,) LongTensor.

    Order: repetition penalty over prev_ids where counted (see apply_repetition_penalty), then
    temperature (0 = argmax), top-k, top-p, and a draw from the softmax with one uniform number per
    row from the given generator. This is sample_rows with the same settings for every row.
    """
    logits = logits.float()  # softmax and the filters below want fp32 even under bf16 autocast
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, cfg.repetition_penalty, counted, n_control)
    if cfg.temperature == 0:
        return greedy(logits)
    B = logits.size(0)
    settings = RowSettings.of([cfg] * B, logits.device)
    uniform = torch.rand(B, generator=generator, device=generator.device if generator else logits.device)
    return sample_rows(logits, settings, uniform.to(logits.device))


class RowSettings:
    """Each row's sampling settings as tensors (B,): what sample_rows needs for a batch of rows."""

    def __init__(self, temperature, top_k, top_p, penalty):
        self.temperature, self.top_k, self.top_p, self.penalty = temperature, top_k, top_p, penalty

    @classmethod
    def of(cls, cfgs: list[SamplingConfig], device: torch.device) -> RowSettings:
        """Return the settings of rows with these configs (top-k 0/None: all; top-p None or 1.0: off)."""
        return cls(
            torch.tensor([c.temperature for c in cfgs], device=device),
            torch.tensor([c.top_k or 0 for c in cfgs], device=device),
            torch.tensor(
                [c.top_p if c.top_p is not None and c.top_p < 1 else 2.0 for c in cfgs], device=device
            ),
            torch.tensor([c.repetition_penalty for c in cfgs], device=device),
        )


class SeenTokens:
    """Each row's tokens that the repetition penalty counts: ids (rows, cap), row i's first count[i] of them.

    The engine's record (qinglm.infer.engine): set from a row's counted prompt, one token appended per step,
    moved with its row. Penalising reads and writes only these ids, in place (a (rows, vocab) mask cost a
    pass over the vocabulary and a copy of the logits: 84 -> 19 us at 8 rows of 10k tokens, 1,124 -> 40 us at
    32 rows of 30k). Columns past a row's count hold 0, a control id: ids below n_control are never
    penalised (their logits are written back unchanged) and a token held twice is penalised once, as
    apply_repetition_penalty does.
    """

    def __init__(self, rows: int, cap: int, n_control: int, device: torch.device):
        self.ids = torch.zeros(rows, cap, dtype=torch.long, device=device)
        self.count = [0] * rows
        self.n_control = n_control

    def set(self, i: int, ids: torch.Tensor) -> None:
        """Make row i's record ids (1-d), past its capacity dropped (a row never holds more tokens)."""
        n = min(ids.numel(), self.ids.size(1))
        self.ids[i].zero_()
        self.ids[i, :n] = ids[:n]
        self.count[i] = n

    def append(self, tokens: torch.Tensor, rows: list[int] | None = None) -> None:
        """Add tokens[k] (n,) to the record of row rows[k] (None: rows 0..n-1)."""
        rows = list(range(tokens.numel())) if rows is None else rows
        cap = self.ids.size(1)
        cols = torch.tensor([min(self.count[i], cap - 1) for i in rows], device=self.ids.device)
        self.ids[torch.tensor(rows, device=self.ids.device), cols] = tokens
        for i in rows:
            self.count[i] = min(self.count[i] + 1, cap)

    def move(self, src: int, dst: int) -> None:
        """Make row dst's record row src's (a row moving into a freed slot)."""
        self.ids[dst] = self.ids[src]
        self.count[dst] = self.count[src]

    def of(self, i: int) -> set[int]:
        """Return the ids row i's penalty counts."""
        return {t for t in self.ids[i, : self.count[i]].tolist() if t >= self.n_control}

    def penalise(
        self, logits: torch.Tensor, penalty: torch.Tensor, rows: list[int] | None = None
    ) -> torch.Tensor:
        """Return logits (n, V) of rows rows (None: 0..n-1), changed in place: each row's counted tokens
        penalised by its penalty (n,): a positive logit divided by it, a negative one multiplied."""
        n = logits.size(0)
        width = max(self.count[:n] if rows is None else [self.count[i] for i in rows], default=0)
        if width == 0:
            return logits
        ids = (
            self.ids[:n, :width]
            if rows is None
            else self.ids[torch.tensor(rows, device=self.ids.device), :width]
        )
        values = logits.gather(1, ids)
        penalised = _penalised(values, penalty[:, None].to(logits.dtype))
        return logits.scatter_(1, ids, torch.where(ids >= self.n_control, penalised, values))


# On a CPU, a (rows x vocabulary) at least this large takes its argmax in two passes of GREEDY_CHUNK:
# each chunk's amax (a plain reduction), then the argmax within the best chunk. max(dim) with indices is
# the slower reduction in this build: 32 x 30k 456 -> 210 us, 32 x 10k 130 -> 75 us, 8 x 30k 95 -> 48 us;
# at 8 x 10k level, at 1 row slower (1 thread, benchmarks/README.md, "Decoding").
GREEDY_CHUNKED = 2**17
GREEDY_CHUNK = 256


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Return each row's argmax (B,) of logits (B, V): the first of equal maxima, as argmax; max's
    indices are the same and faster on a CPU (for large batches, the chunks' maxima first)."""
    B, V = logits.shape
    if logits.device.type != "cpu" or B * V < GREEDY_CHUNKED or V < 2 * GREEDY_CHUNK:
        return logits.max(dim=-1).indices
    c = GREEDY_CHUNK
    whole = V // c * c
    best = logits[:, :whole].view(B, V // c, c).amax(-1)  # (B, chunks): each chunk's maximum
    if whole < V:
        best = torch.cat([best, logits[:, whole:].amax(-1, keepdim=True)], dim=1)
    # The first chunk holding the row's maximum, then the first maximum inside it: the first overall. A
    # short last chunk is read with its last index repeated, which cannot come before the true position.
    start = best.argmax(-1) * c  # (B,)
    idx = (start[:, None] + torch.arange(c, device=logits.device)).clamp_(max=V - 1)
    return start + logits.gather(1, idx).argmax(-1)


def sample_rows(logits: torch.Tensor, rows: RowSettings, uniform: torch.Tensor) -> torch.Tensor:
    """Return the next token (B,) of each row of penalised logits (B, V), all rows at once.

    Row b: argmax when its temperature is 0; otherwise logits / temperature, its top-k, its top-p, and
    the token where uniform[b] (in [0, 1)) falls in the cumulative softmax. A row's token depends
    only on its own logits, settings and number, never on the other rows of the batch.
    """
    logits = logits.float()
    sampled = rows.temperature > 0
    if not bool(sampled.any()):
        return greedy(logits)
    # The argmax (a pass over the vocabulary) only when some row is greedy.
    best = torch.zeros_like(sampled, dtype=torch.long) if bool(sampled.all()) else greedy(logits)
    V = logits.size(-1)
    k = torch.where((rows.top_k > 0) & (rows.top_k < V), rows.top_k, V)  # (B,)
    temperature = torch.where(sampled, rows.temperature, 1.0)[:, None]
    # Rows with neither top-k nor top-p (GRPO's rollouts) draw from the whole softmax in vocabulary
    # order: no sort. The others need their candidates in descending order.
    plain = sampled & (k == V) & (rows.top_p > 1)
    out = best
    if bool(plain.any()):
        out = torch.where(plain, _draw(logits / temperature, uniform), out)
    filtered = sampled & ~plain
    if bool(filtered.any()):
        # The largest k of any such row (a partial sort), or all V when a row samples by top-p without a
        # top-k (it needs the whole sorted tail).
        width = V if bool((filtered & (k == V)).any()) else int(k[filtered].max())
        values, order = torch.topk(logits / temperature, width, dim=-1)  # (B, width), sorted
        rank = torch.arange(width, device=logits.device)[None, :]
        values = values.masked_fill(rank >= k[:, None], float("-inf"))
        probs = values.softmax(dim=-1)
        # Drop a token when the tokens before it already reach p; the first is always kept.
        drop = (probs.cumsum(dim=-1) - probs >= rows.top_p[:, None]) & (rank > 0)
        choice = _draw(values.masked_fill(drop, float("-inf")), uniform)
        out = torch.where(filtered, order.gather(1, choice[:, None]).squeeze(1), out)
    return out


def _draw(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Return the index (B,) where each row's uniform number in [0, 1) falls in the cumulative softmax of
    its logits (B, N): a draw from the softmax, the same index for the same number."""
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
    # searchsorted never stops on a zero-probability token (its cdf equals the one before it), but a number
    # that rounds up to the very top falls past the end: it takes the last token that has any probability.
    # Such rows are rare, so the pass that finds that token runs only when some row needs it.
    end = probs.size(-1) - 1
    if bool((choice > end).any()):
        last = end - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
        return torch.minimum(choice.squeeze(1), last)
    return choice.squeeze(1)


def sample_configs(logits: torch.Tensor, cfgs: list[SamplingConfig], uniform: torch.Tensor) -> torch.Tensor:
    """Return the next token (n,) of each row of penalised logits with its own config's temperature, top-k
    and top-p, all at once (the decode engine's rows)."""
    if all(c.temperature == 0 for c in cfgs):
        return greedy(logits)
    return sample_rows(logits, RowSettings.of(cfgs, logits.device), uniform)


def sample_apart(
    logits: torch.Tensor, cfgs: list[SamplingConfig], uniform: torch.Tensor
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Return sample_configs' tokens and {k: error} of the rows whose sampling raised (token 0 for them)."""
    try:
        return sample_configs(logits, cfgs, uniform), {}
    except Exception:  # find the rows at fault: sample each alone with the same numbers
        pass
    out = torch.zeros(len(cfgs), dtype=torch.long, device=logits.device)
    failed: dict[int, Exception] = {}
    for k, cfg in enumerate(cfgs):
        try:
            out[k] = sample_configs(logits[k : k + 1], [cfg], uniform[k : k + 1])[0]
        except Exception as e:
            failed[k] = e
    return out, failed
