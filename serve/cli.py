"""`llama2-onnx serve`: the OpenAI-compatible HTTP server (and Azure ML /score) on uvicorn.

The port is bound first (a taken port is a one-line error), the server starts answering at once
(/health 503 while loading), the model loads on a background thread, and the URL is printed
once both are ready. The chat page is served at / (--no-web turns it off); --open opens it in
the default browser once ready. Torch-free; fastapi and uvicorn are imported in run() (the `serve` extra).
--ray serves the same app as Ray Serve replicas (serve/cli_ray.py; Ray is imported only there, in run_ray).

Limits (serve/server.py, serve/guard.py): --max-connections open at once, --read-timeout for a
request's headers and then its body, --keep-alive for idle connections, --grace for running
requests once SIGTERM or SIGINT arrives (then exit 0), a Host allowlist (--allowed-host).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
import webbrowser
from pathlib import Path

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.cli_common import add_model_arguments, check_speculative, model_folder, open_generator

from . import cli_ray
from .limits import Limits
from .urls import browser_url, http_url

API_KEY_ENV = "LLAMA2_ONNX_API_KEY"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 503 (default 64)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, else no key); other "
                        f"users can read it in `ps`: prefer --api-key-file or ${API_KEY_ENV}")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: no CORS headers)")
    p.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at GET /metrics")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="per-request time limit in seconds (default none)")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help="request body size limit (default 1 MiB)")
    d = Limits()
    p.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help=f"connections open at once; more are answered 503 and closed (default {d.max_connections})")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout_s, metavar="S",
                   help=f"seconds a request's headers, then its body, may take to arrive (default {d.read_timeout_s:g})")
    p.add_argument("--keep-alive", type=float, default=d.keep_alive_s, metavar="S",
                   help=f"seconds an idle kept-alive connection stays open (default {d.keep_alive_s:g})")
    p.add_argument("--grace", type=float, default=d.grace_s, metavar="S",
                   help=f"on SIGTERM or SIGINT, seconds running requests may finish before they are ended (default {d.grace_s:g})")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="answer requests whose Host header is NAME (repeatable; '*' for any). A server bound to "
                        "loopback answers only localhost names and IP addresses by default (DNS-rebinding protection)")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--open", action="store_true", help="open the chat page in the default browser once ready")
    cli_ray.add_arguments(p)


def _api_key(args) -> str | None:
    if args.api_key is not None and args.api_key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    if args.api_key_file is None:
        key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    else:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read an API key from {args.api_key_file} ({e})") from None
    if key is not None and not key:
        raise UserError(f"the API key is empty (check --api-key, --api-key-file and ${API_KEY_ENV})")
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(args) -> tuple[str, ...] | None:
    """The Host allowlist (guard.GuardOptions): on loopback, localhost names and IP literals plus
    --allowed-host; bound elsewhere, any host unless --allowed-host names some."""
    if _is_loopback(args.host) or args.allowed_host:
        return tuple(h.lower() for h in args.allowed_host)
    return None


def limits(args) -> Limits:
    return Limits(max_connections=args.max_connections, read_timeout_s=args.read_timeout,
                  keep_alive_s=args.keep_alive, grace_s=args.grace)


def _check(args) -> None:
    for name in ("max_batch", "max_body", "max_connections"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for name in ("timeout", "read_timeout", "keep_alive"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
    if not args.prefix_cache_gb >= 0:
        raise UserError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")
    check_speculative(args)
    if not args.grace >= 0:
        raise UserError(f"--grace must be >= 0 seconds, got {args.grace}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.open and args.no_web:
        raise UserError("--open opens the chat page, which --no-web turns off; give one of them")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def run(args) -> int:
    _check(args)
    cli_ray.check(args)
    api_key = _api_key(args)
    if args.ray:
        return cli_ray.run_ray(args, api_key, allowed_hosts(args))
    try:
        from .app import ServerState, create_app
        from .server import make_server
        from .service import Service
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install 'llama2-onnx[serve]'") from None
    from llama2_onnx.runtime.folder import FolderConfig

    folder = model_folder(args)
    FolderConfig.read(folder)  # a wrong folder fails here, in one line, before anything starts
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = http_url(host, port)

    state = ServerState()
    app = create_app(state, api_key=api_key, cors_origins=tuple(args.cors_origin), metrics=args.metrics,
                     max_body=args.max_body, web=not args.no_web, read_timeout_s=args.read_timeout,
                     allowed_hosts=allowed_hosts(args))
    server = make_server(app, state, limits(args))
    failed: list[str] = []

    def load() -> None:
        try:
            service = Service.from_generator(open_generator(args), max_batch=args.max_batch, max_queue=args.max_queue,
                                             timeout_s=args.timeout, model_id=folder.name)
        except Exception as e:  # UserError or an ORT failure: one line, then stop the server
            failed.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            server.should_exit = True
            return
        state.attach(service)
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        page = "" if args.no_web else f", chat page: {url}/"
        print(f"serving {service.model_id} at {url} (OpenAI API: {url}/v1{page})", flush=True)
        if args.open:
            webbrowser.open(browser_url(host, port))

    loader = threading.Thread(target=load, name="llama2-onnx-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        loader.join(timeout=60)
        if state.service is not None:
            state.service.close()
        sock.close()
    if failed:
        raise UserError(failed[0])
    print("stopped", file=sys.stderr)
    return 0
