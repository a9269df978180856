"""Session affinity on Ray Serve: a conversation's turns reach the replica that holds its KV cache.

Each replica keeps its own prefix cache (runtime/prefix_cache.py), so a conversation's next turn
reads only its new message when it lands on the replica that answered the last one. Ray Serve's
default router (power of two choices) spreads requests by load alone. This router reads a session
id from the request's `X-Session-ID` header (the chat page sends one per conversation; an OpenAI
client sets it with default_headers) and ranks the replicas by rendezvous hashing of (session,
replica): the same session always prefers the same replica while the set of replicas is unchanged,
and a replica that comes or goes moves only the sessions it wins or held. The other replicas follow
as the fallback rank, so a busy preferred replica (at max_ongoing_requests) never blocks a request.
A request without the header is routed as Serve's default router routes it.

Only headers are read: Ray's router sees the HTTP request's ASGI scope before its body arrives, so a
prompt's text cannot steer the choice (Ray LLM's prefix-aware router routes on the body by running
behind its own ingress; here the header is the contract).
"""

from __future__ import annotations

import hashlib
import pickle
from typing import List, Optional

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

SESSION_HEADER = b"x-session-id"


def session_of(pending: Optional[PendingRequest]) -> Optional[str]:
    """The X-Session-ID header of an HTTP request routed by the proxy (None when absent)."""
    if pending is None or not pending.args:
        return None
    request = pending.args[0]
    if isinstance(request, bytes) and getattr(pending.metadata, "is_http_request", False):
        # the proxy sends the request pickled by itself (Ray's own StreamingHTTPRequest: scope, no body)
        try:
            request = pickle.loads(request)
        except Exception:
            return None
    scope = getattr(request, "asgi_scope", None)
    if not isinstance(scope, dict):
        return None
    for name, value in scope.get("headers", ()):
        if name.lower() == SESSION_HEADER and value:
            return value.decode("latin-1")[:256]
    return None


def ranked(session: str, replicas: List[RunningReplica]) -> List[RunningReplica]:
    """The replicas by rendezvous hash of (session, replica id), highest first."""
    def score(r: RunningReplica) -> bytes:
        return hashlib.sha256(f"{session}\0{r.replica_id.unique_id}".encode()).digest()
    return sorted(replicas, key=score, reverse=True)


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        session = session_of(pending_request)
        if session is None or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        order = ranked(session, candidate_replicas)
        return [order[:1], order[1:]] if len(order) > 1 else [order]
