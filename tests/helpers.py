"""Shared test helpers: build tiny models, run one pass, count ops, check equivalence."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normopt import pipeline
from normopt.providers import select_provider
from normopt.verify import compare

IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14.


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None, extra_opsets=()):
    """inputs/outputs: (name, elem_type, shape) tuples or ValueInfoProtos; inits: {name: array}."""
    def vi(spec):
        return spec if isinstance(spec, onnx.ValueInfoProto) else helper.make_tensor_value_info(*spec)
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    graph = helper.make_graph(list(nodes), "test", [vi(i) for i in inputs], [vi(o) for o in outputs], initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    ir = ir_version or max(IR_VERSION, _min_ir(opset))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir)
    onnx.checker.check_model(model)
    return model


def _min_ir(opset):
    from normopt.model_io import min_ir_version
    return min_ir_version(opset)


def parse_model(text: str, inits=None):
    """A model from ONNX text syntax plus initializers {name: array}."""
    model = onnx.parser.parse_model(text)
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


def run_pass(name, model, **options):
    """Run one pass; return (rewritten model, its PassRecord)."""
    out, result = pipeline.run(model, [name], pipeline.Options(**options))
    onnx.checker.check_model(out)
    return out, result.passes[0]


def run_pipeline(model, names=None, **options):
    out, result = pipeline.run(model, names, pipeline.Options(**options))
    onnx.checker.check_model(out)
    return out, result


def op_counts(model, subgraphs=True) -> dict[str, int]:
    counts = Counter()

    def walk(g):
        for n in g.node:
            counts[n.op_type] += 1
            if subgraphs:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)
    walk(model.graph)
    return dict(counts)


def assert_equivalent(reference, candidate, seed=0, atol=None, rtol=None, **kwargs):
    """Both models run in onnxruntime (optimizations off) on seeded inputs; outputs must match."""
    report = compare(reference, candidate, provider="cpu", seed=seed, atol=atol, rtol=rtol, **kwargs)
    assert report.outputs, "no outputs compared"
    assert report.passed, [(o.name, o.max_abs, o.max_rel, o.problem) for o in report.failures]
    return report


def floats(rng, *shape, low=None, high=None, dtype=np.float32):
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def cuda_in_use() -> bool:
    return select_provider("auto").name == "cuda"


FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64


NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
            TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
            TensorProto.BFLOAT16: helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)}


class GraphBuilder:
    """A tiny graph under construction: fresh names, constants (initializers, or Constant nodes
    with ``constants="node"``), ReduceMean with axes as attribute (opset < 18) or input."""

    def __init__(self, opset=17, dtype=TensorProto.FLOAT, constants="initializer"):
        self.opset, self.dtype, self.constants = opset, dtype, constants
        self.nodes, self.inits, self.count = [], {}, 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value, dtype=None):
        """``dtype``: a TensorProto type (default: the builder's), "int" for int64, "raw" as given."""
        if dtype == "raw":
            value = np.asarray(value)
        elif dtype == "int":
            value = np.asarray(value, np.int64)
        else:
            value = np.asarray(value, NP_TYPES[dtype or self.dtype])
        name = self.name("c")
        if self.constants == "node":
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
        else:
            self.inits[name] = value
        return name

    def op(self, op_type, *inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out

    def mean(self, x, axes, **attrs):
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=list(axes), **attrs)
        return self.op("ReduceMean", x, self.const(list(axes), "int"), **attrs)
