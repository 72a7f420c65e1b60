"""The errors users see. Each carries its exit code; the CLI prints one line per error."""


class NormoptError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = 2


class ModelLoadError(NormoptError):
    """The input file cannot be read as a valid ONNX model."""


class ModelSaveError(NormoptError):
    """The output cannot be written, or the rewritten model fails the checker."""


class UsageError(NormoptError):
    """A flag or argument is wrong (unknown pass, malformed --input-shape, ...)."""


class ReportPathError(UsageError):
    """--report names a file that cannot or must not be written."""


class UnknownPassError(UsageError):
    """A pass name that is not in the registry."""


class VerificationError(NormoptError):
    """The rewritten model is not numerically equivalent to the original."""

    exit_code = 1


class ProviderUnavailableError(NormoptError):
    """The execution provider the user asked for cannot really be used."""

    exit_code = 3


class NotFoldedError(NormoptError):
    """``fold --check``: the model still has rewrites to apply."""

    exit_code = 4
