"""How many cores this process may use: its CPU affinity, not the machine's count.

A job given 4 of a node's 64 cores (taskset, cgroups, a scheduler) must size its
worker pools to 4; ``os.cpu_count()`` would say 64.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
