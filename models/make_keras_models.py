#!/usr/bin/env python
"""Regenerate the Keras exports in this folder (tf2onnx).

Usage:
    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime    # a separate environment is fine
    python models/make_keras_models.py [NAME.onnx ...]                 # all of them by default

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
    """Non-trivial gamma and beta (and BatchNormalization's moving statistics), so that a wrong
    fusion shows up numerically."""
    rng = np.random.default_rng(0)
    for weight in layer.weights:
        if "gamma" in weight.path or "moving_variance" in weight.path:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(np.float32))
        elif "beta" in weight.path or "moving_mean" in weight.path:
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


def group_norm_image_block():
    """NHWC Conv2D -> GroupNormalization(4 groups of 4) -> swish -> Conv2D -> GroupNormalization(8
    groups of 1 channel: an instance norm)."""
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(16, 3, padding="same"), tf.keras.layers.GroupNormalization(groups=4),
        tf.keras.layers.Activation("swish"),
        tf.keras.layers.Conv2D(8, 3, padding="same"), tf.keras.layers.GroupNormalization(groups=8, epsilon=1e-5),
    ]), [None, 8, 8, 16]


def group_norm_sequence_block():
    """Conv1D -> GroupNormalization(4 groups) -> Conv1D on [N, 12, 6] (NWC)."""
    return tf.keras.Sequential([
        tf.keras.layers.Conv1D(16, 3, padding="same"), tf.keras.layers.GroupNormalization(groups=4),
        tf.keras.layers.Conv1D(8, 3, padding="same"),
    ]), [None, 12, 6]


def batch_norm_image_block():
    """NHWC DepthwiseConv2D -> BatchNormalization -> Conv2DTranspose -> BatchNormalization ->
    Conv2D -> ReLU -> BatchNormalization (after the ReLU: nothing to fold into)."""
    return tf.keras.Sequential([
        tf.keras.layers.DepthwiseConv2D(3, padding="same"), tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same"), tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Conv2D(8, 3, padding="same"), tf.keras.layers.ReLU(), tf.keras.layers.BatchNormalization(),
    ]), [None, 8, 8, 6]


def batch_norm_sequence_block():
    """Conv1D -> BatchNormalization -> Dense -> BatchNormalization -> Dense(relu) ->
    BatchNormalization on [N, 10, 6] (Dense on rank 3: tf2onnx's Tensordot reshapes)."""
    return tf.keras.Sequential([
        tf.keras.layers.Conv1D(12, 3, padding="same"), tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(16), tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(8, activation="relu"), tf.keras.layers.BatchNormalization(),
    ]), [None, 10, 6]


NORMALIZATIONS = (tf.keras.layers.LayerNormalization, tf.keras.layers.GroupNormalization,
                  tf.keras.layers.BatchNormalization)

MODELS = [
    # tf2onnx's optimizer writes the moments' means over the last axis of a rank-3 tensor as
    # GlobalAveragePool (opset < 18, where ReduceMean's axes are an attribute).
    ("keras_ln_tf2onnx_op13.onnx", sequence_block, 13),
    ("keras_ln_nhwc_tf2onnx_op18.onnx", image_block, 18),
    ("keras_gn_nhwc_tf2onnx_op18.onnx", group_norm_image_block, 18),
    ("keras_gn_conv1d_tf2onnx_op13.onnx", group_norm_sequence_block, 13),
    # Batch norm in inference: gamma * rsqrt(var + eps) and beta - mean * that are folded to
    # constants at export; a Conv2D's is folded into it by tf2onnx itself, the others stay x * a + b.
    ("keras_bn_tf2onnx_op13.onnx", batch_norm_image_block, 13),
    ("keras_bn_seq_tf2onnx_op13.onnx", batch_norm_sequence_block, 13),
]


def make(name, build, opset) -> None:
    tf.keras.backend.clear_session()   # layer and node names restart: the same file on every run
    tf.keras.utils.set_random_seed(0)
    model, shape = build()
    model.build([1] + shape[1:])
    for layer in model.layers:
        if isinstance(layer, NORMALIZATIONS):
            randomize(layer)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_version = tf2onnx.__version__
    onnx.checker.check_model(proto, full_check=True)
    path = os.path.join(HERE, name)
    onnx.save(proto, path)
    x = np.random.default_rng(1).standard_normal([2] + shape[1:]).astype(np.float32)
    ref = model(x, training=False).numpy()
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = float(np.max(np.abs(ref - got)) / max(1e-6, float(np.max(np.abs(ref)))))
    assert err < 1e-4, (name, err)
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"{name:36s} opset {opset}  rel err {err:.1e}  ops {', '.join(ops)}")


def main(names: list[str]) -> int:
    unknown = set(names) - {name for name, _, _ in MODELS}
    if unknown:
        print(f"unknown model(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for name, build, opset in MODELS:
        if not names or name in names:
            make(name, build, opset)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
