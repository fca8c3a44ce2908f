"""`qinglm serve --model RUN`: the OpenAI-compatible server and the chat page (flags = ServeConfig fields)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import add_dataclass_args, given
from qinglm.serve.config import ServeConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add the `serve` parser to sub and return {"serve": handler}."""
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /",
        description="Serve RUN at http://HOST:PORT: GET /v1/models, POST /v1/completions, "
        "POST /v1/chat/completions (stream: true for server-sent events), GET /health, and a chat page at /.",
    )
    p.add_argument(
        "--model", "--model_path", dest="model", required=True, help="run directory (or a file in it)"
    )
    add_dataclass_args(p, ServeConfig)
    return {"serve": cmd_serve}


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    import qinglm
    from qinglm.errors import QingLMError

    cfg = ServeConfig(**given(args, ServeConfig))
    if cfg.max_tokens_cap < 1 or cfg.default_max_tokens < 1 or cfg.max_queue < 1 or cfg.max_batch_size < 1:
        raise QingLMError(
            "--max-tokens-cap, --default-max-tokens, --max-queue and --max-batch-size must be >= 1"
        )
    if not 0 < cfg.port < 65536:
        raise QingLMError(f"--port must be in 1..65535, got {cfg.port}")
    try:
        import uvicorn

        from qinglm.serve.app import create_app
    except ImportError as e:
        raise QingLMError(f"serving needs fastapi and uvicorn ({e}); pip install 'qinglm[serve]'") from None
    lm = qinglm.load(args.model, device=cfg.device)
    app = create_app(lm, cfg)
    print(f"qinglm: serving {lm.run_dir} on http://{cfg.host}:{cfg.port} (chat page at /)", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    except OSError as e:  # e.g. the port is taken
        raise QingLMError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None
