"""SIGINT and SIGTERM in the ``normopt`` command's process.

Either one stops the run as Ctrl-C does: a KeyboardInterrupt where the process is (SIGTERM's is
``Terminated``), so the same cleanup runs, and the command ends with one line and exit code 130.
``received`` tells the command that an exception raised meanwhile comes from the interrupt (a
module whose import was cut short raises ImportError, say), not from a bug. The command notes
signals from its first line (``normopt.__main__``), through its imports (``hold``), and acts on
one when they are done.
"""
import contextlib
import os
import signal
import threading

received = False
MESSAGE = "interrupted (no partial output is left)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is."""


def _handler(signum, frame):
    global received
    received = True
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _note(signum, frame):
    global received
    received = True


def hold() -> None:
    """Only note SIGINT and SIGTERM (``received``), raising nothing: for the imports, where an
    exception from a handler may reach a C++ module's initialization, which then aborts the
    process. Call from the main thread; ``install`` ends it."""
    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)


def install(sigint: bool = True) -> None:
    """Handle SIGTERM (and SIGINT) as above; call from the main thread."""
    signal.signal(signal.SIGTERM, _handler)
    if sigint:
        signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def deferred():
    """SIGINT and SIGTERM wait until the block is left, then act as they would have (a switch of
    two renames is not stopped between them). Python runs signal handlers in the main thread,
    whichever thread the OS hands a signal to (onnxruntime's, say: a blocked mask there would
    not hold it), so the handlers are swapped there for one that only notes the signal;
    elsewhere nothing waits."""
    caught: list[int] = []
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
            except (OSError, ValueError):
                pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            handler = old.get(caught[0])
            if callable(handler):
                handler(caught[0], None)   # Python's own (KeyboardInterrupt), ours, or a caller's
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])
