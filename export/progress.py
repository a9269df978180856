"""Stage-by-stage progress for long exports: one tqdm bar per stage, on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Stages:
    def __init__(self, names: list[str], enabled: bool = True):
        self.names, self.enabled, self.seconds = names, enabled, {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        n = self.names.index(name) + 1
        label = f"[{n}/{len(self.names)}] {name}"
        bar = None
        if self.enabled:
            from tqdm import tqdm

            bar = tqdm(total=1, desc=label, file=sys.stderr, bar_format="{desc:<16} {bar:20} {elapsed}", leave=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if bar is not None:
                bar.update(1)
                bar.close()
