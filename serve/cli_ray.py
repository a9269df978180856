"""`llama2-onnx serve --ray`: the same server as Ray Serve replicas (serve/ray_app.py).

    llama2-onnx serve MODEL --ray --replicas 2 --threads 1         # a local Ray instance on this machine
    llama2-onnx serve MODEL --ray --autoscale 1:4 --ray-address auto   # the cluster `ray start` joined

Without --ray-address it starts a local Ray instance (its internals on 127.0.0.1, a small object
store: requests and answers are small) and stops it on exit; with one it deploys the app to that
cluster and deletes it on exit (for a deployment that outlives this command, use a Serve config
file: docs/deploy.md). --host and --port are Serve's HTTP proxy's. Ray is imported only in
run_ray(): this module stays importable without the `ray` extra.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import webbrowser
from pathlib import Path

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.cli_common import model_folder

from .urls import browser_url, http_url

APP_NAME = "llama2-onnx"
LOCAL_OBJECT_STORE = 256 << 20  # bytes; Ray's minimum is 75 MiB, its default 30% of memory


def add_arguments(p) -> None:
    g = p.add_argument_group("Ray Serve (the `ray` extra)")
    g.add_argument("--ray", action="store_true", help="serve on Ray Serve: the same app as replicas, each with --threads threads")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--replicas", type=int, default=None, metavar="N", help="a fixed number of replicas (default 1)")
    n.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="deploy to this Ray cluster ('auto': the one `ray start` joined; default: start a local one)")
    g.add_argument("--max-ongoing-requests", type=int, default=None, metavar="N",
                   help="requests one replica takes before Ray queues them (default --max-batch)")
    g.add_argument("--target-ongoing-requests", type=float, default=None, metavar="X",
                   help="autoscaling: ongoing requests per replica to aim for (default half of --max-batch)")


def check(args) -> None:
    """Ray-only options without --ray are an error, as are bad counts."""
    given = [f"--{k.replace('_', '-')}" for k in ("replicas", "autoscale", "ray_address", "max_ongoing_requests",
                                                  "target_ongoing_requests") if getattr(args, k) is not None]
    if given and not args.ray:
        raise UserError(f"{', '.join(given)} need --ray")
    if args.ray:
        scaling(args)


def autoscale_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--autoscale takes MIN:MAX such as 1:4, got {text!r}") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UserError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {text}")
    return lo, hi


def scaling(args) -> dict:
    """Scaling's fields from the options (ray_app.Scaling checks them again, Ray-side)."""
    if args.replicas is not None and args.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {args.replicas}")
    ongoing = args.max_ongoing_requests if args.max_ongoing_requests is not None else args.max_batch
    target = args.target_ongoing_requests if args.target_ongoing_requests is not None else max(1, args.max_batch / 2)
    if ongoing < 1 or not target > 0:
        raise UserError("--max-ongoing-requests must be at least 1 and --target-ongoing-requests > 0")
    out = {"max_ongoing_requests": ongoing, "target_ongoing_requests": target}
    if args.autoscale is not None:
        lo, hi = autoscale_range(args.autoscale)
        return {**out, "replicas": None, "min_replicas": lo, "max_replicas": hi}
    return {**out, "replicas": args.replicas or 1}


def default_threads(replicas: int) -> int:
    """This machine's cores shared among the replicas (give --threads for a cluster's nodes)."""
    return max(1, (os.cpu_count() or 1) // max(1, replicas))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _deployment_message(serve) -> str | None:
    """Why the deployment failed: the last line of Serve's status message (a replica constructor's traceback)."""
    from .ray_app import DEPLOYMENT

    try:
        lines = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].message.strip().splitlines()
        return lines[-1] if lines else None
    except Exception:  # noqa: BLE001 (status is best effort: the error above is the real one)
        return None


def run_ray(args, api_key: str | None, allowed_hosts: tuple[str, ...] | None = ()) -> int:
    """Deploy and serve until Ctrl-C or SIGTERM (args checked by check() first)."""
    try:
        import ray
        from ray import serve

        from .ray_app import ReplicaOptions, Scaling, build_app
    except ImportError as e:
        raise UserError(f"--ray needs the ray extra ({e.name} is missing): pip install 'llama2-onnx[ray]'") from None
    from llama2_onnx.runtime.folder import FolderConfig

    folder = model_folder(args).resolve()  # replicas open it by this path
    FolderConfig.read(folder)  # a wrong folder fails here, in one line, before Ray starts
    scale = Scaling(**scaling(args))
    speculative = args.speculative  # a draft folder is opened by the replicas by its full path
    if speculative not in (None, "ngram"):
        speculative = str(Path(speculative).resolve())
    threads = args.threads or default_threads(scale.max_replicas or scale.replicas)
    options = ReplicaOptions(model=str(folder), threads=threads, max_batch=args.max_batch, max_queue=args.max_queue,
                             timeout_s=args.timeout, provider=args.provider, api_key=api_key,
                             cors_origins=tuple(args.cors_origin), metrics=args.metrics, max_body=args.max_body,
                             web=not args.no_web, check_hashes=args.check_hashes, huge_pages=not args.no_huge_pages,
                             io_binding=not args.no_io_binding, read_timeout_s=args.read_timeout,
                             allowed_hosts=allowed_hosts, grace_s=args.grace, prefix_cache=not args.no_prefix_cache,
                             prefix_cache_gb=args.prefix_cache_gb, draft_tokens=args.draft_tokens,
                             speculative=speculative)
    port = args.port or _free_port(args.host)
    local = args.ray_address is None
    if local:
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        try:
            ray.init(address=args.ray_address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot join the Ray cluster at {args.ray_address} ({str(e).splitlines()[0]})") from None
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which sets its own
    try:
        serve.start(http_options={"host": args.host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(build_app(options, scale), name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        except RuntimeError as e:  # a replica's constructor failed past its retries
            raise UserError(f"the Ray Serve deployment failed: {_deployment_message(serve) or str(e).splitlines()[0]}") from None
        url = http_url(args.host, port)
        count = (f"{scale.replicas} replica{'s' * (scale.replicas > 1)}" if scale.replicas
                 else f"{scale.min_replicas} to {scale.max_replicas} replicas")
        print(f"serving {folder.name} on Ray Serve at {url} ({count} x {threads} threads; OpenAI API: {url}/v1)", flush=True)
        if args.open and not args.no_web:
            webbrowser.open(browser_url(args.host, port))
        try:
            while not stop.wait(0.5):  # until SIGTERM; Ctrl-C raises KeyboardInterrupt here
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    print("stopped", file=sys.stderr)
    return 0
