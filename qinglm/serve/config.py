"""ServeConfig: every `qinglm serve` flag is one of its fields (``--max-tokens-cap`` is max_tokens_cap)."""

from __future__ import annotations

from dataclasses import dataclass

from qinglm.config import _f  # a field with its --help text, as every config dataclass declares them


@dataclass
class ServeConfig:
    """How the server listens, authenticates and limits requests."""

    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = _f(8000, "TCP port")
    api_key: str | None = _f(None, "require 'Authorization: Bearer KEY' on /v1/* requests")
    model_name: str | None = _f(None, "model id reported by /v1/models (default: the run directory's name)")
    max_tokens_cap: int = _f(512, "upper bound on max_tokens; larger or negative requests are clamped")
    default_max_tokens: int = _f(256, "max_tokens when a request does not give one")
    truncate_prompt: bool = _f(
        False, "/v1/completions: keep the end of a prompt longer than the context instead of answering 400"
    )
    max_batch_size: int = _f(32, "most requests decoding at once (1 = one at a time)")
    max_queue: int = _f(256, "most requests waiting or running; more are answered 503")
    device: str = _f("auto", "cpu, cuda, mps or auto")
