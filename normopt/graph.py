"""Small helpers over onnx-graphsurgeon graphs: constants, producers, fan-out, names."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import ir

CONSTANT = "Constant"


def in_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def node_label(node: gs.Node) -> str:
    """A name for messages: the node's name, else ``Op(first output)``."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}({out})"


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs) or getattr(tensor, _INPUT_MARK, False)


_INPUT_MARK = "_normopt_graph_input"


def mark_graph_inputs(root: gs.Graph) -> None:
    """Flag the inputs of the model's graph and subgraphs on the tensors themselves, so that a
    subgraph node reading an outer-scope input still sees it as one (an initializer that is
    also a graph input can be overridden at run time: it is not a constant)."""
    for _path, g in iter_graphs(root):
        for tensor in g.inputs:
            setattr(tensor, _INPUT_MARK, True)


def const_value(tensor: gs.Tensor, graph: gs.Graph | None = None, _depth: int = 0) -> np.ndarray | None:
    """The value of a tensor fixed at export time, else None.

    Initializers count, and so do outputs of Constant nodes, and Identity / Transpose / Cast /
    Flatten / Unsqueeze / Reshape / Expand / CastLike / Shape / Add of those (exports made without constant folding keep
    them: TorchScript writes a Linear weight as Transpose(W)).
    An initializer that is also a graph input (old exporters) does not count: the caller may
    feed another value at run time.
    """
    if getattr(tensor, _INPUT_MARK, False) or (graph is not None and is_graph_input(graph, tensor)):
        return None
    if isinstance(tensor, gs.Constant):
        return ir.constant_array(tensor)
    node = producer(tensor)
    if node is None or not in_default_domain(node) or _depth > 4:
        return None
    if node.op == CONSTANT:
        return _constant_attr(node)
    if node.op in _VIEW_OPS and node.inputs:
        inner = const_value(node.inputs[0], graph, _depth + 1)
        return None if inner is None else _VIEW_OPS[node.op](inner, node.attrs)
    if node.op in _SHAPE_OPS and len(node.inputs) == 2:
        return _SHAPE_OPS[node.op](node, graph, _depth + 1)
    if node.op == "Unsqueeze" and node.inputs:
        return _unsqueeze(node, graph, _depth + 1)
    if node.op == "Shape" and node.inputs:
        return _shape(node, graph, _depth + 1)
    return None


def _constant_attr(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return ir.constant_array(value) if isinstance(value, gs.Constant) else np.asarray(value)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def _cast(value: np.ndarray, attrs: dict) -> np.ndarray:
    return value.astype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs["to"])))


def _flatten(value: np.ndarray, attrs: dict) -> np.ndarray:
    axis = int(attrs.get("axis", 1))
    axis = axis + value.ndim if axis < 0 else axis
    return value.reshape(int(np.prod(value.shape[:axis], dtype=np.int64)), -1)


# Ops that only re-present a constant; their result is as fixed as their input.
# (Flatten: ONNX function bodies flatten LayerNormalization's scale.)
_VIEW_OPS = {
    "Identity": lambda v, attrs: v,
    "Transpose": lambda v, attrs: np.transpose(v, attrs.get("perm")),
    "Cast": _cast,
    "Flatten": _flatten,
}


# Largest constant that Expand may compute (elements): a per-channel bias, not an activation.
_MAX_EXPANDED = 1 << 20


def _reshape(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    data, shape = (const_value(t, graph, depth) for t in node.inputs)
    if data is None or shape is None:
        return None
    shape = [int(d) for d in shape.reshape(-1)]
    if not int(node.attrs.get("allowzero", 0)):
        shape = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(shape)]
    try:
        return data.reshape(shape)
    except ValueError:
        return None


