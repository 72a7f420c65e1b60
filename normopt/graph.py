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


def not_constant(tensor: gs.Tensor, graph: gs.Graph | None = None) -> str:
    """Why ``tensor`` has no value fixed at export time (for a skip reason)."""
    if isinstance(tensor, gs.Constant) and (getattr(tensor, _INPUT_MARK, False)
                                            or (graph is not None and is_graph_input(graph, tensor))):
        return ("is an initializer also listed as a graph input: from IR version 4 on, a default that callers "
                "may override, not a constant")
    function = ir.function_of_input(tensor)
    if function is not None:
        return f"is an input of {function}: its value is given per call, not known in the body"
    return "is not a constant (graph input or computed)"


def const_value(tensor: gs.Tensor, graph: gs.Graph | None = None, _depth: int = 0,
                facts=None) -> np.ndarray | None:
    """The value of a tensor fixed at export time, else None.

    Initializers count, and so do outputs of Constant nodes, and Identity / Transpose / Cast /
    Flatten / Unsqueeze / Reshape / Expand / CastLike / Shape / Add of those (exports made without constant folding keep
    them: TorchScript writes a Linear weight as Transpose(W)).
    An initializer that is also a graph input (old exporters) does not count: the caller may
    feed another value at run time.

    ``facts`` (a pass's context: ``shape(tensor)``, and a ``_values`` cache) adds what statically
    known shapes and ranks determine: ``Shape`` of a tensor of static dims, ``Size``, and the
    integer shape arithmetic of ONNX function bodies (``Range(axis, rank, 1)``, Gather / Slice /
    Concat / ConstantOfShape / Squeeze / Neg / Sub / Mul / Div / Equal / Where / Min / Max).
    Each tensor is evaluated once per context.
    """
    if facts is None:
        return _evaluate(tensor, graph, _depth, None)
    hit = facts._values.get(id(tensor))
    if hit is not None and hit[0] is tensor:
        return hit[1]
    value = _evaluate(tensor, graph, _depth, facts)
    facts._values[id(tensor)] = (tensor, value)
    return value


def _evaluate(tensor: gs.Tensor, graph, depth: int, facts) -> np.ndarray | None:
    if getattr(tensor, _INPUT_MARK, False) or (graph is not None and is_graph_input(graph, tensor)):
        return None
    if isinstance(tensor, gs.Constant):
        return ir.constant_array(tensor)
    node = producer(tensor)
    if node is None or not in_default_domain(node) or depth > (_MAX_DEPTH if facts is not None else 4):
        return None
    depth += 1
    if node.op == CONSTANT:
        return _constant_attr(node)
    if node.op in _VIEW_OPS and node.inputs:
        inner = const_value(node.inputs[0], graph, depth, facts)
        return None if inner is None else _VIEW_OPS[node.op](inner, node.attrs)
    if node.op in _SHAPE_OPS and len(node.inputs) == 2:
        return _SHAPE_OPS[node.op](node, graph, depth, facts)
    if node.op == "Unsqueeze" and node.inputs:
        return _unsqueeze(node, graph, depth, facts)
    if node.op == "Shape" and node.inputs:
        dims = _shape_dims(node, graph, depth, facts)
        return None if dims is None or any(d is None for d in dims) else np.asarray(dims, dtype=np.int64)
    if facts is not None and node.op in _SHAPE_ARITHMETIC and node.inputs:
        try:
            return _SHAPE_ARITHMETIC[node.op](node, graph, depth, facts)
        except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError):
            return None  # an ill-formed expression is not a constant; the model will say so at run time
    return None


# Deepest shape expression evaluated with shape facts (Reshape(x, Concat(Slice(Shape(x)), ...))).
_MAX_DEPTH = 12


def _constant_attr(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    for value in attrs.values():
        if isinstance(value, ir.RefAttr):  # a function body's Constant of the function's attribute
            raise ir.UnknownAttribute(value.why)
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


def _inputs(node: gs.Node, graph, depth: int, facts, count: int | None = None) -> list | None:
    """Values of the node's first ``count`` inputs (all by default), or None at the first unknown."""
    values = []
    for t in node.inputs[:count]:
        value = None if not t.name else const_value(t, graph, depth, facts)
        if value is None:
            return None
        values.append(value)
    return values


def _reshape(node: gs.Node, graph, depth: int, facts=None) -> np.ndarray | None:
    found = _inputs(node, graph, depth, facts)
    if found is None:
        return None
    data, shape = found
    if data is None or shape is None:
        return None
    shape = [int(d) for d in shape.reshape(-1)]
    if not int(node.attrs.get("allowzero", 0)):
        shape = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(shape)]
    try:
        return data.reshape(shape)
    except ValueError:
        return None


