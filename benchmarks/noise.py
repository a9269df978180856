"""How much of the CPU other processes took while one system ran: the noise in a figure.

    foreign share = (machine busy time - the worker's own CPU time) / (wall time x CPUs)

read from /proc/stat (all CPUs' non-idle time) and /proc/<pid>/stat (the worker's user +
system time, all its threads). The harness itself sleeps while a worker runs, so what is
left is other work on the machine. A repeat run while something else took more than the
noise limit is run again (schedule.py). Linux only; elsewhere the share is None.
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MIN_WALL_S = 0.25


def busy_seconds() -> float | None:
    """Non-idle CPU time of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


class NoiseMeter:
    """Started before a run, stopped after it: the share of the machine others used meanwhile."""

    def __init__(self, pid: int):
        self.pid = pid
        self.t = time.perf_counter()
        self.busy = busy_seconds()
        self.own = process_cpu_seconds(pid)

    def stop(self) -> float | None:
        wall = time.perf_counter() - self.t
        busy, own = busy_seconds(), process_cpu_seconds(self.pid)
        if None in (busy, own, self.busy, self.own) or wall < MIN_WALL_S:
            return None  # clock ticks (10 ms) cannot tell on a shorter run
        foreign = (busy - self.busy) - (own - self.own)
        # clock ticks are coarse: a run reads a little above or below the truth
        return round(min(max(foreign / (wall * (os.cpu_count() or 1)), 0.0), 1.0), 3)
