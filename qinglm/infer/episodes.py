"""Multi-turn episodes with tools on the one engine: the model replies, the tools it calls run, their
results come back as a tool turn, and it replies again, up to max_tool_calls calls in all.

Every turn of every unfinished episode decodes together (qinglm.infer.rollout.decode). A reply is read
back with the chat template's parser (qinglm.chat_template.parse_reply); its well-formed calls run
through `run_tool(name, arguments) -> text` and the template's tool turn, then the generation prompt,
are appended as ids. The model's own ids are kept as sampled (never re-encoded), so `mask` marks
exactly the tokens the model produced, its stop token included: the prompt, the template's glue and
the tool results are masked out (what a policy-gradient loss must not train on).

An episode ends with a reply that calls no tool ("answered"; "length" when it hit max_new_tokens
first, or calls ended by [EOS]), a call beyond max_tool_calls ("calls"), or a history with no room for the tool turn and another
reply within max_tokens ("context"; the ids never pass max_tokens). Episode k, turn t samples with seed seeds[k] + t, so the same seeds give the
same episodes whatever else the batch holds (the engine's rows are independent), run to run and after
a resume that restores the seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qinglm.chat_template import TOOL_CALL, Piece, Reply, chat_turns, generation_pieces, parse_reply
from qinglm.config import SamplingConfig
from qinglm.infer.chat import IM_END, encode_chat, encode_pieces
from qinglm.infer.request import Request
from qinglm.infer.rollout import decode, padded
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

ToolRunner = Callable[[str, Mapping[str, Any]], str]  # (name, arguments) -> the result as text
STATUSES = ("answered", "length", "calls", "context")


@dataclass
class Turn:
    """One reply of the model: its text, read back, and whether a <tool_call> in it failed to parse."""

    text: str
    reply: Reply
    malformed: bool


@dataclass
class Episode:
    """One chat played out: the history, the ids with the model's tokens marked, the turns."""

    messages: list[dict[str, Any]]  # the prompt, then the model's replies and the tool results
    ids: list[int]
    mask: list[bool]  # True on the tokens the model produced
    turns: list[Turn] = field(default_factory=list)
    n_calls: int = 0
    status: str = ""  # one of STATUSES once ended

    @property
    def finished(self) -> bool:
        """Return True when the episode ended with an answer (a reply without calls, stopped)."""
        return self.status == "answered"

    @property
    def well_formed(self) -> bool:
        """Return True when every tool call the model wrote parsed."""
        return not any(t.malformed for t in self.turns)

    @property
    def answer(self) -> str:
        """Return the final answer's text ("" when the episode did not finish)."""
        return self.turns[-1].reply.content if self.finished else ""

    @property
    def calls(self) -> list[list[tuple[str, Any]]]:
        """Return the (name, arguments) of the calls of each turn."""
        return [[(c["name"], c["arguments"]) for c in t.reply.tool_calls or ()] for t in self.turns]


def tool_turn_pieces(results: Sequence[str], thinking: bool | None) -> list[Piece]:
    """Return the glue after a reply's <|im_end|>, the tool turn holding results, and the generation prompt."""
    turn = chat_turns([{"role": "tool", "content": r} for r in results])[0][1]
    return [Piece("\n"), *turn, *generation_pieces(thinking)]


def _read(text: str) -> Turn:
    reply = parse_reply(text)
    return Turn(text, reply, text.count(TOOL_CALL) > len(reply.tool_calls or ()))


def run_episodes(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[Mapping[str, Any]]],
    seeds: Sequence[int],
    sampling: SamplingConfig,
    run_tool: ToolRunner,
    *,
    max_tool_calls: int,
    max_tokens: int | None = None,
    thinking: bool | None = False,
) -> list[Episode]:
    """Return one Episode per chat prompt (see the module doc), episode k seeded with seeds[k] + turn.

    sampling's seed is ignored; max_tokens bounds each episode's ids (default: the model's context).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    limit = min(max_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len)
    episodes = []
    for messages in prompts:
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True, thinking=thinking).ids
        episodes.append(Episode([dict(m) for m in messages], ids, [False] * len(ids)))
    turn = 0
    while active := [k for k, ep in enumerate(episodes) if not ep.status]:
        requests = []
        for k in list(active):
            room = min(sampling.max_new_tokens, limit - len(episodes[k].ids))
            if room < 1:
                episodes[k].status = "context"
                active.remove(k)
                continue
            config = dataclasses.replace(sampling, max_new_tokens=room, seed=seeds[k] + turn)
            requests.append(Request(list(episodes[k].ids), config, [IM_END]))
        if not requests:
            break
        for k, ids, text, finish in zip(active, *decode(model, tokenizer, requests)):
            _advance(episodes[k], ids, text, finish, tokenizer, run_tool, max_tool_calls, thinking, limit)
        turn += 1
    return episodes


def _advance(
    ep: Episode,
    ids: list[int],
    text: str,
    finish: str,
    tokenizer: Tokenizer,
    run_tool: ToolRunner,
    max_tool_calls: int,
    thinking: bool | None,
    limit: int,
) -> None:
    """Append one reply to ep; run its calls and append their tool turn (when another reply would fit
    within limit tokens after it), or end ep."""
    t = _read(text)
    ep.turns.append(t)
    ep.ids += ids
    ep.mask += [True] * len(ids)
    calls = t.reply.tool_calls or []
    if finish != "stop" or (calls and ids[-1:] != [tokenizer.control_id(IM_END)]):
        ep.status = "length"  # cut short, or calls ended by [EOS]: no tool turn can follow
        return
    if not calls:
        ep.status = "answered"
        return
    if ep.n_calls + len(calls) > max_tool_calls:
        ep.status = "calls"
        return
    results = [run_tool(c["name"], c["arguments"]) for c in calls]
    wire = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    message: dict[str, Any] = {"role": "assistant", "content": t.reply.content, "tool_calls": wire}
    reasoning = "" if t.reply.reasoning is None and thinking is False else t.reply.reasoning
    if reasoning is not None:  # thinking off: the pre-filled empty block, as the template renders it
        message["reasoning_content"] = reasoning
    glue = encode_pieces(tokenizer, tool_turn_pieces(results, thinking)).ids
    if len(ep.ids) + len(glue) >= limit:
        ep.status = "context"
        return
    ep.n_calls += len(calls)
    ep.messages += [message, *({"role": "tool", "content": r} for r in results)]
    ep.ids += glue
    ep.mask += [False] * len(glue)


def episode_batch(
    episodes: Sequence[Episode], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids, mask) (N, T) of episodes, right-padded: a batch for the policy's forward."""
    return padded([e.ids for e in episodes], [e.mask for e in episodes], pad_id, device)
