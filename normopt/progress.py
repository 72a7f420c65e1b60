"""Progress on stderr for steps that take more than a moment, only when stderr is a terminal.

``step(label)`` prints nothing for a step that ends within ``DELAY`` seconds; a longer one gets
``label ...`` when the delay passes and ``done in N s`` when it ends. Off unless ``enable``
was called (the CLI does, when stderr is a TTY and -q was not given).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time

DELAY = 1.5  # seconds
_enabled = False
_lock = threading.Lock()


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def step(label: str):
    if not _enabled:
        yield
        return
    started = time.perf_counter()
    shown = threading.Event()

    def announce():
        with _lock:
            sys.stderr.write(f"{label} ...")
            sys.stderr.flush()
            shown.set()

    timer = threading.Timer(DELAY, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with _lock:
            if shown.is_set():
                sys.stderr.write(f" done in {time.perf_counter() - started:.1f} s\n")
                sys.stderr.flush()


def begin(label: str):
    """``step`` without a ``with`` block: pass the result to ``end``."""
    cm = step(label)
    cm.__enter__()
    return cm


def end(cm) -> None:
    cm.__exit__(None, None, None)
