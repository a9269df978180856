"""Ray Serve: the same FastAPI app (serve/app.py) and engine (serve/service.py) as replicas on a Ray cluster.

    app = build_app(ReplicaOptions(model="/models/llama-2-7b-chat-int4", threads=4),
                    Scaling(replicas=2, max_ongoing_requests=8))
    serve.run(app, route_prefix="/")               # on a cluster ray.init() has joined

    # or from a Serve config file (`serve run` / `serve deploy` / KubeRay's serveConfigV2):
    #   import_path: llama2_onnx.serve.ray_app:app_builder
    #   args: {model: /models/llama-2-7b-chat-int4, threads: 4}

Each replica is one Ray actor that opens the model folder once, in its constructor, with
`threads` ONNX Runtime intra-op threads (its ray_actor_options reserve as many CPUs), starts its
own engine (continuous batching over `max_batch` rows) and builds the very same app with
create_app: no route is implemented twice. The app is built on the replica, after the model has
loaded (Serve's late-bound ingress, `__serve_build_asgi_app__`), so Ray marks a replica ready only
once it can answer; a middleware adds the X-Replica response header (the replica's id).

The model folder reaches a replica by path: every node that may run a replica must see the folder
at that path (shared storage, or the same copy on each node). Each replica checks the folder's
manifest when it opens it (on a node's first load, every file's sha256), so a missing or
different copy fails that replica's start in one line, never serves a wrong model.

Ray routes a request to a replica with fewer than `max_ongoing_requests` in flight, and queues it
in the proxy otherwise; set it to the engine's max_batch so requests wait where another replica
can take them, not in one replica's engine queue. Autoscaling (min/max replicas) adds a replica
when the ongoing requests per replica pass `target_ongoing_requests`.

This is the only module that imports Ray; the plain server (serve/cli.py, serve/app.py) never does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ray import serve
from ray.serve import Application

from llama2_onnx.runtime.speculate import DRAFT_TOKENS

from .app import MAX_BODY, ServerState, create_app
from .service import Service

REPLICA_HEADER = "X-Replica"
DEPLOYMENT = "llama2-onnx"


@dataclass(frozen=True)
class ReplicaOptions:
    """What each replica is built with: the model folder, its threads and the plain server's options."""

    model: str  # the folder's path, the same on every node
    threads: int = 1  # ONNX Runtime intra-op threads; the replica reserves as many CPUs
    max_batch: int = 8
    max_queue: int = 64
    timeout_s: float | None = None
    provider: str = "cpu"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    metrics: bool = False
    max_body: int = MAX_BODY
    web: bool = True
    read_timeout_s: float = 30.0  # a request's body must arrive within this (the guard's 408)
    # the Host allowlist (serve/guard.py): None = any host (a proxy on 0.0.0.0 is reached by names we
    # cannot know); names: those, localhost names and IP literals; () = localhost names and IP literals
    allowed_hosts: tuple[str, ...] | None = None
    grace_s: float = 30.0  # on shutdown, Ray waits this long for a replica's running requests
    check_hashes: bool | None = None
    huge_pages: bool = True
    io_binding: bool = True
    prefix_cache: bool = True
    prefix_cache_gb: float = 1.0
    speculative: str | None = None  # "ngram" or a draft model folder (runtime/speculate.py)
    draft_tokens: int = DRAFT_TOKENS

    def __post_init__(self):
        if self.threads < 1 or self.max_batch < 1 or self.max_queue < 0 or self.max_body < 1:
            raise ValueError("threads, max_batch and max_body must be >= 1, max_queue >= 0")
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if isinstance(self.allowed_hosts, str):
            raise ValueError("allowed_hosts is a list of host names, not one string")
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))

    @classmethod
    def from_dict(cls, args: dict) -> "ReplicaOptions":
        """From a Serve config file's `args`: an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(args) - known):
            raise ValueError(f"unknown llama2-onnx replica option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**args)


@dataclass(frozen=True)
class Scaling:
    """A fixed number of replicas, or autoscaling between min_replicas and max_replicas."""

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_ongoing_requests: int = 8  # per replica, before Ray queues in the proxy (default: the engine's max_batch)
    target_ongoing_requests: float = 4  # autoscaling: ongoing requests per replica it aims for

    def __post_init__(self):
        autoscale = self.min_replicas is not None or self.max_replicas is not None
        if autoscale == (self.replicas is not None):
            raise ValueError("give either replicas or min_replicas and max_replicas")
        if autoscale and not (self.min_replicas is not None and self.max_replicas is not None
                              and 0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise ValueError(f"autoscaling needs 0 <= min <= max and max >= 1, got {self.min_replicas}:{self.max_replicas}")
        if not autoscale and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.max_ongoing_requests < 1 or not self.target_ongoing_requests > 0:
            raise ValueError("max_ongoing_requests must be >= 1 and target_ongoing_requests > 0")

    def deployment_options(self, threads: int) -> dict:
        """Keyword arguments of Deployment.options()."""
        opts = {"ray_actor_options": {"num_cpus": threads}, "max_ongoing_requests": self.max_ongoing_requests}
        if self.replicas is not None:
            opts["num_replicas"] = self.replicas
        else:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "initial_replicas": max(1, self.min_replicas),
                                          "target_ongoing_requests": self.target_ongoing_requests}
        return opts


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that answered it."""

    def __init__(self, app, *, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.lower().encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, named_send)


