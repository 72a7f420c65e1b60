"""What normopt knows about a tensor: the one layer every pass asks.

A pass never derives a tensor's facts itself. It asks its context (``pipeline.Context`` is a
``TensorFacts``):

* ``shape(t)`` - static-or-symbolic dims (ints, names, None), inferred first, declared where
  inference left a dim open; ``checked_shape(t)`` refuses a declaration that contradicts
  inference; ``known_shape(t)`` is that shape or None; ``rank(t)``; ``dtype(t)``;
* ``const(t)`` - the value fixed at export time, including what statically known shapes and
  ranks determine (``Size(Shape(x))``, ``Range(axis, rank, 1)``, Gather / Slice / Concat of a
  Shape); ``const(t, from_shapes=False)`` counts constants only (a weight, a parameter);
* ``dims_value(t)`` / ``symbolic_shape(t)`` - a 1-D shape tensor's elements (a tensor's dims)
  with a name for each size known only at run time;
* ``shape_terms(t)`` / ``reshape_dims(node, dims)`` / ``same_dim`` / ``restores`` - the same,
  keeping *which* dim a run-time size was read from (``DimOf``), to prove that a Reshape
  restores a tensor's shape.

Facts come from onnx shape inference (``pipeline.Shapes``: run once, decoded per tensor on
first use) and the graph itself; a tensor's value and dtype are looked up once per context
(``_values``, ``_dtypes``), never by a scan of the whole graph. A rewrite keeps them true for the
passes that follow: every tensor it writes carries its shape and dtype (``_emit.emit_fused``).
Passes depend on this layer and on their family core (``passes/_norm.py`` ...), never on each
other, and their ``match`` only reads.

Two constant evaluations, on purpose: ``const(t)`` with shape facts (axes, shapes), and
``const(t, from_shapes=False)`` from constants alone, for weights and parameters, where a value
read from a shape would hide the nodes a pass must account for (fold-batchnorm's computed
parameters).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G, ir
from normopt.records import Reject

def const_value(tensor: gs.Tensor, graph: gs.Graph | None = None, _depth: int = 0,
                facts=None) -> np.ndarray | None:
    """The value of a tensor fixed at export time, else None.

    Initializers count, and so do outputs of Constant nodes, and Identity / Transpose / Cast /
    Flatten / Unsqueeze / Reshape / Expand / CastLike / Shape / Add / ConstantOfShape of those (exports made without constant folding keep
    them: TorchScript writes a Linear weight as Transpose(W)).
    An initializer that is also a graph input (old exporters) does not count: the caller may
    feed another value at run time.

    ``facts`` (a pass's context: ``shape(tensor)``, and a ``_values`` cache) adds what statically
    known shapes and ranks determine: ``Shape`` of a tensor of static dims, ``Size``, and the
    integer shape arithmetic of ONNX function bodies (``Range(axis, rank, 1)``, Gather / Slice /
    Concat / Squeeze / Neg / Sub / Mul / Div / Equal / Where / Min / Max).
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
    if getattr(tensor, G._INPUT_MARK, False) or (graph is not None and G.is_graph_input(graph, tensor)):
        return None
    if isinstance(tensor, gs.Constant):
        return ir.constant_array(tensor)
    node = G.producer(tensor)
    if node is None or not G.in_default_domain(node) or depth > (_MAX_DEPTH if facts is not None else 4):
        return None
    depth += 1
    if node.op == G.CONSTANT:
        return _constant_attr(node)
    if node.op in _VIEW_OPS and node.inputs:
        inner = const_value(node.inputs[0], graph, depth, facts)
        return None if inner is None else _VIEW_OPS[node.op](inner, node.attrs)
    if node.op in _SHAPE_OPS and len(node.inputs) == 2:
        return _SHAPE_OPS[node.op](node, graph, depth, facts)
    if node.op == "Unsqueeze" and node.inputs:
        return _unsqueeze(node, graph, depth, facts)
    if node.op == "ConstantOfShape" and node.inputs:
        return _constant_of_shape(node, graph, depth, facts)
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
# Largest ConstantOfShape of a constant shape evaluated (elements): a weight written that way
# (onnx's own "light" test models fill every weight so) is folded as any other.
_MAX_FILLED = 1 << 26


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
    """Only the dtype of the second input is read: it may be any tensor of known type (with
    ``facts``, inferred types too: onnxscript writes ``mean + 1e-5`` as
    ``Add(mean, CastLike(1e-5, mean))``)."""
    value = const_value(node.inputs[0], graph, depth, facts)
    if value is None:
        return None
    dtype = G.tensor_dtype(node.inputs[1]) if facts is None else facts.dtype(node.inputs[1])
    return None if dtype is None else value.astype(dtype)


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
    dims = _shape_dims(G.producer(src), graph, depth, facts) if _is_shape(src) else None
    if dims is not None:  # Size(Shape(x)) is the rank, whatever the dims are
        return np.asarray(len(dims), dtype=np.int64)
    value = const_value(src, graph, depth, facts)
    shape = list(value.shape) if value is not None else facts.shape(src)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return np.asarray(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)


def _is_shape(tensor: gs.Tensor) -> bool:
    node = G.producer(tensor)
    return node is not None and node.op == "Shape" and G.in_default_domain(node) and bool(node.inputs)


def _dims_of(tensor: gs.Tensor, graph, depth: int, facts) -> list | None:
    """A 1-D integer tensor as a list, None for each element not known: a Shape's symbolic
    dims stay None, so that Gather / Slice may still pick the static ones."""
    if _is_shape(tensor):
        return _shape_dims(G.producer(tensor), graph, depth, facts)
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
        part = _clamp(int(starts[0]), int(ends[0]), int(steps[0]), len(dims))
        picked = None if part is None else dims[part]
        return None if picked is None or any(d is None for d in picked) else np.asarray(picked, dtype=np.int64)
    data = const_value(node.inputs[0], graph, depth, facts)
    if data is None:
        return None
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + data.ndim if int(a) < 0 else int(a)
        index[a] = _clamp(int(s), int(e), int(st), data.shape[a])
        if index[a] is None:
            return None
    return data[tuple(index)]


def _clamp(start: int, end: int, step: int, n: int) -> slice | None:
    """ONNX Slice bounds (negative from the end, clamped; INT_MAX-style ends) as a Python slice.
    None where runtimes disagree: a negative step with an end past the axis (INT64_MAX) is empty
    by the spec's clamping and onnx's reference, but runs to the start in onnxruntime."""
    if step == 0:
        raise ValueError("Slice step 0")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), n), min(max(end, 0), n), step)
    if end >= n:
        return None
    # negative step: start clamped into [0, n-1], end into [-1, n-1] (-1: past the first element)
    start = min(max(start, 0), n - 1)
    end = min(max(end, -1), n - 1)
    return slice(start, None if end < 0 else end, step)


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
    if any(d < 0 for d in shape) or np.prod(shape, dtype=np.int64) > _MAX_FILLED:
        return None
    fill = node.attrs.get("value")
    fill = np.zeros(1, np.float32) if fill is None else np.asarray(getattr(fill, "values", fill))
    # A read-only view of the one value: no memory and no time however large the shape, until
    # a pass computes with it (a folded weight).
    return np.broadcast_to(fill.reshape(-1)[:1].reshape(()), shape)


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
    node = G.producer(tensor)
    if node is None or not G.in_default_domain(node) or _depth > _MAX_DEPTH or not node.inputs:
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
        part = _clamp(int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0]), step, len(dims))
        return None if part is None else dims[part]
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


