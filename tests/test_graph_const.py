"""tensors.const_value with shape facts: the integer shape arithmetic of ONNX function bodies."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from helpers import GraphBuilder, make_model
from normopt import pipeline


def _context(net, x_shape, out):
    net.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = make_model(net.nodes, [("x", 1, x_shape)], [("y", 7, ["n"])], net.inits, opset=18)
    graph = gs.import_onnx(model)
    ctx = pipeline.Context(graph=graph, root=graph, opset=18, names=None, shapes=pipeline.infer_shapes(model))
    return ctx, graph.tensors()


def _value(build, x_shape=("b", 5, 8)):
    net = GraphBuilder(opset=18)
    out = net.op("Reshape", build(net, net.op("Shape", "x")), net.const([-1], "int"))
    ctx, tensors = _context(net, list(x_shape), out)
    value = ctx.const(tensors[out])
    assert ctx.const(tensors[out]) is value  # evaluated once per context
    return value


@pytest.mark.parametrize("build, expected", [
    (lambda n, s: n.op("Size", s), 3),
    (lambda n, s: n.op("Range", n.op("Add", n.op("Size", s), n.const(-2, "int")), n.op("Size", s), n.const(1, "int")),
     [1, 2]),
    (lambda n, s: n.op("Gather", s, n.const([2, 1], "int"), axis=0), [8, 5]),
    (lambda n, s: n.op("Gather", s, n.const(-1, "int"), axis=0), 8),
    (lambda n, s: n.op("Slice", s, n.const([1], "int"), n.const([9223372036854775807], "int")), [5, 8]),
    (lambda n, s: n.op("Slice", s, n.const([-1], "int"), n.const([-3], "int"), n.const([0], "int"),
                       n.const([-1], "int")), [8, 5]),
    # a negative step clamps start into [0, n-1]: -3 of 2 elements is the first, not the last
    (lambda n, s: n.op("Slice", n.const([2, 1], "int"), n.const([-3], "int"), n.const([-100], "int"),
                       n.const([0], "int"), n.const([-1], "int")), [2]),
    (lambda n, s: n.op("Concat", n.op("ConstantOfShape", n.op("Neg", n.const([-2], "int")),
                                      value=helper.make_tensor("v", 7, [1], [1])), n.const([4], "int"), axis=0),
     [1, 1, 4]),
    (lambda n, s: n.op("Div", n.const([-7, 7], "int"), n.const([2, 2], "int")), [-3, 3]),
    (lambda n, s: n.op("Squeeze", n.op("Slice", s, n.const([2], "int"), n.const([3], "int")), n.const([0], "int")), 8),
])
def test_shape_arithmetic_is_evaluated(build, expected):
    value = _value(build)
    assert value is not None and np.array_equal(value.reshape(-1), np.asarray(expected, np.int64).reshape(-1))


@pytest.mark.parametrize("build", [
    lambda n, s: s,                                                 # the symbolic batch dim
    lambda n, s: n.op("Gather", s, n.const(0, "int"), axis=0),
    lambda n, s: n.op("Slice", s, n.const([0], "int"), n.const([2], "int")),
    lambda n, s: n.op("Div", n.const([1], "int"), n.const([0], "int")),
    # a negative step ending past the axis: empty by the spec, to the start in onnxruntime
    lambda n, s: n.op("Slice", n.const([2, 1], "int"), n.const([1], "int"), n.const([9223372036854775807], "int"),
                      n.const([0], "int"), n.const([-1], "int")),
])
def test_what_depends_on_a_symbolic_dim_is_not_a_constant(build):
    assert _value(build) is None


def test_a_dim_inference_knows_is_dynamic_is_not_folded_from_a_declaration():
    """x is [b, 5, 8]; an export declared t = Identity(x) as [2, 5, 8] (its example's batch):
    Shape(t) is not a constant, Shape(t)[1:] is."""
    net = GraphBuilder(opset=18)
    t = net.op("Identity", "x")
    whole = net.op("Shape", t)
    tail = net.op("Shape", t, start=1)
    out = net.op("Concat", whole, tail, axis=0)
    net.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = make_model(net.nodes, [("x", 1, ["b", 5, 8])], [("y", 7, ["n"])], net.inits, opset=18)
    model.graph.value_info.append(helper.make_tensor_value_info(t, 1, [2, 5, 8]))
    graph = gs.import_onnx(model)
    ctx = pipeline.Context(graph=graph, root=graph, opset=18, names=None, shapes=pipeline.infer_shapes(model))
    tensors = graph.tensors()
    assert ctx.shape(tensors[t]) == ("b", 5, 8) and ctx.checked_shape(tensors[t]) == ("b", 5, 8)
    assert ctx.const(tensors[whole]) is None
    assert ctx.const(tensors[tail]).tolist() == [5, 8]


def test_detach_is_graphsurgeons_clear_by_identity():
    """``ir.detach`` leaves every list as graphsurgeon's clear() of both sides would, including
    a node that reads one tensor twice and a tensor whose other consumers come first."""
    import onnx_graphsurgeon as gs

    from normopt import ir

    def build():
        x, y, z = gs.Variable("x"), gs.Variable("y"), gs.Variable("z")
        first = gs.Node("Relu", "first", inputs=[x], outputs=[gs.Variable("r")])
        square = gs.Node("Mul", "square", inputs=[x, x], outputs=[y])
        last = gs.Node("Neg", "last", inputs=[y], outputs=[z])
        return x, y, first, square, last

    def lists(x, y, first, square, last):
        return ([n.name for n in x.outputs], [n.name for n in y.inputs], [n.name for n in y.outputs],
                len(square.inputs), len(square.outputs))

    expected = build()
    expected[3].outputs.clear()
    expected[3].inputs.clear()
    got = build()
    ir.detach(got[3])
    assert lists(*got) == lists(*expected) == (["first"], [], ["last"], 0, 0)
    got = build()
    ir.detach(got[3], ("inputs",))
    assert [n.name for n in got[0].outputs] == ["first"] and [n.name for n in got[1].inputs] == ["square"]


def test_imported_and_new_constants_keep_graphsurgeons_constant_api(rng):
    """Imported initializers and new constants (a held folded weight among them) still support
    graphsurgeon's to_variable() and copy(), and read their data location from the proto."""
    from onnx import TensorProto, helper, numpy_helper

    from normopt import ir

    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    graph = ir.import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), ir.Weights())
    imported = graph.nodes[0].inputs[1]
    assert imported.data_location is None and imported.shape == (64, 64, 3, 3)
    held = ir.new_constant("h", w * 2)
    copied = ir._export_tensor(held.copy(), ir.Weights(), header_ok=False)
    np.testing.assert_array_equal(numpy_helper.to_array(copied), w * 2)
    for c in (imported, held):
        c.to_variable()
        assert c.__class__.__name__ == "Variable" and c.dtype == np.float32
