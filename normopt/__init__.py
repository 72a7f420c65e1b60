"""normopt: fold BatchNormalization and fuse decomposed normalizations in ONNX models, then prove
the result equivalent with onnxruntime."""
__version__ = "0.1.0"