def _expand(node: gs.Node, graph, depth: int, facts=None) -> np.ndarray | None:
    found = _inputs(node, graph, depth, facts)
    if found is None:
        return None
    data, shape = found
    try:
        out = np.broadcast_shapes(data.shape, tuple(int(d) for d in shape.reshape(-1)))
    except ValueError:
        return None
    return np.array(np.broadcast_to(data, out)) if np.prod(out, dtype=np.int64) <= _MAX_EXPANDED else None


def _unsqueeze(node: gs.Node, graph, depth: int, facts=None) -> np.ndarray | None:
    """Axes from the attribute (opset < 13) or the second input."""
    value = const_value(node.inputs[0], graph, depth, facts)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) == 2:
        axes = const_value(node.inputs[1], graph, depth, facts)
    if value is None or axes is None:
        return None
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    out_rank = value.ndim + len(axes)
    for axis in sorted(a % out_rank for a in axes):
        value = np.expand_dims(value, axis)
    return value


def _add(node: gs.Node, graph, depth: int, facts=None) -> np.ndarray | None:
    """Gemma's ``1 + w`` weight, which exports made without constant folding keep as an Add."""
    found = _inputs(node, graph, depth, facts)
    return None if found is None else np.add(*found).astype(np.result_type(*found))


def _cast_like(node: gs.Node, graph, depth: int, facts=None) -> np.ndarray | None:
    """Only the dtype of the second input is read: it may be any tensor of known type."""
    value, dtype = const_value(node.inputs[0], graph, depth, facts), tensor_dtype(node.inputs[1])
    return None if value is None or dtype is None else value.astype(dtype)


def _shape_dims(node: gs.Node, graph, depth: int, facts) -> list | None:
    """Shape(t)[start:end], one int per static dim and None per other, when the rank is known.

    Without ``facts`` only the shape of a constant counts (not of a tensor merely declared
    static); with them, the context's shapes (inferred first: ``Context.shape``)."""
    src = node.inputs[0]
    value = None if isinstance(src, gs.Constant) else const_value(src, graph, depth, facts)
    if isinstance(src, gs.Constant):
        dims = list(src.shape)
    elif value is not None:
        dims = list(value.shape)
    elif facts is not None and facts.shape(src) is not None:
        dims = [d if isinstance(d, int) and d >= 0 else None for d in facts.shape(src)]
    else:
        return None
    rank = len(dims)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
    return dims[start:end]


# Ops whose result is fixed when their inputs are: exports made without constant folding
# (dynamo with optimize=False) compute a bias-free Conv's zero bias as
# Expand(CastLike(0, x), Expand(Shape(W)[0:1], [1])) and ReduceMean axes as
# Reshape(Constant, Constant).
_SHAPE_OPS = {"Reshape": _reshape, "Expand": _expand, "CastLike": _cast_like, "Add": _add}


# ------------------------------------------------------------------------------ shape arithmetic
# Evaluated only with a context that knows shapes: ONNX function bodies (LayerNormalization-17,
# RMSNormalization-23, GroupNormalization-21) compute axes and shapes from Shape(x) at run time.