# ------------------------------------------------------------------------------ the facts of one graph

class TensorFacts:
    """Per-tensor facts of one graph. A subclass provides ``graph``, ``shapes`` (name ->
    (elem_type, shape) from onnx shape inference, ``pipeline.Shapes``), and the caches
    ``_values`` and ``_dtypes`` (dicts: id(tensor) -> (tensor, fact), each tensor looked at
    once per context)."""

    graph: gs.Graph
    shapes: object
    _values: dict
    _dtypes: dict

    def const(self, tensor: gs.Tensor, from_shapes: bool = True):
        """The value of ``tensor`` fixed at export time, else None (``const_value``).

        With ``from_shapes`` (the default) what statically known shapes and ranks determine
        counts too (``Size(Shape(x))``, ``Range(axis, rank, 1)``), evaluated once per tensor;
        without, constants and what is computed from them only (not cached: a weight)."""
        if not from_shapes:
            return const_value(tensor, self.graph)
        return const_value(tensor, self.graph, facts=self)

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        """Static-or-symbolic shape (ints, strings or None per dim), when known.

        Inferred from the operations first (``inferred_index`` prefers what inference computes
        without the declared value_info); a declaration only fills what inference left open: a
        dim it could not tell, or a tensor it could not type (a rewrite's new tensors carry their
        shape themselves)."""
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        declared = tuple(tensor.shape) if tensor.shape is not None else None
        known = self.shapes.get(tensor.name)
        inferred = known[1] if known else None
        if inferred is None or declared is None or len(declared) != len(inferred):
            return inferred if inferred is not None else declared
        # A dim inference names after a graph input's ('batch') is dynamic, whatever an export
        # declared for it (an example's static size); only dims it could not tell are filled.
        return tuple(d if (i is None or _unnamed(i)) and d not in (None, "") else i
                     for i, d in zip(inferred, declared))

    def checked_shape(self, tensor: gs.Tensor) -> tuple | None | Reject:
        """``shape``, or a Reject when the model's declaration (value_info) contradicts the
        shape that inference computes from the graph itself (their ranks or static dims
        differ): neither can then place axes safely. Graph inputs and constants are facts."""
        shape = self.shape(tensor)
        declared = tuple(tensor.shape) if tensor.shape is not None else None
        known = self.shapes.get(tensor.name)
        inferred = known[1] if known else None
        if declared is None or inferred is None or isinstance(tensor, gs.Constant) or \
                G.is_graph_input(self.graph, tensor):
            return shape
        clash = len(declared) != len(inferred) or any(
            isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b
            for a, b in zip(declared, inferred))
        if clash:
            return Reject(f"declared shape {_dims(declared)} of '{tensor.name}' contradicts the inferred "
                          f"{_dims(inferred)}")
        return shape

    def known_shape(self, tensor: gs.Tensor) -> tuple | None:
        """``checked_shape``, None when unknown or when its declaration contradicts inference."""
        shape = self.checked_shape(tensor)
        return None if isinstance(shape, Reject) else shape

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dtype(self, tensor: gs.Tensor):
        """numpy dtype when known (looked up once per tensor per context)."""
        hit = self._dtypes.get(id(tensor))
        if hit is not None and hit[0] is tensor:
            return hit[1]
        dtype = G.tensor_dtype(tensor)
        if dtype is None:
            shapes = self.shapes
            elem_type = getattr(shapes, "elem_type", None)   # ``pipeline.Shapes``: no shape decoded
            if elem_type is not None:
                elem = elem_type(tensor.name)
            else:
                known = shapes.get(tensor.name)
                elem = known[0] if known else 0
            if elem:
                dtype = _np_dtype(elem)
        self._dtypes[id(tensor)] = (tensor, dtype)
        return dtype

    # -------------------------------------------------------------------- symbolic dims

    def dims_value(self, tensor: gs.Tensor, known: dict | None = None) -> list | None:
        """A 1-D shape tensor's elements, a symbol for each size known only at run time
        (``dims_value``)."""
        return dims_value(tensor, self.graph, self, known)

    def symbolic_shape(self, tensor: gs.Tensor, known: dict | None = None) -> list | None:
        """The shape of ``tensor`` with every dim an int or a symbol (``symbolic_shape``)."""
        return symbolic_shape(tensor, self, known)

    def shape_terms(self, tensor: gs.Tensor) -> list | None:
        """The elements of a 1-D shape tensor: ints, or ``DimOf`` for dims read with Shape; None if
        unknown (``shape_terms``)."""
        return shape_terms(tensor, self)

    def reshape_dims(self, reshape: gs.Node, in_dims: list) -> list | None:
        """A Reshape's output dims as terms (ints, -1, DimOf, symbolic names), given its input's."""
        terms = self.shape_terms(reshape.inputs[1])
        if terms is None:  # fall back on shape inference (data propagation) for the result
            shape = self.known_shape(reshape.outputs[0])
            return None if shape is None else list(shape)
        if int(reshape.attrs.get("allowzero", 0)):
            return terms
        # allowzero=0: a 0 entry copies the input's dim at the same index.
        return [in_dims[i] if d == 0 and i < len(in_dims) else (None if d == 0 else d) for i, d in enumerate(terms)]

    def resolve(self, term):
        """A DimOf as the static int or symbolic name shape inference knows, else unchanged."""
        if isinstance(term, DimOf):
            shape = self.known_shape(term.tensor)
            if shape is not None and term.axis < len(shape) and shape[term.axis] is not None:
                return shape[term.axis]
        return term

    def same_dim(self, term, x: gs.Tensor, axis: int) -> bool:
        """Whether ``term`` is surely dim ``axis`` of ``x``."""
        if isinstance(term, DimOf) and term.axis == axis and (
                term.tensor is x or shape_source(term.tensor) is shape_source(x)):
            return True
        term = self.resolve(term)
        shape = self.known_shape(x)
        dim = shape[axis] if shape is not None and axis < len(shape) else None
        if isinstance(term, DimOf) or term is None or dim is None or term == -1:
            return False
        return term == dim  # equal ints, or the same symbolic name (equal by ONNX's convention)

    def restores(self, dims: list | None, x: gs.Tensor) -> bool:
        """Whether a reshape to ``dims`` gives x's shape (one -1 may stand for one dim)."""
        shape = self.known_shape(x)
        if dims is None or shape is None or len(dims) != len(shape):
            return False
        misses = [i for i, d in enumerate(dims) if not self.same_dim(d, x, i)]
        return not misses or (len(misses) == 1 and dims[misses[0]] == -1)


