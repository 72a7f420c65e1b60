"""The ``normopt`` command (``python -m normopt`` and the installed script)."""
import os


def main() -> None:
    """Configure the process, then run the command line (``normopt.cli.entry``).

    The command does no matrix products: OpenBLAS, loaded with numpy, would otherwise start one
    thread per core that spins at start-up, taking a core from the run and from its forked
    shape-inference child. A value the caller set is kept. ``import normopt`` loads no numpy, so
    this is still in time; a library caller's process is left as it is.

    SIGINT and SIGTERM are handled from here on (``normopt.signals``): a run stopped even during
    its imports ends with one line and exit code 130."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from normopt import signals

    signals.hold()
    from normopt.cli import entry

    if signals.received:   # during the imports: the run had not started
        os.write(2, f"error: {signals.MESSAGE}\n".encode())
        os._exit(130)
    signals.install()
    entry()


if __name__ == "__main__":  # pragma: no cover
    main()
