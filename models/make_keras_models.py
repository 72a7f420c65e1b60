#!/usr/bin/env python
"""Regenerate the Keras exports in this folder (tf2onnx).

Usage:
    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime    # a separate environment is fine
    python models/make_keras_models.py

Each model is built under a fixed seed with random gamma/beta, converted with
``tf2onnx.convert.from_function``, saved with ir_version <= 10, checked, run in onnxruntime
and compared with TensorFlow's output. Unlike the PyTorch exports, a rerun is not byte-identical
(tf2onnx orders some nodes and initializers differently from run to run); the graphs are the same.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_IR_VERSION = 10


def randomize(layer) -> None:
    """Non-trivial gamma and beta, so that a wrong fusion shows up numerically."""
    rng = np.random.default_rng(0)
    for weight in layer.weights:
        if "gamma" in weight.path:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(np.float32))
        elif "beta" in weight.path:
            weight.assign((rng.standard_normal(weight.shape) * 0.2).astype(np.float32))


def sequence_block():
    """Dense -> LayerNormalization -> Dense -> LayerNormalization(eps=1e-6) on [N, 16, 32]."""
    return tf.keras.Sequential([
        tf.keras.layers.Dense(32), tf.keras.layers.LayerNormalization(epsilon=1e-3),
        tf.keras.layers.Dense(32), tf.keras.layers.LayerNormalization(epsilon=1e-6),
    ]), [None, 16, 32]


def image_block():
    """NHWC Conv2D -> LayerNormalization over channels -> Conv2D -> LayerNormalization over (H, W, C)."""
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(16, 3, padding="same"), tf.keras.layers.LayerNormalization(axis=-1),
        tf.keras.layers.Conv2D(16, 3, padding="same"), tf.keras.layers.LayerNormalization(axis=[1, 2, 3]),
    ]), [None, 8, 8, 16]


MODELS = [
    # tf2onnx's optimizer writes the moments' means over the last axis of a rank-3 tensor as
    # GlobalAveragePool (opset < 18, where ReduceMean's axes are an attribute).
    ("keras_ln_tf2onnx_op13.onnx", sequence_block, 13),
    ("keras_ln_nhwc_tf2onnx_op18.onnx", image_block, 18),
]


def make(name, build, opset) -> None:
    tf.keras.backend.clear_session()   # layer and node names restart: the same file on every run
    tf.keras.utils.set_random_seed(0)
    model, shape = build()
    model.build([1] + shape[1:])
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.LayerNormalization):
            randomize(layer)
    fn = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_version = tf2onnx.__version__
    onnx.checker.check_model(proto, full_check=True)
    path = os.path.join(HERE, name)
    onnx.save(proto, path)
    x = np.random.default_rng(1).standard_normal([2] + shape[1:]).astype(np.float32)
    ref = model(x).numpy()
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = float(np.max(np.abs(ref - got)) / max(1e-6, float(np.max(np.abs(ref)))))
    assert err < 1e-4, (name, err)
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"{name:36s} opset {opset}  rel err {err:.1e}  ops {', '.join(ops)}")


def main() -> int:
    for name, build, opset in MODELS:
        make(name, build, opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
