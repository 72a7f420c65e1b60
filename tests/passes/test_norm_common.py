"""The shared normalization helpers on their own: axes, parameter broadcasting, constant folding."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from normopt import graph as G, tensors as T
from normopt.passes import _norm as N
from normopt.pipeline import Context


def _ctx(graph, opset=18):
    return Context(graph=graph, root=graph, opset=opset, names=G.NameScope(graph))


def _reduce(attrs=None, axes_input=None):
    x = gs.Variable("x", np.float32, [2, 3, 4])
    inputs = [x] if axes_input is None else [x, axes_input]
    node = gs.Node("ReduceMean", "rm", dict(attrs or {}), inputs, [gs.Variable("m", np.float32)])
    return node, gs.Graph(nodes=[node], inputs=[x] + ([axes_input] if isinstance(axes_input, gs.Variable) else []))


@pytest.mark.parametrize("attrs, axes_input, expected", [
    ({"axes": [-1]}, None, (-1,)),                                            # opset < 18: attribute
    ({}, gs.Constant("axes", np.array([1, 2], np.int64)), (1, 2)),           # opset >= 18: input
    ({}, gs.Variable("axes", np.int64, [1]), None),                           # computed at run time
    ({}, None, None),                                                         # reduce all: not a normalization
    ({"noop_with_empty_axes": 1}, None, None),                                # a no-op
])
def test_norm_reduce_axes_reads_attribute_or_constant_input(attrs, axes_input, expected):
    node, graph = _reduce(attrs, axes_input)
    assert N.reduce_axes(node, _ctx(graph)) == expected


@pytest.mark.parametrize("axes, rank, expected", [
    ((-1,), 3, (2,)), ((2,), 3, (2,)), ((-1, -2), 4, (2, 3)), ((1,), 4, (1,)),
    ((3,), 3, None), ((-4,), 3, None), ((1, -2), 3, None),                   # out of range, repeated
    ((-2, -1), None, (-2, -1)), ((2,), None, None),                           # rank unknown
])
def test_norm_normalize_axes_places_axes_or_says_none(axes, rank, expected):
    assert N.normalize_axes(axes, rank) == expected


@pytest.mark.parametrize("axes, rank, expected", [
    ((2,), 3, -1), ((1, 2), 3, -2), ((0, 1, 2), 3, -3), ((1,), 4, None), ((1, 3), 4, None),
    ((-2, -1), None, -2), ((-3, -1), None, None), ((), 3, None),
])
def test_norm_trailing_axis_only_for_the_last_axes(axes, rank, expected):
    assert N.trailing_axis(axes, rank) == expected


@pytest.mark.parametrize("shape, ok", [
    ((8,), True), ((1, 1, 8), True), ((1, 8), True), ((), True), ((1,), True), ((5, 8), True),
    ((2, 1, 8), False),                     # varies over the batch axis
    ((1, 1, 1, 8), False),                  # would raise the output's rank
    ((4,), False),                          # does not broadcast to D = 8
])
def test_norm_broadcast_param_only_per_normalized_element(shape, ok):
    rng = np.random.default_rng(0)
    value = rng.standard_normal(shape).astype(np.float32)
    norm_shape = (5, 8) if shape == (5, 8) else (8,)
    got = N.broadcast_param(value, 3, norm_shape)
    if not ok:
        assert isinstance(got, str)
        return
    assert got.shape == norm_shape
    # Multiplying by the parameter and by its broadcast form give the same result.
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_array_equal(x * value, x * got)


def test_norm_broadcast_param_positional_tensor_is_refused():
    assert "varies over non-normalized axes" in N.broadcast_param(np.ones((5, 8), np.float32), 3, (8,))


def test_norm_const_value_folds_flatten_add_unsqueeze_cast():
    w = gs.Constant("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    one = gs.Constant("one", np.array(1.0, np.float32))
    axes = gs.Constant("axes", np.array([0], np.int64))
    t = {k: gs.Variable(k) for k in ("flat", "plus", "unsq", "half")}
    nodes = [gs.Node("Flatten", attrs={"axis": 0}, inputs=[w], outputs=[t["flat"]]),
             gs.Node("Add", inputs=[one, t["flat"]], outputs=[t["plus"]]),
             gs.Node("Unsqueeze", inputs=[t["plus"], axes], outputs=[t["unsq"]]),
             gs.Node("Cast", attrs={"to": 10}, inputs=[t["unsq"]], outputs=[t["half"]])]
    graph = gs.Graph(nodes=nodes)
    got = T.const_value(t["half"], graph)
    expected = (1 + np.arange(6, dtype=np.float32)).reshape(1, 1, 6).astype(np.float16)
    assert got.dtype == np.float16 and got.shape == (1, 1, 6)
    np.testing.assert_array_equal(got, expected)


def test_norm_const_value_of_graph_input_is_none():
    x = gs.Variable("x", np.float32, [3])
    out = gs.Variable("y")
    graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[x], outputs=[out])], inputs=[x])
    assert T.const_value(out, graph) is None
