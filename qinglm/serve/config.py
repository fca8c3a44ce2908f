"""ServeConfig: every `qinglm serve` flag is one of its fields (``--max-tokens-cap`` is max_tokens_cap)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qinglm.config import QUANTIZATIONS, QUANTIZE_HELP, _f, check_choices  # _f: a field with its --help text
from qinglm.errors import QingLMError
from qinglm.typecheck import check_types

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """How the server listens, authenticates and limits requests; checks itself when made."""

    host: str = _f(
        "127.0.0.1",
        "address to listen on; any address but loopback (127.0.0.1, ::1, localhost) exposes the server "
        "to the network: then also set --api-key",
    )
    port: int = _f(8000, "TCP port", within="[1, 65535]")
    api_key: str | None = _f(
        None,
        "require 'Authorization: Bearer KEY' on /v1/* requests; needed whenever --host is not a loopback "
        "address, since without it anyone who can reach the port can use the model",
    )
    allowed_hosts: list[str] = _f(
        [],
        "without --api-key, Host header values accepted besides loopback names and --host (DNS-rebinding "
        "guard); '*' accepts any",
    )
    model_name: str | None = _f(None, "model id reported by /v1/models (default: the run directory's name)")
    max_tokens_cap: int = _f(
        512, "upper bound on max_tokens; larger or negative requests are clamped", within="[1, inf)"
    )
    default_max_tokens: int = _f(256, "max_tokens when a request does not give one", within="[1, inf)")
    truncate_prompt: bool = _f(
        False, "/v1/completions: keep the end of a prompt longer than the context instead of answering 400"
    )
    max_batch_size: int = _f(32, "most requests decoding at once (1 = one at a time)", within="[1, 4096]")
    kv_cache_tokens: int | None = _f(
        None,
        "KV-cache budget in tokens, rows x positions (default: max-batch-size x the context)",
        within="[1, inf)",
    )
    compile: bool | None = _f(None, "torch.compile the decoding step (default: on for CUDA, off for CPUs)")
    quantize: str = _f("none", QUANTIZE_HELP, choices=QUANTIZATIONS)
    max_queue: int = _f(256, "most requests waiting or running; more are answered 503", within="[1, 1000000]")
    max_request_bytes: int = _f(
        1 << 20, "largest request body in bytes; larger ones are answered 413", within="[1024, 1073741824]"
    )
    max_messages: int = _f(4096, "most messages in one chat request", within="[1, 1000000]")
    request_timeout: float = _f(
        30.0,
        "seconds a client may take to send one request (headers and body); slower ones are cut off",
        within="(0, inf)",
    )
    max_connections: int = _f(
        512, "most open connections and requests; more are answered 503", within="[2, 1000000]"
    )
    device: str = _f("auto", "cpu, cuda, mps or auto")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Return None; raise QingLMError for a setting the server cannot run with."""
        check_types(self)  # types and each field's range
        check_choices(self)  # and each field's set of values (--quantize)
        if self.api_key is not None and not self.api_key.strip():
            raise QingLMError("--api-key must not be empty")
        bad = [h for h in self.allowed_hosts if not h or any(c.isspace() or c in "/[]" for c in h)]
        if bad:
            raise QingLMError(f"--allowed-hosts takes host names or addresses without ports, got {bad[0]!r}")

    @property
    def exposed(self) -> bool:
        """Return True when host is not a loopback address (the server is reachable from the network)."""
        return not is_loopback(self.host)

    def host_allowed(self, host_header: str) -> bool:
        """Return True when a request's Host header may reach the API (always, with an API key)."""
        if self.api_key or "*" in self.allowed_hosts:
            return True
        name = host_header.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1 : name.find("]")] if "]" in name else ""
        elif name.count(":") == 1:  # host:port
            name = name.rsplit(":", 1)[0]
        allowed = {*LOOPBACK_HOSTS, self.host.lower(), *(h.lower() for h in self.allowed_hosts)}
        return name in allowed


def is_loopback(host: str) -> bool:
    """Return True for localhost and the loopback addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
