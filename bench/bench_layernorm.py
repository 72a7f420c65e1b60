"""What fuse-layernorm costs, relative to plain ONNX I/O, on a BERT-base-sized model.

Builds with onnx.helper (no torch) a post-LN BERT encoder whose LayerNorms are decomposed as
the TorchScript exporter writes them below opset 17 (ReduceMean, Sub, Pow 2, ReduceMean, Add eps,
Sqrt, Div, Mul gamma, Add beta): an embedding LayerNorm, then per layer Q/K/V/output MatMul+Add,
multi-head attention (Reshape, Transpose, MatMul, Mul, Softmax), residual, LayerNorm, an FFN with
erf GELU, residual, LayerNorm. 12 layers with hidden 768 (FFN 3072) hold about 85M float32
parameters, 25 LayerNorms and about 600 nodes, like bert-base.

For each layer count it times, in one run, ``onnx.save`` + ``onnx.load`` of the model (through
a temporary file) and ``pipeline.run(model, ["fuse-layernorm"])`` (shape inference, matching,
rewriting, cleanup and export included), and prints their ratio. The pass's own time (matching,
rewrite, cleanup) is printed per 1000 nodes: constant across 6/12/24 layers when matching is
linear in graph size. Best of --repeat runs each.

    python bench/bench_layernorm.py [--layers 6,12,24] [--hidden 768] [--opset 17] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normopt import pipeline

SEQ = 128
HEAD_DIM = 64


class Builder:
    def __init__(self, opset: int, seed: int = 0):
        self.opset, self.nodes, self.inits, self.count = opset, [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape, dtype=np.float32) * 0.02), "w")

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out

    def mean(self, x: str) -> str:
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=[-1])
        return self.op("ReduceMean", x, self.const(np.array([-1], np.int64), "axes"))

    def layernorm(self, x: str, hidden: int) -> str:
        d = self.op("Sub", x, self.mean(x))
        var = self.mean(self.op("Pow", d, self.const(np.float32(2.0))))
        std = self.op("Sqrt", self.op("Add", var, self.const(np.float32(1e-12))))
        y = self.op("Mul", self.op("Div", d, std), self.const(np.ones(hidden, np.float32), "gamma"))
        return self.op("Add", y, self.const(np.zeros(hidden, np.float32), "beta"))

    def linear(self, x: str, n_in: int, n_out: int) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(n_in, n_out)), self.const(np.zeros(n_out, np.float32)))

    def attention(self, h: str, hidden: int) -> str:
        heads = hidden // HEAD_DIM
        split = self.const(np.array([1, SEQ, heads, HEAD_DIM], np.int64))
        q, k, v = (self.op("Reshape", self.linear(h, hidden, hidden), split) for _ in range(3))
        q = self.op("Transpose", q, perm=[0, 2, 1, 3])
        k = self.op("Transpose", k, perm=[0, 2, 3, 1])
        v = self.op("Transpose", v, perm=[0, 2, 1, 3])
        scores = self.op("Mul", self.op("MatMul", q, k), self.const(np.float32(HEAD_DIM ** -0.5)))
        ctx = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        ctx = self.op("Reshape", self.op("Transpose", ctx, perm=[0, 2, 1, 3]),
                      self.const(np.array([1, SEQ, hidden], np.int64)))
        return self.linear(ctx, hidden, hidden)

    def gelu(self, x: str) -> str:
        erf = self.op("Erf", self.op("Div", x, self.const(np.float32(np.sqrt(2.0)))))
        return self.op("Mul", self.op("Mul", x, self.op("Add", erf, self.const(np.float32(1.0)))),
                       self.const(np.float32(0.5)))

    def encoder(self, layers: int, hidden: int) -> onnx.ModelProto:
        h = self.layernorm("x", hidden)
        for _ in range(layers):
            h = self.layernorm(self.op("Add", h, self.attention(h, hidden)), hidden)
            ffn = self.linear(self.gelu(self.linear(h, hidden, 4 * hidden)), 4 * hidden, hidden)
            h = self.layernorm(self.op("Add", h, ffn), hidden)
        self.nodes.append(helper.make_node("Identity", [h], ["y"]))
        graph = helper.make_graph(self.nodes, "bert", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, SEQ, hidden])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, hidden])],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(layers: int, hidden: int, opset: int, repeat: int, folder: str) -> tuple[int, float, float, float]:
    model = Builder(opset).encoder(layers, hidden)
    path = os.path.join(folder, f"bert_{layers}.onnx")
    io_s, _ = best_of(repeat, lambda: (onnx.save(model, path), onnx.load(path)))
    fold_s, (out, result) = best_of(repeat, lambda: pipeline.run(model, ["fuse-layernorm"]))
    fused = sum(1 for n in out.graph.node if n.op_type == "LayerNormalization")
    assert fused == 2 * layers + 1 and not result.passes[0].skipped, (fused, result.passes[0].skipped)
    return len(model.graph.node), io_s, fold_s, result.passes[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="6,12,24", help="comma-separated layer counts")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--opset", type=int, default=17, help="below 17 the run includes the opset upgrade")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"hidden {args.hidden}, seq {SEQ}, opset {args.opset}, best of {args.repeat}")
    print(f"{'layers':>6} {'nodes':>6} {'params':>8} {'save+load s':>12} {'fold s':>8} {'fold/io':>8} "
          f"{'pass s':>8} {'pass ms/1k nodes':>17}")
    with tempfile.TemporaryDirectory() as folder:
        for layers in (int(v) for v in args.layers.split(",")):
            nodes, io_s, fold_s, pass_s = measure(layers, args.hidden, args.opset, args.repeat, folder)
            params = layers * (4 * args.hidden ** 2 + 8 * args.hidden ** 2) / 1e6
            print(f"{layers:>6} {nodes:>6} {params:>7.0f}M {io_s:>12.3f} {fold_s:>8.3f} {fold_s / io_s:>8.2f} "
                  f"{pass_s:>8.3f} {pass_s / nodes * 1e6:>17.3f}")
    print("fold = pipeline.run(['fuse-layernorm']) (shape inference, match, rewrite, cleanup, export); "
          "io = onnx.save + onnx.load")


if __name__ == "__main__":
    main()
