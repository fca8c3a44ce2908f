"""`qinglm serve --model RUN`: the OpenAI-compatible server and the chat page (flags = ServeConfig fields)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qinglm.config import ContextConfig, add_dataclass_args, given
from qinglm.serve.config import ServeConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add the `serve` parser to sub and return {"serve": handler}."""
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /",
        description="Serve RUN at http://HOST:PORT: GET /v1/models, POST /v1/completions, "
        "POST /v1/chat/completions (stream: true for server-sent events), GET /health, and a chat page at /. "
        "It listens on 127.0.0.1 (this machine only) by default; to listen on a network address "
        "(--host 0.0.0.0 or a LAN address) also set --api-key, or anyone who can reach the port can use it.",
    )
    p.add_argument(
        "--model", "--model_path", dest="model", required=True, help="run directory (or a file in it)"
    )
    add_dataclass_args(p, ServeConfig)
    add_dataclass_args(p, ContextConfig)
    return {"serve": cmd_serve}


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    import qinglm
    from qinglm.errors import QingLMError

    cfg = ServeConfig(**given(args, ServeConfig))  # checks itself: QingLMError for bad values
    try:
        import uvicorn

        from qinglm.serve.app import create_app
        from qinglm.serve.http import uvicorn_config
    except ImportError as e:
        raise QingLMError(f"serving needs fastapi and uvicorn ({e}); pip install 'qinglm[serve]'") from None
    context = ContextConfig(**given(args, ContextConfig))
    lm = qinglm.load(args.model, device=cfg.device, context=context, quantize=cfg.quantize)
    app = create_app(lm, cfg)
    print(f"qinglm: serving {lm.run_dir} on http://{cfg.host}:{cfg.port} (chat page at /)", flush=True)
    if cfg.exposed and not cfg.api_key:
        print(
            f"qinglm: warning: {cfg.host} is reachable from the network and there is no --api-key: "
            "anyone who can reach the port can use the model",
            file=sys.stderr,
            flush=True,
        )
    try:
        uvicorn.Server(uvicorn_config(app, cfg, cfg.host, cfg.port)).run()
    except OSError as e:  # e.g. the port is taken
        raise QingLMError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None
