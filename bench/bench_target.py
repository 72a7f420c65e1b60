"""Why --target onnxruntime keeps the exported GroupNorm form: CPU latency and precision of the
TorchScript form (Reshape, InstanceNormalization, Reshape, Mul, Add) against the fused
GroupNormalization-21 that --target portable emits, both built here with onnx.helper (no torch).

Both run in onnxruntime on CPU with its default optimizations (what a user deploys), alternating
runs so that machine drift hits both alike. Prints per shape the median latency of each, their
ratio, and the max error against a float64 reference on inputs whose groups have mean/std 100.

    python bench/bench_target.py [--shapes 1x64x64x64,1x320x32x32] [--runs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from normopt import pipeline

GROUPS = 32


def exported(c: int, shape: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in {
        "split": np.array([0, GROUPS, -1], np.int64), "ones": np.ones(GROUPS, np.float32),
        "zeros": np.zeros(GROUPS, np.float32), "gamma": rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32),
        "beta": rng.standard_normal((c, 1, 1)).astype(np.float32)}.items()]
    nodes = [helper.make_node("Reshape", ["x", "split"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["n"], epsilon=1e-6),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["n", "s"], ["b"]),
             helper.make_node("Mul", ["b", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["y"])]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def reference(x: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    init = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    g = x.astype(np.float64).reshape(x.shape[0], GROUPS, -1)
    n = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    return n * init["gamma"] + init["beta"]


def median_ms(session: ort.InferenceSession, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    session.run(None, {"x": x})
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x64x64x64,1x320x32x32")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    print("shape            exported ms  fused ms  fused/exported  err exported  err fused  (mean/std 100)")
    for text in args.shapes.split(","):
        shape = [int(d) for d in text.split("x")]
        model = exported(shape[1], shape)
        fused, _ = pipeline.run(model, ["fuse-groupnorm"])
        assert any(n.op_type == "GroupNormalization" for n in fused.graph.node)
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in (model, fused)]
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        for s in sessions:  # warm up
            s.run(None, {"x": x})
        times: list[list[float]] = [[], []]
        for _ in range(args.runs):
            for i, s in enumerate(sessions):
                times[i].append(median_ms(s, x))
        a, b = statistics.median(times[0]), statistics.median(times[1])
        shifted = (x + 100.0).astype(np.float32)  # every group: mean 100, std 1
        ref = reference(shifted, model)
        errs = [float(np.abs(s.run(None, {"x": shifted})[0] - ref).max()) for s in sessions]
        print(f"{text:16} {a:11.3f}  {b:8.3f}  {b / a:14.2f}  {errs[0]:12.1e}  {errs[1]:9.1e}")


if __name__ == "__main__":
    main()
