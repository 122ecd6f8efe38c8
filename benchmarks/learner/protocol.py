"""A benchmark side is a subprocess that sets up once, then answers commands on stdin, one JSON
line each on stdout (prefixed, so library chatter on stdout is ignored). Standard library only."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable

PREFIX = "@@bench "


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory(cuda_peak_mib: Callable[[], float] | None) -> dict:
    out = {"rss_mib": _kib("VmRSS") / 1024, "rss_peak_mib": _kib("VmHWM") / 1024}
    if cuda_peak_mib is not None:
        out["cuda_peak_mib"] = cuda_peak_mib()
    return out


def reset_peak(cuda_reset: Callable[[], None] | None) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current RSS (Linux)
    except OSError:
        pass
    if cuda_reset is not None:
        cuda_reset()


def reply(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(step: Callable[[], dict], sync: Callable[[], None] = lambda: None,
          cuda_peak_mib: Callable[[], float] | None = None, cuda_reset: Callable[[], None] | None = None) -> None:
    """Answer ``step`` (time one learner step), ``memory``, ``reset_peak`` and ``quit``."""
    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            sync()
            start = time.perf_counter()
            stats = step()
            sync()
            reply({"seconds": time.perf_counter() - start, **stats})
        elif command == "memory":
            reply(memory(cuda_peak_mib))
        elif command == "reset_peak":
            reset_peak(cuda_reset)
            reply({"ok": True})
        elif command == "quit":
            return
