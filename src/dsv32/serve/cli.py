"""`dsv32 serve`: the OpenAI-compatible server (registered by dsv32.cli).

    dsv32 serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name N]

Prints `dsv32 serve: listening on http://HOST:PORT` once the socket is bound (with --port 0 the
port is the one the system chose). SIGINT/SIGTERM shut it down cleanly: new requests get 503,
requests in flight may finish for --shutdown-timeout seconds, the rest are cancelled (their
streams end with an error event and [DONE]).

Under `torchrun --nproc_per_node N -m dsv32.cli serve ...` rank 0 binds the port and serves HTTP;
every rank loads its shard and runs each step's forward with it (dsv32.infer.parallel).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys

from dsv32.cli import CLIError
from dsv32.infer.launch import DEFAULT_MAX_SEQ_LEN


def add_commands(sub) -> None:
    from dsv32.infer.cli import COMPILE_HELP, add_parallel_flags

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, tools, metrics)",
                       description="Serve a checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("DSV32_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV32_API_KEY, else open)")
    p.add_argument("--served-model-name", metavar="N", help="model id clients use (default: the directory name)")
    p.add_argument("--dtype", default="fp32", help="weights dtype: fp32 (default) or bf16")
    p.add_argument("--int8", action="store_true", help="weight-only int8 (per-channel) for faster CPU decoding")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs the MTP layer)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"context limit per request (default: min(model limit, {DEFAULT_MAX_SEQ_LEN}))")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the batch; past that the server answers 503 (default 256)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--thinking", action="store_true",
                   help="thinking mode by default (requests override it with chat_template_kwargs.thinking)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds requests in flight may run on after SIGTERM/SIGINT (default 5)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_parallel_flags(p)
    p.set_defaults(func=cmd_serve)


def _sampling_defaults(model_dir: str) -> dict:
    """temperature / top_p / top_k from the checkpoint's generation_config.json, if it has one."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: {exc}") from None
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if isinstance(cfg.get(k), (int, float))}


def build_engine(args):
    """Load the checkpoint in this process or across the torchrun job: a context manager yielding
    (engine, tokenizer), engine None on follower ranks (see dsv32.infer.launch)."""
    from dsv32.infer.cli import engine_options
    from dsv32.infer.launch import parallel_engine

    if args.max_queue < 0:
        raise CLIError("--max-queue must be >= 0")
    return parallel_engine(args.model, max_batch=args.max_batch, prefix_caching=not args.no_prefix_caching,
                           **engine_options(args))


def _bind(args) -> socket.socket:
    """Bind first: a busy port fails before the model is loaded."""
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections made before uvicorn starts accepting wait instead of being refused
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return sock


def cmd_serve(args) -> int:
    from dsv32.infer.parallel import launched_rank

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no such checkpoint directory: {args.model}")
    # under torchrun only rank 0 serves HTTP; the other ranks follow its engine
    sock = _bind(args) if launched_rank() == 0 else None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with build_engine(args) as (engine, tokenizer):
            if engine is not None:
                _serve(args, sock, engine, tokenizer)
    finally:
        if sock is not None:
            sock.close()
    return 0


def _serve(args, sock: socket.socket, engine, tokenizer) -> None:
    import uvicorn

    from dsv32.serve.app import create_app

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                     root=os.path.abspath(args.model), default_thinking=args.thinking,
                     sampling_defaults=_sampling_defaults(args.model), shutdown_timeout=args.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            timeout_graceful_shutdown=max(1, int(args.shutdown_timeout) + 1))
    server = GracefulServer(config, app)
    url_host = f"[{host}]" if ":" in host else host
    ranks = getattr(getattr(engine, "ctx", None), "world_size", 1)
    print(f"dsv32 serve: model {name!r} ({args.model}), max_seq_len {engine.max_seq_len}, "
          f"max_batch {engine.max_batch}" + (f", {ranks} ranks" if ranks > 1 else ""), flush=True)
    print(f"dsv32 serve: listening on http://{url_host}:{port}", flush=True)
    server.run(sockets=[sock])


class _GracefulMixin:
    """On shutdown, first drain the engine loop (new requests get 503, in-flight ones may finish for
    the shutdown timeout, the rest are cancelled so their responses end properly), then let uvicorn
    close the connections."""

    async def shutdown(self, sockets=None):
        state = self._dsv32_app.state.server
        await asyncio.to_thread(state.loop.stop, state.shutdown_timeout)
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down (exit status -SIG); a clean shutdown exits 0
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def _graceful_server_class():
    import uvicorn

    class _Server(_GracefulMixin, uvicorn.Server):
        def __init__(self, config, app):
            super().__init__(config)
            self._dsv32_app = app

    return _Server


def GracefulServer(config, app):  # noqa: N802 - a class factory (uvicorn is imported lazily)
    return _graceful_server_class()(config, app)


if __name__ == "__main__":
    sys.exit("run `dsv32 serve`")
