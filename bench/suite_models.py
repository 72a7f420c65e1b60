"""Models for bench/run.py, generated with numpy and onnx.helper (nothing is downloaded).

- ``encoder``: a BERT-base-sized post-LN encoder (hidden 768, FFN 3072, simplified attention),
  LayerNorms decomposed as the TorchScript exporter writes them below opset 17 (ReduceMean, Sub,
  Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta); one file.
- ``cnn``: ResNet-50's topology (bottlenecks 3-4-6-3, 53 Conv+BatchNormalization pairs, fc); one file.
- ``decoder``: a LLaMA-like decoder (RMSNorm as PyTorch writes it: Pow, ReduceMean, Add eps, Sqrt,
  Reciprocal, Mul x, Mul weight; Q/K/V/O projections with a simplified attention; SiLU-gated MLP)
  whose weights go straight into one external data file, tensor by tensor, so a model of many
  gigabytes never sits in memory. Weights are slices of one random block, tiled.
- ``chain``: N blocks of Conv1d + BatchNormalization + decomposed LayerNorm with tiny weights
  and an Add of the input
  (12 nodes and 11 initializers per block), for time per node against node count.

Each returns a ``ModelInfo`` with the path written, its size on disk and the expected counts of
what normopt rewrites.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14


@dataclasses.dataclass
class ModelInfo:
    name: str
    path: str
    bytes: int  # on disk, data files included
    nodes: int
    external: bool
    inputs: dict  # name -> shape (float32 inputs)
    note: str = ""


class Pool:
    """Random float32 values: one block drawn once, handed out in slices (tiled when larger)."""

    def __init__(self, size: int = 1 << 20, seed: int = 0):
        self.block = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
        self.offset = 0

    def take(self, shape, scale: float) -> np.ndarray:
        n = int(np.prod(shape))
        start = self.offset % len(self.block)
        self.offset += 7919  # a different window for the next tensor
        reps = -(-(start + n) // len(self.block))
        values = np.tile(self.block, reps)[start:start + n] if reps > 1 else self.block[start:start + n]
        return (values * np.float32(scale)).reshape(shape)


class Graph:
    """A node list with fresh names; initializers either in the protobuf or in a data file."""

    def __init__(self, opset: int, data_file=None, data_name: str = ""):
        self.opset, self.nodes, self.inits, self.count = opset, [], [], 0
        self.data_file, self.data_name, self.data_offset = data_file, data_name, 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        value = np.asarray(value)
        if self.data_file is not None and value.nbytes >= 1024:
            self.inits.append(self._external(value, name))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def _external(self, value: np.ndarray, name: str) -> TensorProto:
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                             dims=value.shape, data_location=TensorProto.EXTERNAL)
        data = memoryview(np.ascontiguousarray(value)).cast("B")
        for key, val in (("location", self.data_name), ("offset", str(self.data_offset)),
                         ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=val)
        self.data_file.write(data)
        self.data_offset += len(data)
        return tensor

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out

    def mean(self, x: str) -> str:
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=[-1])
        return self.op("ReduceMean", x, self.const(np.array([-1], np.int64), "axes"))

    def layernorm(self, x: str, width: int, eps: float = 1e-12, gamma: float = 1.1) -> str:
        d = self.op("Sub", x, self.mean(x))
        var = self.mean(self.op("Pow", d, self.const(np.float32(2.0))))
        std = self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps))))
        y = self.op("Mul", self.op("Div", d, std), self.const(np.full(width, gamma, np.float32), "gamma"))
        return self.op("Add", y, self.const(np.full(width, 0.1, np.float32), "beta"))

    def rmsnorm(self, x: str, width: int, eps: float = 1e-6) -> str:
        var = self.mean(self.op("Pow", x, self.const(np.float32(2.0))))
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps)))))
        return self.op("Mul", self.const(np.full(width, 0.9, np.float32), "weight"), self.op("Mul", x, inv))

    def batchnorm(self, x: str, c: int, rng: np.random.Generator) -> str:
        params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)]
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        return self.op("BatchNormalization", x, *names, epsilon=1e-5)

    def model(self, inputs: dict, output: str, out_shape, graph_name: str) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["y"], name=self.name("Identity")))
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=IR_VERSION)


def _save(model: onnx.ModelProto, path: str, name: str, inputs: dict, note: str) -> ModelInfo:
    onnx.save(model, path)
    return ModelInfo(name, path, os.path.getsize(path), len(model.graph.node), False, inputs, note)


def encoder(path: str, layers: int = 10, hidden: int = 768, seq: int = 128, opset: int = 14) -> ModelInfo:
    """Post-LN encoder: 2 * layers + 1 decomposed LayerNorms (MatMul+Add projections, FFN with erf GELU)."""
    g, pool = Graph(opset), Pool()
    head = 64

    def linear(x, n_in, n_out):
        y = g.op("MatMul", x, g.const(pool.take((n_in, n_out), 0.02), "w"))
        return g.op("Add", y, g.const(np.zeros(n_out, np.float32), "b"))

    h = g.layernorm("x", hidden)
    for _ in range(layers):
        split = g.const(np.array([1, seq, hidden // head, head], np.int64))
        q, k, v = (g.op("Transpose", g.op("Reshape", linear(h, hidden, hidden), split), perm=perm)
                   for perm in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
        scores = g.op("Mul", g.op("MatMul", q, k), g.const(np.float32(head ** -0.5)))
        ctx = g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, g.const(np.array([1, seq, hidden], np.int64)))
        h = g.layernorm(g.op("Add", h, linear(ctx, hidden, hidden)), hidden)
        up = linear(h, hidden, 4 * hidden)
        erf = g.op("Erf", g.op("Div", up, g.const(np.float32(np.sqrt(2.0)))))
        gelu = g.op("Mul", g.op("Mul", up, g.op("Add", erf, g.const(np.float32(1.0)))), g.const(np.float32(0.5)))
        h = g.layernorm(g.op("Add", h, linear(gelu, 4 * hidden, hidden)), hidden)
    inputs = {"x": [1, seq, hidden]}
    model = g.model(inputs, h, [1, seq, hidden], "encoder")
    return _save(model, path, "encoder", inputs, f"{layers} layers, hidden {hidden}, opset {opset}, "
                 f"{2 * layers + 1} decomposed LayerNorms")


def cnn(path: str, blocks=(3, 4, 6, 3), width: int = 64, size: int = 224, opset: int = 13) -> ModelInfo:
    """ResNet-50's layout: every Conv followed by an eval-mode BatchNormalization."""
    g, pool, rng = Graph(opset), Pool(seed=1), np.random.default_rng(1)

    def conv_bn(x, c_in, c_out, k, stride=1, relu=True):
        w = g.const(pool.take((c_out, c_in, k, k), np.sqrt(2.0 / (c_in * k * k))), "w")
        y = g.op("Conv", x, w, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        y = g.batchnorm(y, c_out, rng)
        return g.op("Relu", y) if relu else y

    h = conv_bn("x", 3, width, 7, stride=2)
    h = g.op("MaxPool", h, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = width
    for stage, count in enumerate(blocks):
        mid = width * 2 ** stage
        for i in range(count):
            stride = 2 if i == 0 and stage > 0 else 1
            y = conv_bn(conv_bn(conv_bn(h, c_in, mid, 1), mid, mid, 3, stride), mid, 4 * mid, 1, relu=False)
            skip = conv_bn(h, c_in, 4 * mid, 1, stride, relu=False) if i == 0 else h
            h, c_in = g.op("Relu", g.op("Add", y, skip)), 4 * mid
    h = g.op("Flatten", g.op("GlobalAveragePool", h))
    h = g.op("Gemm", h, g.const(pool.take((c_in, 1000), 0.02), "fc"), g.const(np.zeros(1000, np.float32)))
    inputs = {"x": [1, 3, size, size]}
    model = g.model(inputs, h, [1, 1000], "cnn")
    bns = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    return _save(model, path, "cnn", inputs, f"{bns} Conv+BatchNormalization, input {size}x{size}, opset {opset}")


def decoder(path: str, layers: int = 5, hidden: int = 2048, ffn: int = 5504, seq: int = 8,
            opset: int = 17) -> ModelInfo:
    """LLaMA-like decoder, weights in ``<path>.data`` (written as they are generated)."""
    data_name = os.path.basename(path) + ".data"
    pool = Pool(size=1 << 22, seed=2)
    with open(os.path.join(os.path.dirname(path), data_name), "wb") as data:
        g = Graph(opset, data, data_name)
        h = "x"
        heads, head = hidden // 128, 128
        for _ in range(layers):
            n = g.rmsnorm(h, hidden)
            split = g.const(np.array([1, seq, heads, head], np.int64))
            q, k, v = (g.op("Transpose", g.op("Reshape", g.op("MatMul", n, g.const(pool.take((hidden, hidden), 0.02),
                                                                                     "w")), split), perm=perm)
                       for perm in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
            scores = g.op("Mul", g.op("MatMul", q, k), g.const(np.float32(head ** -0.5)))
            ctx = g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
            ctx = g.op("Reshape", ctx, g.const(np.array([1, seq, hidden], np.int64)))
            h = g.op("Add", h, g.op("MatMul", ctx, g.const(pool.take((hidden, hidden), 0.02), "w")))
            n = g.rmsnorm(h, hidden)
            gate = g.op("MatMul", n, g.const(pool.take((hidden, ffn), 0.02), "w"))
            up = g.op("MatMul", n, g.const(pool.take((hidden, ffn), 0.02), "w"))
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
            h = g.op("Add", h, g.op("MatMul", act, g.const(pool.take((ffn, hidden), 0.02), "w")))
        h = g.rmsnorm(h, hidden)
    inputs = {"x": [1, seq, hidden]}
    model = g.model(inputs, h, [1, seq, hidden], "decoder")
    onnx.save(model, path)
    size = os.path.getsize(path) + g.data_offset
    return ModelInfo("decoder", path, size, len(model.graph.node), True, inputs,
                     f"{layers} layers, hidden {hidden}, FFN {ffn}, opset {opset}, {2 * layers + 1} decomposed "
                     f"RMSNorms, weights in one external data file")


def chain(path: str, blocks: int, channels: int = 4, length: int = 8, opset: int = 14) -> ModelInfo:
    """``blocks`` x (Conv1d k=1, BatchNormalization, decomposed LayerNorm over the last axis, Add of the
    input): 12 nodes per block. The LayerNorm's gamma of 0.5 and the Add of the graph input keep each
    block contracting, so rounding differences do not grow along thousands of blocks."""
    g, rng = Graph(opset), np.random.default_rng(3)
    h = "x"
    for _ in range(blocks):
        w = g.const(rng.normal(0, 0.5, (channels, channels, 1)).astype(np.float32), "w")
        h = g.op("Conv", h, w, g.const(rng.normal(0, 0.1, channels).astype(np.float32), "b"), kernel_shape=[1])
        h = g.op("Add", "x", g.layernorm(g.batchnorm(h, channels, rng), length, eps=1e-5, gamma=0.5))
    inputs = {"x": [1, channels, length]}
    model = g.model(inputs, h, [1, channels, length], f"chain{blocks}")
    return _save(model, path, f"chain-{blocks}", inputs, f"{blocks} Conv+BN+LayerNorm+Add blocks, opset {opset}")
