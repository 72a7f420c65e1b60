"""normopt: fold BatchNormalization and fuse decomposed normalizations in ONNX models, then prove
the result equivalent with onnxruntime.

    import normopt
    result = normopt.optimize("net.onnx")           # or a ModelProto: rewrite + verify (+ roll back)
    result.verified, result.model, result.records, result.verification
    normopt.verify("a.onnx", "b.onnx").passed        # any two models with one interface
    normopt.inspect("net.onnx").sites                # every normalization site, and why not

``normopt.verify`` is the module ``normopt/verify.py`` made callable: ``normopt.verify(a, b)``
calls ``normopt.api.verify``, and ``from normopt.verify import compare`` keeps working.

The names are imported on first use: ``import normopt`` alone loads neither numpy nor onnx, so
the ``normopt`` command can configure the process before they are loaded (``normopt.__main__``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "optimize": "normopt.api", "inspect": "normopt.api", "Result": "normopt.api",
    "FoldOptions": "normopt.fold", "FoldResult": "normopt.fold",
    "Inspection": "normopt.sites", "Site": "normopt.sites",
    "PassRecord": "normopt.records", "PipelineResult": "normopt.records", "Rewrite": "normopt.records",
    "Skip": "normopt.records",
    "VerifyReport": "normopt.verify", "OutputDiff": "normopt.verify", "compare": "normopt.verify",
}

__all__ = ["optimize", "verify", "inspect", "compare", "Result", "FoldOptions", "FoldResult", "Inspection", "Site",
           "PassRecord", "PipelineResult", "Rewrite", "Skip", "VerifyReport", "OutputDiff", "__version__"]


def __getattr__(name: str):
    if name == "verify":   # the callable module (normopt/verify.py makes itself callable)
        return importlib.import_module("normopt.verify")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'normopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from normopt import verify
    from normopt.api import Result, inspect, optimize
    from normopt.fold import FoldOptions, FoldResult
    from normopt.records import PassRecord, PipelineResult, Rewrite, Skip
    from normopt.sites import Inspection, Site
    from normopt.verify import OutputDiff, VerifyReport, compare
