"""The OpenAI wire format: request bodies checked into GenRequests, and response/chunk dicts.

Requests are plain JSON dicts (unknown fields are ignored). A malformed request raises QingLMError,
which the app answers with status 400 and ``{"error": {"message": ..., "type": "invalid_request_error"}}``.

Limits, as documented for users:
- ``max_tokens`` (or ``max_completion_tokens``) missing -> ServeConfig.default_max_tokens; any value is
  clamped to [1, ServeConfig.max_tokens_cap]; generation also stops when the context is full
  (finish_reason "length").
- a completion prompt longer than the model's context -> 400, or with ``--truncate-prompt`` its beginning
  is dropped (the [BOS] token is kept); a chat drops its oldest non-system turns to leave room for the
  reply, as LM.chat does, and answers 400 only when the system prompt and last message alone do not fit.
- sampling defaults are QingLM's (SamplingConfig); ``top_k``, ``repetition_penalty`` and ``seed`` are accepted
  as extensions; ``n`` must be 1. Values the sampler cannot use are answered 400: ``temperature`` must be 0
  (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE], ``top_p`` in (0, 1], ``repetition_penalty`` in
  [MIN_PENALTY, MAX_PENALTY], ``seed`` an integer of 64 bits (SamplingConfig.seed's range, what
  torch.Generator.manual_seed takes); NaN and infinities never.
- text must be valid Unicode (no lone surrogates); a chat has at most ServeConfig.max_messages messages;
  text that cannot fit the context even at the tokenizer's longest token is refused (or, with
  ``--truncate-prompt``, cut to its end) before it is tokenized.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.chat import IM_END, ROLES, fit_history, prompt_budget
from qinglm.infer.text import encode_prompt
from qinglm.serve.config import ServeConfig
from qinglm.typecheck import check_value, ranges

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # as in the OpenAI API
# Below MIN_TEMPERATURE, logits / temperature can overflow float32 and sampling fails: 0 means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0
MIN_PENALTY, MAX_PENALTY = 1e-2, 100.0  # the same overflow, through the repetition penalty
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system prompts


@dataclass
class GenRequest:
    """One checked generation request: what the scheduler needs to run it and the app to answer it."""

    chat: bool
    prompt_ids: list[int]
    sampling: SamplingConfig
    stop: list[str] = field(default_factory=list)  # strings that end the reply (not included in it)
    stream: bool = False
    include_usage: bool = False
    counted: list[bool] | None = None  # prompt tokens the repetition penalty counts (a chat: its contents)


# ---------------------------------------------------------------------------- parsing


def parse_body(raw: bytes) -> dict[str, Any]:
    """Return the JSON object in raw; raise QingLMError if it is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise QingLMError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise QingLMError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise QingLMError("the request body must be a JSON object")
    return body


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """Return body[name] (default when missing or null); raise QingLMError if it has the wrong type."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
        raise QingLMError(f"'{name}' must be {kinds[0].__name__}, got {value!r}")
    if not isinstance(value, kinds):
        raise QingLMError(f"'{name}' must be {kinds[0].__name__}, got {value!r:.60}")
    return value


def _number(body: dict[str, Any], name: str, default: float, within: str) -> float:
    """Return body[name] as a float in the interval within (default when missing); QingLMError otherwise."""
    value = _get(body, name, (float, int), default)
    check_value(f"'{name}'", value, within)  # NaN and infinities never; an int past 1e308 is out of range
    return float(value)


def _sampling(body: dict[str, Any], cfg: ServeConfig) -> SamplingConfig:
    """Return the SamplingConfig of a request: its fields over QingLM's defaults, max_tokens clamped."""
    d = SamplingConfig()
    max_tokens = _get(
        body, "max_completion_tokens", int, _get(body, "max_tokens", int, cfg.default_max_tokens)
    )
    top_k = _get(body, "top_k", int, d.top_k)
    temperature = _number(body, "temperature", d.temperature, f"[0, {MAX_TEMPERATURE:g}]")
    if 0 < temperature < MIN_TEMPERATURE:
        raise QingLMError(
            f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature}"
        )
    top_p = _number(body, "top_p", d.top_p if d.top_p is not None else 1.0, ranges(SamplingConfig)["top_p"])
    seed = _get(body, "seed", int, None)
    check_value("'seed'", seed, ranges(SamplingConfig)["seed"])
    sampling = SamplingConfig(
        max_new_tokens=min(max(max_tokens, 1), cfg.max_tokens_cap),
        temperature=temperature,
        top_k=top_k if top_k and top_k > 0 else None,
        top_p=top_p,
        repetition_penalty=_number(
            body, "repetition_penalty", d.repetition_penalty, f"[{MIN_PENALTY:g}, {MAX_PENALTY:g}]"
        ),
        seed=seed,
    )
    if _get(body, "n", int, 1) != 1:
        raise QingLMError("'n' must be 1: this server returns one choice per request")
    return sampling


