"""The server's connection limits and stop grace, with their defaults: a leaf module, so that
`serve --help` shows the defaults without importing uvicorn (serve/server.py applies them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512  # open at once; the process's descriptor limit is raised to fit
    read_timeout_s: float = 30.0  # for a request's headers, and then for its body
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    grace_s: float = 30.0  # on a stop signal, running requests may finish for this long

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("read_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