def _size(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    src = node.inputs[0]
    dims = _shape_dims(producer(src), graph, depth, facts) if _is_shape(src) else None
    if dims is not None:  # Size(Shape(x)) is the rank, whatever the dims are
        return np.asarray(len(dims), dtype=np.int64)
    value = const_value(src, graph, depth, facts)
    shape = list(value.shape) if value is not None else facts.shape(src)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return np.asarray(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)


def _is_shape(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    return node is not None and node.op == "Shape" and in_default_domain(node) and bool(node.inputs)


def _dims_of(tensor: gs.Tensor, graph, depth: int, facts) -> list | None:
    """A 1-D integer tensor as a list, None for each element not known: a Shape's symbolic
    dims stay None, so that Gather / Slice may still pick the static ones."""
    if _is_shape(tensor):
        return _shape_dims(producer(tensor), graph, depth, facts)
    value = const_value(tensor, graph, depth, facts)
    return None if value is None or value.ndim != 1 else [int(v) for v in value]


def _gather(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    indices = const_value(node.inputs[1], graph, depth, facts)
    if indices is None or len(node.inputs) != 2:
        return None
    axis = int(node.attrs.get("axis", 0))
    if _is_shape(node.inputs[0]) and axis == 0:
        dims = _dims_of(node.inputs[0], graph, depth, facts)
        if dims is None:
            return None
        picked = np.take(np.asarray([-1 if d is None else d for d in dims], dtype=np.int64), indices)
        chosen = np.take(np.asarray([d is None for d in dims]), indices)
        return None if np.any(chosen) else picked.astype(np.int64)
    data = const_value(node.inputs[0], graph, depth, facts)
    return None if data is None else np.take(data, indices.astype(np.int64), axis=axis)


def _slice(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    if len(node.inputs) >= 3:   # opset >= 10: starts, ends, axes, steps as inputs
        parts = [const_value(t, graph, depth, facts) if t.name else None for t in node.inputs[1:5]]
        if parts[0] is None or parts[1] is None or any(p is None for p, t in zip(parts, node.inputs[1:5])
                                                       if t.name):
            return None
        starts, ends = parts[0].reshape(-1), parts[1].reshape(-1)
        axes = parts[2].reshape(-1) if len(parts) > 2 and parts[2] is not None else range(len(starts))
        steps = parts[3].reshape(-1) if len(parts) > 3 and parts[3] is not None else [1] * len(starts)
    else:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        if starts is None or ends is None:
            return None
        axes, steps = node.attrs.get("axes", range(len(starts))), [1] * len(starts)
    if _is_shape(node.inputs[0]):
        dims = _dims_of(node.inputs[0], graph, depth, facts)
        if dims is None or list(axes) not in ([0], [-1]):
            return None
        picked = dims[slice(*_clamp(int(starts[0]), int(ends[0]), int(steps[0]), len(dims)))]
        return None if any(d is None for d in picked) else np.asarray(picked, dtype=np.int64)
    data = const_value(node.inputs[0], graph, depth, facts)
    if data is None:
        return None
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + data.ndim if int(a) < 0 else int(a)
        index[a] = slice(*_clamp(int(s), int(e), int(st), data.shape[a]))
    return data[tuple(index)]


def _clamp(start: int, end: int, step: int, n: int) -> tuple[int, int | None, int]:
    """ONNX Slice bounds (negative from the end, clamped; INT_MAX-style ends) as Python's."""
    if step == 0:
        raise ValueError("Slice step 0")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return min(max(start, 0), n), min(max(end, 0), n), step
    start = min(max(start, -1), n - 1)
    end = min(max(end, -1), n - 1)
    return start, (None if end < 0 else end), step


def _concat(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    found = _inputs(node, graph, depth, facts)
    if found is None:
        return None
    return np.concatenate([np.asarray(v) for v in found], axis=int(node.attrs.get("axis", 0)))


def _constant_of_shape(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    shape = const_value(node.inputs[0], graph, depth, facts)
    if shape is None:
        return None
    shape = tuple(int(d) for d in shape.reshape(-1))
    if any(d < 0 for d in shape) or np.prod(shape, dtype=np.int64) > _MAX_EXPANDED:
        return None
    fill = node.attrs.get("value")
    fill = np.zeros(1, np.float32) if fill is None else np.asarray(getattr(fill, "values", fill))
    return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)


def _squeeze(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    value = const_value(node.inputs[0], graph, depth, facts)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) == 2 and node.inputs[1].name:
        axes = const_value(node.inputs[1], graph, depth, facts)
        if axes is None:
            return None
    if value is None:
        return None
    axes = None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))
    return np.squeeze(value, axis=axes)


def _range(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    found = _inputs(node, graph, depth, facts)
    if found is None or any(v.size != 1 for v in found):
        return None
    start, limit, delta = (v.reshape(()) for v in found)
    out = np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))
    return out if out.size <= _MAX_EXPANDED else None


def _integer_division(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div: integers truncate toward zero (numpy's // floors)."""
    if np.issubdtype(np.result_type(a, b), np.integer):
        if np.any(b == 0):
            raise ZeroDivisionError("integer division by zero")
        return (np.trunc(a / b)).astype(np.result_type(a, b))
    return np.divide(a, b).astype(np.result_type(a, b))


def _elementwise(fn):
    def evaluate(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
        found = _inputs(node, graph, depth, facts)
        if found is None or any(np.size(v) > _MAX_EXPANDED for v in found):
            return None  # arithmetic on weights is a pass's business, not the evaluator's
        return np.asarray(fn(*found))
    return evaluate


_SHAPE_ARITHMETIC = {
    "Size": _size,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "ConstantOfShape": _constant_of_shape,
    "Squeeze": _squeeze,
    "Range": _range,
    "Neg": _elementwise(lambda a: np.negative(a)),
    "Sub": _elementwise(lambda a, b: np.subtract(a, b).astype(np.result_type(a, b))),
    "Mul": _elementwise(lambda a, b: np.multiply(a, b).astype(np.result_type(a, b))),
    "Div": _elementwise(_integer_division),
    "Equal": _elementwise(np.equal),
    "Where": _elementwise(np.where),
    "Min": _elementwise(lambda *v: np.minimum.reduce(np.broadcast_arrays(*v))),
    "Max": _elementwise(lambda *v: np.maximum.reduce(np.broadcast_arrays(*v))),
    "ReduceProd": lambda node, graph, depth, facts: _reduce_prod(node, graph, depth, facts),
}


def _reduce_prod(node: gs.Node, graph, depth: int, facts) -> np.ndarray | None:
    """The product of a shape's dims (dynamo's N of torch.var); all axes, or constant ones."""
    value = const_value(node.inputs[0], graph, depth, facts)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = const_value(node.inputs[1], graph, depth, facts)
        if axes is None:
            return None
    if value is None:
        return None
    axes = None if axes is None or np.size(axes) == 0 else tuple(int(a) for a in np.asarray(axes).reshape(-1))
    keep = bool(int(node.attrs.get("keepdims", 1)))
    return np.prod(value, axis=axes, keepdims=keep).astype(value.dtype)


# ------------------------------------------------------------------------------ symbolic shape values

def dims_value(tensor: gs.Tensor, graph, facts, known: dict | None = None, _depth: int = 0) -> list | None:
    """A 1-D shape tensor as a list of dims: ints, and symbols (str) for the sizes known only at
    run time, else None.

    A symbol is the dim's name in the context's shapes, or ``'t[i]'`` for dim i of tensor t when
    unnamed, so two reads of one dim compare equal. ``known`` (id(tensor) -> dims) gives the
    symbolic shape of tensors the caller tracks itself. Follows what exporters write to rebuild
    a shape: Shape (start/end), Concat, Gather and Slice by constants, Reshape to 1-D, Squeeze,
    Unsqueeze, Cast, Identity; constants give their ints.
    """
    value = const_value(tensor, graph, 0, facts)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)] if value.ndim <= 1 else None
    node = producer(tensor)
    if node is None or not in_default_domain(node) or _depth > _MAX_DEPTH or not node.inputs:
        return None
    inner = lambda t: dims_value(t, graph, facts, known, _depth + 1)  # noqa: E731
    if node.op == "Shape":
        dims = symbolic_shape(node.inputs[0], facts, known)
        if dims is None:
            return None
        rank = len(dims)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
        return dims[start:end]
    if node.op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
        # A scalar and its 1-element 1-D views hold the same dims.
        return inner(node.inputs[0])
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [inner(t) for t in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and len(node.inputs) == 2:
        dims, index = inner(node.inputs[0]), const_value(node.inputs[1], graph, 0, facts)
        if dims is None or index is None:
            return None
        try:
            return [dims[int(i)] for i in np.asarray(index).reshape(-1)]
        except IndexError:
            return None
    if node.op == "Slice" and len(node.inputs) >= 3:
        dims = inner(node.inputs[0])
        parts = [const_value(t, graph, 0, facts) if t.name else None for t in node.inputs[1:5]]
        if dims is None or parts[0] is None or parts[1] is None or parts[0].size != 1 or \
                any(p is None for p, t in zip(parts[2:], node.inputs[3:5]) if t.name):
            return None
        step = int(parts[3].reshape(-1)[0]) if len(parts) > 3 and parts[3] is not None else 1
        return dims[slice(*_clamp(int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0]), step, len(dims)))]
    return None


def symbolic_shape(tensor: gs.Tensor, facts, known: dict | None = None) -> list | None:
    """The shape of ``tensor`` with every dim an int or a symbol (see ``dims_value``)."""
    if known and id(tensor) in known:
        return list(known[id(tensor)])
    shape = facts.shape(tensor) if facts is not None else None
    if shape is None:
        return None
    return [d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d) else f"{tensor.name}[{i}]"
            for i, d in enumerate(shape)]


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