def _stop(body: dict[str, Any]) -> list[str]:
    """Return the stop strings of a request (a string or a list of up to 4)."""
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise QingLMError("'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise QingLMError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    return [_text(s, "'stop'") for s in stop if s]


def _text(value: Any, what: str) -> str:
    """Return value if it is a string of valid Unicode; raise QingLMError otherwise."""
    if not isinstance(value, str):
        raise QingLMError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\\ud800" decodes to a lone surrogate
        raise QingLMError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None
    return value


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer: Tokenizer) -> int:
    """Return the most characters one token of tokenizer can cover (its longest vocabulary entry).

    A text of n characters is at least n / longest_token(tokenizer) tokens, which bounds a prompt's
    length in tokens before it is encoded. Byte-level entries hold one character per byte, an upper bound.
    """
    return max(1, max(len(t) for t in tokenizer.backend.get_vocab(with_added_tokens=True)))


def _fit_context(ids: list[int], sampling: SamplingConfig, context: int, truncate: bool) -> list[int]:
    """Return ids, or with truncate its [BOS] plus the tail that leaves room to generate; else raise."""
    if len(ids) <= context:
        return ids
    if not truncate:
        raise QingLMError(
            f"the prompt is {len(ids)} tokens but the model's context is {context}; "
            "shorten it (or start the server with --truncate-prompt)"
        )
    return ids[:1] + ids[len(ids) - (prompt_budget(context, sampling.max_new_tokens) - 1) :]


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """Return (stream, include_usage) of a request."""
    stream = bool(_get(body, "stream", bool, False))
    options = _get(body, "stream_options", dict, {})
    return stream, bool(options.get("include_usage", False))


def parse_completion(
    body: dict[str, Any], tokenizer: Tokenizer, context: int, cfg: ServeConfig
) -> GenRequest:
    """Return the GenRequest of a /v1/completions body: the prompt continued as a document."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise QingLMError("'prompt' must be a string (one prompt per request)")
    prompt = _text(prompt, "'prompt'")
    sampling = _sampling(body, cfg)
    most = context * longest_token(tokenizer)  # more characters are surely more tokens than context
    if len(prompt) > most:
        if not cfg.truncate_prompt:
            raise QingLMError(
                f"the prompt is {len(prompt)} characters, more than the model's context of {context} "
                "tokens can hold; shorten it (or start the server with --truncate-prompt)"
            )
        prompt = prompt[len(prompt) - most :]  # still at least `context` tokens: the end is what is kept
    ids = _fit_context(encode_prompt(tokenizer, prompt), sampling, context, cfg.truncate_prompt)
    stream, usage = _stream_flags(body)
    return GenRequest(False, ids, sampling, _stop(body), stream, usage)


def _message(m: Any, i: int) -> dict[str, str]:
    """Return message i as {"role", "content"}; content given as a list of text parts is joined."""
    if not isinstance(m, dict):
        raise QingLMError(f"message {i} must be an object with 'role' and 'content'")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise QingLMError(f"message {i}: only text content parts are supported")
        content = "".join(_text(p.get("text", ""), f"message {i}'s text") for p in content)
    role = m.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise QingLMError(f"message {i}'s 'role' must be one of {', '.join(ROLES)}, got {role!r:.40}")
    return {"role": role, "content": _text("" if content is None else content, f"message {i}'s 'content'")}


def parse_chat(body: dict[str, Any], tokenizer: Tokenizer, context: int, cfg: ServeConfig) -> GenRequest:
    """Return the GenRequest of a /v1/chat/completions body, rendered with the saved chat template.

    As LM.chat does, the oldest non-system turns are dropped until the prompt leaves room for the
    reply (max_tokens, at most half the context); the reply ends at <|im_end|>.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise QingLMError("'messages' must be a non-empty list of {'role': ..., 'content': ...}")
    if len(messages) > cfg.max_messages:
        raise QingLMError(f"a chat takes at most {cfg.max_messages} messages, got {len(messages)}")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    sampling = _sampling(body, cfg)
    budget = prompt_budget(context, sampling.max_new_tokens)
    _, prompt = fit_history(tokenizer, messages, budget, longest_token(tokenizer))
    stream, usage = _stream_flags(body)
    return GenRequest(True, prompt.ids, sampling, [*_stop(body), IM_END], stream, usage, prompt.content)


# ---------------------------------------------------------------------------- responses


def new_id(chat: bool) -> str:
    """Return a fresh response id in OpenAI's style."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return the usage object of a response."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    req: GenRequest, rid: str, model: str, text: str, finish: str, use: dict[str, int]
) -> dict[str, Any]:
    """Return the whole (non-streamed) response body."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    kind = "chat.completion" if req.chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chunk(
    req: GenRequest,
    rid: str,
    model: str,
    *,
    text: str | None = None,
    finish: str | None = None,
    use: dict[str, int] | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """Return one streamed chunk: a text delta, the finish_reason, or (use given) the usage-only chunk.

    A chat stream's first chunk says role=True (delta {"role": "assistant", "content": ""}).
    """
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model}
    if use is not None:
        out["choices"] = []
    elif req.chat:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if req.include_usage:
        out["usage"] = use
    return out


def sse(obj: dict[str, Any] | str) -> str:
    """Return one server-sent event carrying obj as JSON (or a literal like [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """Return an OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
