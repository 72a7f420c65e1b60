"""normopt: fold BatchNormalization and fuse decomposed normalizations in ONNX models, then prove
the result equivalent with onnxruntime.

    import normopt
    result = normopt.optimize("net.onnx")           # or a ModelProto: rewrite + verify (+ roll back)
    result.verified, result.model, result.records, result.verification
    normopt.verify("a.onnx", "b.onnx").passed        # any two models with one interface
    normopt.inspect("net.onnx").sites                # every normalization site, and why not

``normopt.verify`` is the module ``normopt/verify.py`` made callable: ``normopt.verify(a, b)``
calls ``normopt.api.verify``, and ``from normopt.verify import compare`` keeps working.
"""
__version__ = "0.1.0"

from normopt.fold import FoldOptions, FoldResult  # noqa: E402
from normopt.records import PassRecord, PipelineResult, Rewrite, Skip  # noqa: E402
from normopt.sites import Inspection, Site  # noqa: E402
from normopt.verify import OutputDiff, VerifyReport, compare  # noqa: E402
import types as _types  # noqa: E402

from normopt import api as _api, verify as _verify_module  # noqa: E402
from normopt.api import Result, inspect, optimize  # noqa: E402


class _CallableModule(_types.ModuleType):
    def __call__(self, reference, candidate, **kwargs) -> VerifyReport:
        return _api.verify(reference, candidate, **kwargs)


_verify_module.__class__ = _CallableModule
verify = _verify_module

__all__ = ["optimize", "verify", "inspect", "compare", "Result", "FoldOptions", "FoldResult", "Inspection", "Site",
           "PassRecord", "PipelineResult", "Rewrite", "Skip", "VerifyReport", "OutputDiff", "__version__"]
