"""The ``normopt`` command (``python -m normopt`` and the installed script)."""
import os


def main() -> None:
    """Configure the process, then run the command line (``normopt.cli.entry``).

    The command does no matrix products: OpenBLAS, loaded with numpy, would otherwise start one
    thread per core that spins at start-up, taking a core from the run and from its forked
    shape-inference child. A value the caller set is kept. ``import normopt`` loads no numpy, so
    this is still in time; a library caller's process is left as it is."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from normopt.cli import entry
    entry()


if __name__ == "__main__":  # pragma: no cover
    main()