def _expand(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    data, shape = (const_value(t, graph, depth) for t in node.inputs)
    if data is None or shape is None:
        return None
    try:
        out = np.broadcast_shapes(data.shape, tuple(int(d) for d in shape.reshape(-1)))
    except ValueError:
        return None
    return np.array(np.broadcast_to(data, out)) if np.prod(out, dtype=np.int64) <= _MAX_EXPANDED else None


def _unsqueeze(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    """Axes from the attribute (opset < 13) or the second input."""
    value = const_value(node.inputs[0], graph, depth)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) == 2:
        axes = const_value(node.inputs[1], graph, depth)
    if value is None or axes is None:
        return None
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    out_rank = value.ndim + len(axes)
    for axis in sorted(a % out_rank for a in axes):
        value = np.expand_dims(value, axis)
    return value


def _add(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    """Gemma's ``1 + w`` weight, which exports made without constant folding keep as an Add."""
    a, b = (const_value(t, graph, depth) for t in node.inputs)
    return None if a is None or b is None else np.add(a, b).astype(np.result_type(a, b))


def _cast_like(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    """Only the dtype of the second input is read: it may be any tensor of known type."""
    value, dtype = const_value(node.inputs[0], graph, depth), tensor_dtype(node.inputs[1])
    return None if value is None or dtype is None else value.astype(dtype)


def _shape(node: gs.Node, graph, depth: int) -> np.ndarray | None:
    """Shape(c)[start:end] of a constant c (not of a tensor merely declared static)."""
    src = node.inputs[0]
    value = None if isinstance(src, gs.Constant) else const_value(src, graph, depth)
    dims = src.shape if isinstance(src, gs.Constant) else None if value is None else value.shape
    if dims is None:
        return None
    return np.asarray(dims, dtype=np.int64)[node.attrs.get("start", 0):node.attrs.get("end")]


# Ops whose result is fixed when their inputs are: exports made without constant folding
# (dynamo with optimize=False) compute a bias-free Conv's zero bias as
# Expand(CastLike(0, x), Expand(Shape(W)[0:1], [1])) and ReduceMean axes as
# Reshape(Constant, Constant).
_SHAPE_OPS = {"Reshape": _reshape, "Expand": _expand, "CastLike": _cast_like, "Add": _add}


def scalar_value(tensor: gs.Tensor, graph: gs.Graph | None = None) -> float | None:
    """A constant holding exactly one element, as a Python float."""
    value = const_value(tensor, graph)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def other_uses(tensor: gs.Tensor, graph: gs.Graph, allowed: set[int]) -> list[str]:
    """Who uses ``tensor`` besides the nodes whose ids are in ``allowed`` (graph output included)."""
    uses = [node_label(n) for n in tensor.outputs if id(n) not in allowed]
    if is_graph_output(graph, tensor):
        uses.append("graph output")
    return uses


def iter_graphs(graph: gs.Graph, path: str = "") -> Iterator[tuple[str, gs.Graph]]:
    """The graph and every subgraph (If/Loop/Scan bodies), each with a readable path."""
    return ir.iter_graphs(graph, path, node_label)


class NameScope:
    """Fresh, deterministic tensor and node names, unique across the model and its subgraphs.
    ``fresh`` costs O(1): each base name remembers the next suffix to try."""

    def __init__(self, graph: gs.Graph):
        self.used: set[str] = ir.all_names(graph)
        self._next: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        name = base
        if name in self.used:
            i = self._next.get(base, 1)
            name = f"{base}_{i}"
            while name in self.used:
                i += 1
                name = f"{base}_{i}"
            self._next[base] = i + 1
        self.used.add(name)
        return name


def make_constant(names: NameScope, base: str, values: np.ndarray) -> gs.Constant:
    """A new initializer under a fresh name. Its values are encoded once, here: the array is not
    kept, and a large one leaves the exported skeleton as a header like any weight."""
    return ir.new_constant(names.fresh(base), np.ascontiguousarray(values))


def tensor_dtype(tensor: gs.Tensor):
    """numpy dtype of a tensor when known (constants always), else None."""
    if tensor.dtype is None:
        return None
    if isinstance(tensor.dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)
    return np.dtype(tensor.dtype)