def shape_source(t: gs.Tensor) -> gs.Tensor:
    """The tensor whose shape ``t`` has because a Cast or Identity made it (else ``t``): ONNX's
    GroupNormalization-21 body restores x's shape as Shape(Cast(x))."""
    for _ in range(4):
        node = G.producer(t)
        if node is None or node.op not in ("Cast", "Identity") or not G.in_default_domain(node) or not node.inputs:
            break
        t = node.inputs[0]
    return t


def static_dim(shape, axis: int) -> int | None:
    """Dim ``axis`` of ``shape`` when it is a static positive int."""
    if shape is None or len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


_NP_DTYPES: dict[int, np.dtype] = {}


def _np_dtype(elem_type: int):
    if elem_type not in _NP_DTYPES:
        _NP_DTYPES[elem_type] = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return _NP_DTYPES[elem_type]


def _unnamed(dim) -> bool:
    """A dim onnx shape inference made up for a size it does not know ('unk__3')."""
    return isinstance(dim, str) and dim.startswith("unk__")


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ------------------------------------------------------------------------------ dims with their source

@dataclass(frozen=True, eq=False)
class DimOf:
    """Dimension ``axis`` of ``tensor``, read at run time (Shape, Gather, a Reshape 0 entry)."""

    tensor: gs.Tensor
    axis: int


