"""normopt.tensors: the facts a pass asks about a tensor (see test_graph_const.py for the shape
arithmetic of ``const``)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from helpers import GraphBuilder, make_model
from normopt import pipeline
from normopt.tensors import DimOf, static_dim

FLOAT, INT64 = 1, 7
X_SHAPE = ["n", 8, 6]


def _context(net, outputs, x_shape=X_SHAPE, value_info=()):
    model = make_model(net.nodes, [("x", FLOAT, x_shape)], outputs, net.inits, opset=18)
    model.graph.value_info.extend(helper.make_tensor_value_info(*vi) for vi in value_info)
    graph = gs.import_onnx(model)
    ctx = pipeline.Context(graph=graph, root=graph, opset=18, names=None, shapes=pipeline.infer_shapes(model))
    return ctx, graph.tensors()


def _grouped(groups_shape):
    """x [n, 8, 6] -> Reshape(x, ``groups_shape``(net, Shape(x))) -> Reshape back to Shape(x)."""
    net = GraphBuilder(opset=18)
    shape = net.op("Shape", "x")
    grouped = net.op("Reshape", "x", groups_shape(net, shape))
    back = net.op("Reshape", grouped, shape)
    ctx, tensors = _context(net, [(back, FLOAT, X_SHAPE)])
    split = tensors[grouped].inputs[0]
    return ctx, tensors, split, tensors[back].inputs[0]


def test_shape_terms_keep_which_dim_a_run_time_size_comes_from():
    ctx, tensors, split, back = _grouped(lambda n, s: n.op(
        "Concat", n.op("Slice", s, n.const([0], "int"), n.const([1], "int")), n.const([2, -1], "int"), axis=0))
    x = tensors["x"]
    terms = ctx.shape_terms(split.inputs[1])
    assert len(terms) == 3 and terms[1:] == [2, -1]
    assert isinstance(terms[0], DimOf) and terms[0].tensor is x and terms[0].axis == 0
    assert ctx.same_dim(terms[0], x, 0) and not ctx.same_dim(terms[0], x, 1)
    assert ctx.resolve(terms[0]) == "n"   # the symbolic name inference knows
    grouped = ctx.reshape_dims(split, [DimOf(x, i) for i in range(3)])
    assert ctx.restores(ctx.reshape_dims(back, grouped), x)
    assert not ctx.restores(grouped, x)


def test_shape_terms_see_through_integer_casts_only():
    """tf2onnx computes shapes in int32: Cast to int32 and back keeps which dim a size is; a
    round trip through float is no shape arithmetic."""
    def through(to):
        return lambda n, s: n.op("Concat", n.op("Slice", n.op("Cast", n.op("Cast", s, to=to), to=INT64),
                                                n.const([0], "int"), n.const([1], "int")),
                                 n.const([2, -1], "int"), axis=0)
    ctx, tensors, split, _back = _grouped(through(6))   # int32
    terms = ctx.shape_terms(split.inputs[1])
    assert len(terms) == 3 and terms[1:] == [2, -1] and ctx.same_dim(terms[0], tensors["x"], 0)
    ctx, tensors, split, _back = _grouped(through(FLOAT))
    assert ctx.shape_terms(split.inputs[1]) is None


def test_reshape_zero_entries_copy_the_input_dim():
    ctx, tensors, split, _back = _grouped(lambda n, s: n.const([0, 4, -1], "int"))
    x = tensors["x"]
    dims = ctx.reshape_dims(split, [DimOf(x, i) for i in range(3)])
    assert dims[0].tensor is x and dims[0].axis == 0 and dims[1:] == [4, -1]
    assert ctx.restores([DimOf(x, 0), 8, -1], x) and not ctx.restores([DimOf(x, 0), 4, -1], x)


def test_dims_value_names_run_time_sizes():
    net = GraphBuilder(opset=18)
    dims = net.op("Concat", net.op("Shape", "x", end=1), net.const([48], "int"), axis=0)
    out = net.op("Reshape", "x", dims)
    ctx, tensors = _context(net, [(out, FLOAT, ["n", 48])])
    assert ctx.dims_value(tensors[dims]) == ["n", 48]
    assert ctx.symbolic_shape(tensors["x"]) == ["n", 8, 6]
    assert ctx.const(tensors[dims]) is None   # a run-time size: no value


def test_const_from_shapes_or_from_constants_alone():
    net = GraphBuilder(opset=18)
    width = net.op("Gather", net.op("Shape", "x"), net.const(2, "int"), axis=0)
    ctx, tensors = _context(net, [(width, INT64, [])])
    assert ctx.const(tensors[width]) == 6
    assert ctx.const(tensors[width], from_shapes=False) is None


def test_checked_shape_refuses_a_declaration_inference_contradicts():
    net = GraphBuilder(opset=18)
    y = net.op("Reshape", "x", net.const([0, 48], "int"))
    out = net.op("Relu", y)
    ctx, tensors = _context(net, [(out, FLOAT, ["n", 48])], value_info=[(y, FLOAT, ["n", 8, 6])])
    assert ctx.shape(tensors[y]) == ("n", 48) and ctx.rank(tensors[y]) == 2
    checked = ctx.checked_shape(tensors[y])
    assert isinstance(checked, pipeline.Reject) and "contradicts the inferred" in checked.reason
    assert ctx.known_shape(tensors[y]) is None
    assert ctx.known_shape(tensors["x"]) == ("n", 8, 6)
    assert ctx.dtype(tensors[out]) == np.float32


def test_static_dim():
    assert [static_dim(("n", 8, 0), i) for i in range(4)] == [None, 8, None, None]
    assert static_dim(None, 0) is None and static_dim((True,), 0) is None


def test_constant_of_shape_of_a_constant_shape_is_a_constant_that_costs_nothing_to_ask():
    """A weight filled by ConstantOfShape is a constant with or without shape facts; asking
    for it (a pass looks at every Add's operands) makes no array of its size."""
    from onnx import numpy_helper
    net = GraphBuilder(opset=18)
    seven = numpy_helper.from_array(np.array([7.0], np.float32))
    big = net.op("ConstantOfShape", net.const([4096, 4096], "int"), value=seven)
    small = net.op("ConstantOfShape", net.const([6], "int"))  # no value: float32 zeros
    y = net.op("Add", net.op("Add", "x", small), net.op("ReduceMax", big, keepdims=0))
    ctx, tensors = _context(net, [(y, FLOAT, X_SHAPE)])
    for from_shapes in (True, False):
        value = ctx.const(tensors[big], from_shapes=from_shapes)
        assert value.shape == (4096, 4096) and value.dtype == np.float32 and value.strides == (0, 0)
        assert value[4095, 4095] == 7.0 and not value.flags.writeable
        zeros = ctx.const(tensors[small], from_shapes=from_shapes)
        assert zeros.dtype == np.float32 and zeros.tolist() == [0.0] * 6