# A replica whose folder is missing or altered on its node fails in its constructor: a few tries, not Serve's 20.
@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8,
                  graceful_shutdown_timeout_s=10, max_constructor_retry_count=3)
@serve.ingress()
class LlamaReplica:
    """One replica: the model folder opened once, its engine, and the plain server's app over them."""

    def __init__(self, options: ReplicaOptions):
        self.options = o = options
        self.replica = serve.get_replica_context().replica_tag
        self.state = ServerState()
        self.state.attach(Service.open(o.model, max_batch=o.max_batch, max_queue=o.max_queue, timeout_s=o.timeout_s,
                                       model_id=Path(o.model).name, provider=o.provider, threads=o.threads,
                                       io_binding=o.io_binding, check_hashes=o.check_hashes, huge_pages=o.huge_pages,
                                       prefix_cache=o.prefix_cache, prefix_cache_gb=o.prefix_cache_gb,
                                       speculative=o.speculative, draft_tokens=o.draft_tokens))

    def __serve_build_asgi_app__(self):
        o = self.options
        app = create_app(self.state, api_key=o.api_key, cors_origins=o.cors_origins, metrics=o.metrics,
                         max_body=o.max_body, web=o.web, read_timeout_s=o.read_timeout_s, allowed_hosts=o.allowed_hosts)
        app.add_middleware(ReplicaHeader, replica=self.replica)  # outermost: errors name the replica too
        return app

    def __del__(self):  # also after a constructor that failed before self.state was set
        if getattr(self, "state", None) is not None and self.state.service is not None:
            self.state.service.close()


ROUTER = "llama2_onnx.serve.ray_router:SessionAffinityRouter"  # a conversation's turns to one replica


def build_app(options: ReplicaOptions, scaling: Scaling) -> Application:
    """The Serve application: LlamaReplica with the scaling's options, bound to the replica options,
    routed by session (serve/ray_router.py)."""
    from ray.serve.config import RequestRouterConfig

    return LlamaReplica.options(**scaling.deployment_options(options.threads), **_shutdown_options(options),
                                request_router_config=RequestRouterConfig(request_router_class=ROUTER)).bind(options)


def _shutdown_options(options: ReplicaOptions) -> dict:
    """Ray drains a stopping replica (no new requests, running ones go on) for up to
    graceful_shutdown_timeout_s, then kills it: our grace, as the plain server's --grace."""
    return {"graceful_shutdown_timeout_s": options.grace_s, "graceful_shutdown_wait_loop_s": 0.5}


def app_builder(args: dict) -> Application:
    """For a Serve config file's import_path (`llama2_onnx.serve.ray_app:app_builder`): args are
    ReplicaOptions' fields; replicas, autoscaling and max_ongoing_requests go in the file's
    `deployments` section (name: llama2-onnx), as Serve's own options."""
    options = ReplicaOptions.from_dict(dict(args))
    return LlamaReplica.options(ray_actor_options={"num_cpus": options.threads}, max_ongoing_requests=options.max_batch,
                                **_shutdown_options(options)).bind(options)
