"""normopt: fold BatchNormalization and fuse decomposed normalizations in ONNX models, then prove
the result equivalent with onnxruntime.

    import onnx, normopt
    result = normopt.optimize(onnx.load("net.onnx"))   # rewrite + verify (+ roll back)
    result.verified, result.pipeline.applied, result.verification.outputs
    normopt.compare("a.onnx", "b.onnx").passed              # any two models with one interface
"""
__version__ = "0.1.0"

from normopt.fold import FoldOptions, FoldResult, optimize  # noqa: E402
from normopt.records import PassRecord, PipelineResult, Rewrite, Skip  # noqa: E402
from normopt.verify import VerifyReport, compare  # noqa: E402

__all__ = ["optimize", "compare", "FoldOptions", "FoldResult", "PassRecord", "PipelineResult", "Rewrite", "Skip",
           "VerifyReport", "__version__"]
