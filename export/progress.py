"""Stage-by-stage progress for long exports: one tqdm bar per stage, on stderr.

A stage with a total (the layers being written or checked) advances by one per step:

    with stages.stage("write", total=n_layers) as step:
        ...; step()
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator


class Stages:
    def __init__(self, names: list[str], enabled: bool = True):
        self.names, self.enabled, self.seconds = names, enabled, {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[], None]]:
        n = self.names.index(name) + 1
        label = f"[{n}/{len(self.names)}] {name}"
        bar = None
        if self.enabled:
            from tqdm import tqdm

            fmt = "{desc:<16} {bar:20} {elapsed}" if total is None else "{desc:<16} {bar:20} {n}/{total} {elapsed}<{remaining}"
            bar = tqdm(total=total or 1, desc=label, file=sys.stderr, bar_format=fmt, leave=True)
        start = time.perf_counter()
        try:
            yield (lambda: bar.update(1)) if bar is not None and total else (lambda: None)
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if bar is not None:
                bar.update(bar.total - bar.n)
                bar.close()
