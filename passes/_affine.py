"""The affine tail after a normalized tensor, and the small value helpers of the norm passes.

``match_affine`` follows a normalized tensor down through an optional ``Mul`` by a constant
scale and ``Add`` of a constant bias (with float Casts or Identities between), absorbing each
only when it is constant per normalized element (broadcast-equivalent to the normalized shape).
A positional [S, D] Add after a LayerNorm over D is not per normalized element: it stays outside.
With ``tensors=True`` a scale or bias computed at run time (a graph input, another node's
output) is absorbed too, as a tensor input of the fused op, when its shape is known to be
exactly the normalized shape (leading 1s aside). ``channel_affine`` and ``affine_params`` are the
per-channel form of group and instance normalization ([C, 1, ...] parameters, [C] for the op).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.pipeline import Context

CAST = "Cast"
# Significand bits of the float types a normalization may run in.
FLOAT_BITS = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


@dataclass
class Affine:
    """The constant scale and bias following a normalized tensor, as far as they are exact."""

    output: gs.Tensor
    nodes: list[gs.Node] = field(default_factory=list)
    scale: np.ndarray | None = None   # broadcast to the normalized shape
    bias: np.ndarray | None = None
    kept: str = ""                    # why a following Mul/Add was left outside


@dataclass
class TensorParam:
    """A scale or bias computed at run time: ``tensor`` of the normalized shape after dropping
    ``lead`` leading axes of size 1."""

    tensor: gs.Tensor
    lead: int


def match_affine(t: gs.Tensor, ctx: Context, rank: int, norm_shape: tuple,
                 with_bias: bool = True, tensors: bool = False) -> Affine:
    """Follow ``t`` down through [Cast] Mul(scale) [Cast] Add(bias); each step optional.

    A step is taken only when the tensor it consumes has no other user, its operand is a
    constant (``ctx.const``), and that constant is the same for every non-normalized index
    (it broadcasts to ``norm_shape`` without touching the leading axes). A positional [S, D]
    Add after a LayerNorm over D fails that test and stays outside.
    """
    tail = Affine(t)
    for op in ("Mul", "Add") if with_bias else ("Mul",):
        found = _next_affine(tail.output, ctx, op)
        if found is None:
            continue
        node, passed, chain = found
        other = node.inputs[1] if node.inputs[0] is chain else node.inputs[0]
        value = ctx.const(other)
        if value is None and not tensors:
            break
        shaped = broadcast_param(value, rank, norm_shape) if value is not None else \
            tensor_param(other, ctx, rank, norm_shape)
        if isinstance(shaped, str):
            tail.kept = f"{op} {G.node_label(node)} kept outside: '{other.name}' {shaped}"
            break
        tail.nodes += passed + [node]
        tail.output = node.outputs[0]
        if op == "Mul":
            tail.scale = shaped
        else:
            tail.bias = shaped
    return tail


def _next_affine(t: gs.Tensor, ctx: Context, op: str):
    """(``op`` node, Casts/Identities passed, tensor it consumes) reached from ``t`` through
    single-use float Casts and Identities; None when the chain leads elsewhere."""
    passed = []
    while True:
        node = sole_consumer(t, ctx)
        if node is None or not G.in_default_domain(node):
            return None
        if node.op == op and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]:
            return node, passed, t
        if node.op == "Identity" or (node.op == CAST and is_float(cast_target(node))):
            passed.append(node)
            t = node.outputs[0]
            continue
        return None


def sole_consumer(t: gs.Tensor, ctx: Context) -> gs.Node | None:
    """The only node using ``t``, when ``t`` is not also a graph output."""
    if G.is_graph_output(ctx.graph, t) or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def broadcast_param(value: np.ndarray, rank: int, norm_shape: tuple) -> np.ndarray | str:
    """``value`` as an array of ``norm_shape`` when multiplying/adding it is per normalized
    element (size 1 on every other axis, no rank growth); else why not.

    A symbolic normalized dim takes the value's size there (the model only runs when they
    agree); a value of size 1 there would have to be broadcast to a size unknown until run time."""
    value = np.asarray(value)
    n = len(norm_shape)
    if not is_float(value.dtype):
        return f"has non-float dtype {value.dtype}"
    if value.ndim > rank:
        return f"has rank {value.ndim}, more than the input's {rank}"
    lead, tail = value.shape[:max(0, value.ndim - n)], value.shape[max(0, value.ndim - n):]
    if any(d != 1 for d in lead):
        return f"of shape {list(value.shape)} varies over non-normalized axes"
    aligned = (1,) * (n - len(tail)) + tuple(tail)
    if any(not _static(full) and d == 1 for d, full in zip(aligned, norm_shape)):
        return (f"of shape {list(value.shape)} would broadcast over a normalized dim of unknown size "
                f"{_show(norm_shape)}")
    if any(_static(full) and d not in (1, full) for d, full in zip(aligned, norm_shape)):
        return f"of shape {list(value.shape)} does not broadcast to the normalized shape {_show(norm_shape)}"
    resolved = tuple(full if _static(full) else d for d, full in zip(aligned, norm_shape))
    shaped = value.reshape(aligned)
    return shaped.copy() if shaped.shape == resolved else np.broadcast_to(shaped, resolved).copy()


def tensor_param(t: gs.Tensor, ctx: Context, rank: int, norm_shape: tuple) -> TensorParam | str:
    """``t``, a tensor known only at run time, as a scale/bias input of the fused op: its shape
    must be the normalized shape exactly (each dim the same number or the same symbol), after
    leading axes of size 1; else why not."""
    shape, dtype = ctx.shape(t), ctx.dtype(t)
    if shape is None or dtype is None:
        return f"is computed at run time and its {'shape' if shape is None else 'dtype'} is unknown"
    if not is_float(dtype):
        return f"has non-float dtype {np.dtype(dtype)}"
    n = len(norm_shape)
    if len(shape) > rank:
        return f"has rank {len(shape)}, more than the input's {rank}"
    lead, tail = shape[:max(0, len(shape) - n)], shape[max(0, len(shape) - n):]
    if any(d != 1 for d in lead):
        return f"of shape {_show(shape)} varies over non-normalized axes"
    same = len(tail) == n and all(a == b and (_static(a) or (isinstance(a, str) and a))
                                  for a, b in zip(tail, norm_shape))
    if not same:
        return (f"is computed at run time with shape {_show(shape)}, not known to be the normalized "
                f"shape {_show(norm_shape)}")
    return TensorParam(t, len(lead))


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def _show(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ------------------------------------------------------------------------------ per channel (group / instance norm)

def channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    """The shape a per-channel parameter broadcasts to, for ``match_affine``: [C, 1, ...]."""
    return (channels,) + (1,) * (rank - 2)


def channel_affine(t: gs.Tensor, ctx: Context, channels: int | None, rank: int) -> Affine:
    """The constant per-channel Mul/Add after ``t`` (none when the channel count is unknown)."""
    if channels is None:
        return Affine(t)
    return match_affine(t, ctx, rank, channel_shape(channels, rank))


def affine_params(tail: Affine, channels: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """[C] scale and bias (ones / zeros where absent) in ``dtype``."""
    scale = np.ones(channels) if tail.scale is None else np.asarray(tail.scale).reshape(-1)
    bias = np.zeros(channels) if tail.bias is None else np.asarray(tail.bias).reshape(-1)
    # Widening a float parameter is exact; narrowing never happens (dtype is the widest involved).
    return scale.astype(dtype), bias.astype(dtype)


# ------------------------------------------------------------------------------ small helpers

def cast_target(node: gs.Node):
    return onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


def float_bits(dtype) -> int | None:
    return FLOAT_BITS.get(_dtype_name(dtype)) if dtype is not None else None


def is_float(dtype) -> bool:
    return dtype is not None and _dtype_name(dtype) in FLOAT_BITS


def scalar(value) -> float | None:
    value = np.asarray(value)
    return float(value.astype(np.float64).reshape(-1)[0]) if value.size == 1 else None


def describe(value) -> str:
    value = np.asarray(value)
    return f"{scalar(value):g}" if value.size == 1 else f"a {list(value.shape)} tensor"
