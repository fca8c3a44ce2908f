"""The FastAPI app: OpenAI-compatible routes over a Scheduler, the chat page at /, and /health.

Routes: GET / (chat page), GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
GET /v1/tools/builtin and POST /v1/tools/builtin/run (the built-in tools, for a client's tool loop).
With ServeConfig.api_key set, /v1/* answers 401 unless the request has ``Authorization: Bearer KEY``.
Every request first passes http.Guard (Host, content type, body size); request text is parsed and
tokenised on a worker thread, so the event loop (and /health) never waits for it.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from qinglm.errors import QingLMError
from qinglm.infer.slots import decode_compile
from qinglm.serve import protocol
from qinglm.serve.config import ServeConfig
from qinglm.serve.http import Guard, uvicorn_config
from qinglm.serve.protocol import GenRequest
from qinglm.serve.scheduler import Job, QueueFull, Scheduler
from qinglm.serve.tools import StreamReader, run_builtin

if TYPE_CHECKING:
    from qinglm.api import LM

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
PARSE_THREADS = 2  # requests tokenised at once, off the event loop


class _Unauthorized(Exception):
    """Raised by the /v1 routes' key check; answered with 401."""


def _error(
    status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, code), status_code=status)


def model_name(lm: LM, cfg: ServeConfig) -> str:
    """Return the model id the server reports: ServeConfig.model_name, else the run directory's name."""
    if cfg.model_name:
        return cfg.model_name
    return lm.run_dir.name if lm.run_dir is not None else "qinglm"


def create_app(lm: LM, cfg: ServeConfig | None = None) -> FastAPI:
    """Return the FastAPI app serving lm; its worker thread starts and stops with the app."""
    cfg = cfg or ServeConfig()
    cfg.check()  # the CLI's checks, for fields changed after the config was made
    scheduler = Scheduler(
        lm,
        max_queue=cfg.max_queue,
        max_batch_size=cfg.max_batch_size,
        kv_tokens=cfg.kv_cache_tokens,
        compile=decode_compile(cfg.compile, lm.device),
    )
    parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="qinglm-serve-parse")
    name = model_name(lm, cfg)
    created = int(time.time())
    context = lm.model.cfg.max_seq_len

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()
        parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="QingLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.config = scheduler, cfg
    app.add_middleware(Guard, cfg=cfg)

    def check_key(request: Request) -> None:
        if cfg.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                raise _Unauthorized

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
        return _error(401, message, "authentication_error", "invalid_api_key")

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback too
        return _error(500, "internal server error; see the server log", "server_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(files("qinglm.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "in_flight": scheduler.in_flight, **scheduler.stats}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": created, "owned_by": "qinglm", "context": context}
        return {"object": "list", "data": [card]}

    @v1.get("/tools/builtin")
    async def builtin_tools() -> dict[str, Any]:
        from qinglm.data.builtin_tools import TOOL_SCHEMAS

        return {"object": "list", "data": TOOL_SCHEMAS}

    @v1.post("/tools/builtin/run")
    async def run_builtin_tool(request: Request) -> Response:
        raw = await request.body()
        try:  # on a worker thread: a call may compute for up to the tools' time limit
            return JSONResponse(
                await asyncio.get_running_loop().run_in_executor(
                    parser, lambda: run_builtin(protocol.parse_body(raw))
                )
            )
        except QingLMError as e:
            return _error(400, str(e))

    def parse_request(raw: bytes, parse: Callable[..., GenRequest]) -> GenRequest:
        return parse(protocol.parse_body(raw), lm.tokenizer, context, cfg)

    async def generate(request: Request, parse: Callable[..., GenRequest]) -> Response:
        raw = await request.body()  # read whole, within its size limit, by Guard
        try:
            req = await asyncio.get_running_loop().run_in_executor(parser, parse_request, raw, parse)
        except QingLMError as e:
            return _error(400, str(e))
        try:
            job = scheduler.submit(req)
        except QueueFull as e:
            return _error(503, str(e), "server_error", "overloaded")
        except QingLMError as e:  # it could never fit the KV-cache budget
            return _error(400, str(e))
        if req.stream:
            return StreamingResponse(_stream(job, name), media_type="text/event-stream")
        return await _whole(job, name, request)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, protocol.parse_completion)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, protocol.parse_chat)

    app.include_router(v1)
    return app


async def _whole(job: Job, model: str, request: Request) -> Response:
    """Return the whole response once the job is done; cancel it if the client goes away first."""
    text: list[str] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                kind, value = "", ""
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # text events may never leave a gap
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; finally cancels the job
            if kind == "text":
                text.append(value)
            elif kind == "error":
                return _error(500, value, "server_error")
            elif kind == "done":
                use = protocol.usage(job.prompt_tokens, job.completion_tokens)
                rid = protocol.new_id(job.req.chat)
                return JSONResponse(protocol.response(job.req, rid, model, "".join(text), value, use))
    finally:
        job.cancel()  # a no-op when the job is done


async def _stream(job: Job, model: str) -> AsyncIterator[str]:
    """Yield the server-sent events of a streamed response, ending with data: [DONE]."""
    req, rid = job.req, protocol.new_id(job.req.chat)
    # A chat with tools or thinking streams deltas of reasoning, content and tool calls.
    reader = StreamReader(req.tool_use) if req.tool_use is not None and req.tool_use.parses else None

    def text_chunks(text: str, final: bool = False) -> Iterator[str]:
        if reader is None:
            yield protocol.sse(protocol.chunk(req, rid, model, text=text))
            return
        for delta in reader.feed(text, final):
            yield protocol.sse(protocol.chunk(req, rid, model, delta=delta))

    try:
        if req.chat:
            yield protocol.sse(protocol.chunk(req, rid, model, text="", role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                for event in text_chunks(value):
                    yield event
                continue
            if kind == "error":
                yield protocol.sse(protocol.error_body(value, "server_error"))
            else:
                for event in text_chunks("", final=True) if reader is not None else ():
                    yield event
                finish = "tool_calls" if reader is not None and reader.calls and value == "stop" else value
                yield protocol.sse(protocol.chunk(req, rid, model, finish=finish))
                if req.include_usage:
                    use = protocol.usage(job.prompt_tokens, job.completion_tokens)
                    yield protocol.sse(protocol.chunk(req, rid, model, use=use))
            yield protocol.sse("[DONE]")
            return
    finally:
        job.cancel()  # the client went away (the response task is cancelled) or the job is done


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run app with uvicorn on a background thread; yield its base URL (port 0 = a free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, app.state.config, host, port))
    thread = threading.Thread(target=server.run, name="qinglm-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 900  # a compiled server compiles every shape of its step first
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