def shape_terms(t: gs.Tensor, facts: TensorFacts, depth: int = 0) -> list | None:
    """The elements of a 1-D shape tensor: ints, or DimOf for dims read with Shape; None if unknown.

    Unlike ``dims_value``, a dim read with Shape stays a DimOf even where its size is static,
    so that a reshape back can be proven to restore *that* tensor's shape."""
    value = const_value(t, facts.graph)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None
    node = G.producer(t)
    if node is None or depth > 8 or not G.in_default_domain(node):
        return None
    inner = (lambda i: shape_terms(node.inputs[i], facts, depth + 1))
    if node.op == "Shape":
        shape = facts.known_shape(node.inputs[0])
        if shape is None:
            return None
        rank = len(shape)
        dims = [DimOf(node.inputs[0], i) for i in range(rank)]
        # Shape's start/end (opset 15) clamp like Python slices.
        return dims[int(node.attrs.get("start", 0)):int(node.attrs.get("end", rank))]
    if node.op == "Concat":
        parts = [shape_terms(i, facts, depth + 1) for i in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op in ("Unsqueeze", "Squeeze", "Identity"):
        return inner(0)  # on a 0-d or 1-D shape piece the elements are unchanged
    if node.op == "Cast" and _int_cast(node):
        # tf2onnx computes shapes in int32 (Cast to int32, Slice, Concat, Cast back to int64):
        # dims below 2^31 keep their values.
        return inner(0)
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        data, index = inner(0), const_value(node.inputs[1], facts.graph)
        if data is None or index is None or any(not -len(data) <= i < len(data) for i in index.reshape(-1)):
            return None
        return [data[int(i)] for i in index.reshape(-1)]
    if node.op == "Slice":
        return _slice_terms(node, inner(0), facts)
    if node.op in ("Div", "Mul") and len(node.inputs) == 2:
        # tf.keras' C // G: integer arithmetic on dims known statically, by a constant.
        data, by = inner(0), const_value(node.inputs[1], facts.graph)
        if data is None or by is None or by.dtype.kind not in "iu" or by.size != 1 or int(by.reshape(-1)[0]) <= 0:
            return None
        dims = [facts.resolve(d) for d in data]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            return None
        k = int(by.reshape(-1)[0])
        return [d // k if node.op == "Div" else d * k for d in dims]
    return None


def _int_cast(node: gs.Node) -> bool:
    """A Cast to int32 or int64 (what exporters compute shapes in)."""
    to = node.attrs.get("to")
    return to is not None and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to))) in (np.dtype(np.int32),
                                                                                      np.dtype(np.int64))


def _slice_terms(node: gs.Node, data: list | None, facts: TensorFacts) -> list | None:
    names = ("starts", "ends", "axes", "steps")
    args = {k: node.attrs[k] for k in names if k in node.attrs}  # opset < 10: attributes
    for k, tensor in zip(names, node.inputs[1:]):
        if tensor.name:
            args[k] = const_value(tensor, facts.graph)
    vals = {k: None if v is None else [int(a) for a in np.asarray(v).reshape(-1)] for k, v in args.items()}
    if data is None or None in vals.values() or len(vals.get("starts", [])) != 1 or \
            vals.get("axes", [0])[0] not in (0, -1) or vals.get("steps", [1]) != [1]:
        return None
    return data[vals["starts"][0]:vals["ends"][0]]
