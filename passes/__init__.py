"""The passes, imported in the order they run (the registry keeps this order)."""
from normopt.passes import fold_batchnorm  # noqa: F401
