"""Limits for the suite's hang guards that hold on a loaded machine.

A subprocess guard exists to turn a hang (a deadlocked rank, a blocked pipe) into a failure. A
fixed wall-clock limit also fails a run that is slow but alive: on the 2-core machine with a load
average of 24 (many jobs sharing it), the whole suite took 57 minutes instead of 5 and three
guards fired with no hang behind them. So the limit is scaled by how oversubscribed the machine is
when the guard starts; on a quiet machine it is the base value, and a real hang is still caught.
"""
from __future__ import annotations

import os


def hang_timeout(seconds: float) -> float:
    """`seconds` times the run-queue length per core (1-minute load average), at least `seconds`."""
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * max(1.0, per_core)
