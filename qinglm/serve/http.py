"""The HTTP edge of the server: what every request passes before a route sees it, and uvicorn's settings.

- Guard (ASGI middleware): the Host header (DNS-rebinding guard, without an API key), the content type of
  POSTs (application/json only, so no cross-site form or text/plain POST gets in), and the body, read
  whole here up to ServeConfig.max_request_bytes (413 beyond). A client that leaves while sending its
  body is logged in one line.
- uvicorn_config: uvicorn's limits (keep-alive, connections) and an h11 protocol that cuts off a client
  taking longer than ServeConfig.request_timeout to send a request (headers and body): slowloris.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from qinglm.serve import protocol
from qinglm.serve.config import ServeConfig

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("qinglm.serve")
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


class Guard:
    """ASGI middleware: Host and content-type checks, and the body read whole within its size limit."""

    def __init__(self, app: ASGIApp, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.cfg.host_allowed(host):
            message = (
                f"Host {host!r:.80} is not allowed: use http://127.0.0.1, or start the server with "
                "--allowed-hosts NAME (or --api-key)"
            )
            await _reply(scope, receive, send, 400, message, "host_not_allowed")
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            message = f"send the request body as JSON with 'Content-Type: application/json', not {kind!r:.60}"
            await _reply(scope, receive, send, 415, message, "unsupported_media_type", close=True)
            return
        body = await self._read_body(scope, receive, send, headers.get("content-length"))
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, when the client goes away

        await self.app(scope, replay, send)

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, length: str | None
    ) -> bytes | None:
        """Return the request body, or None after answering 413 or seeing the client leave."""
        limit = self.cfg.max_request_bytes
        too_big = f"the request body is larger than {limit} bytes (the server's --max-request-bytes)"
        if length is not None and length.isdigit() and int(length) > limit:
            await _reply(scope, receive, send, 413, too_big, "request_too_large", close=True)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.warning(
                    "%s went away while sending its request (%d bytes received)", _client(scope), size
                )
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(scope, receive, send, 413, too_big, "request_too_large", close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _reply(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str, close: bool = False
) -> None:
    """Answer a request with an OpenAI-style JSON error (closing the connection when close)."""
    headers = {"connection": "close"} if close else None
    response = JSONResponse(protocol.error_body(message, code=code), status_code=status, headers=headers)
    await response(scope, receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on receiving each request whole (headers and body).

    The clock starts when a connection opens or a request's first bytes arrive; a request not fully
    received by then has its connection closed. uvicorn itself only times idle keep-alive connections.
    """

    request_timeout = 30.0  # set per server by uvicorn_config

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # received whole (or the connection is done with)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning(
                "closed the connection of %s: no whole request within %gs", client, self.request_timeout
            )
            self.transport.close()


def uvicorn_config(app: Any, cfg: ServeConfig, host: str, port: int) -> uvicorn.Config:
    """Return the uvicorn.Config that serves app on host:port with cfg's limits."""
    import uvicorn

    timed = type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout": cfg.request_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=timed,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=cfg.max_connections,
    )
