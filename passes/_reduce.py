"""Means as exporters write them: which reductions, and what may follow one.

A mean over chosen axes is a ReduceMean (axes as attribute or input, constant or computed from
the input's rank), a GlobalAveragePool (tf2onnx: a mean over axes 2..), or a ReduceSum divided by
the number of elements it sums (dynamo). dynamo writes torch.var_mean and keepdim=False
reductions with keepdims=0 and puts the reduced axes back with Reshape / Unsqueeze / Expand
("broadcast_in_dim"). ``reduction`` is the pattern; ``restored_mean`` checks, symbolically,
that what follows a reduction keeps it a mean with the reduced axes as size 1.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.passes._affine import CAST, float_bits, is_float, scalar
from normopt.pattern import AnyOf, Match, Op, Pattern
from normopt.pipeline import Context, Reject

REDUCE_MEAN = "ReduceMean"
GLOBAL_AVERAGE_POOL = "GlobalAveragePool"
# A mean over chosen axes: tf2onnx's optimizer writes a ReduceMean over axes 2.. (the last
# axis of a rank-3 tensor) as GlobalAveragePool.
MEAN_OPS = (REDUCE_MEAN, GLOBAL_AVERAGE_POOL)
REDUCE_SUM = "ReduceSum"
REDUCTIONS = MEAN_OPS + (REDUCE_SUM,)
# What may follow a reduction before its result is used (checked by ``_restored``): dynamo
# writes torch.var_mean and keepdim=False reductions as ReduceMean/ReduceSum with keepdims=0,
# Reshape or Unsqueeze back, Expand ("broadcast_in_dim"), and ReduceSum divided by N;
# torch.var's Bessel correction is a Mul by N and a Div by N - 1 (a near miss to report).
CHAIN_OPS = ("Reshape", "Unsqueeze", "Expand", "Identity", "Div", "Mul")
CHAIN_DEPTH = 4


def reduction(inner: Pattern, name: str) -> Pattern:
    """A mean of ``inner`` (named ``name``), then up to CHAIN_DEPTH ops of CHAIN_OPS (named
    ``name_c1``, ``name_c2``, ... from the reduction on)."""
    p = Op(REDUCTIONS, [inner], name=name)
    alternatives = [p]
    for i in range(1, CHAIN_DEPTH + 1):
        p = Op(CHAIN_OPS, [p], name=f"{name}_c{i}")
        alternatives.append(p)
    return AnyOf(*reversed(alternatives))


def reduce_axes(node: gs.Node, ctx: Context) -> tuple[int, ...] | None:
    """Axes of a ReduceMean as written (attribute before opset 18, constant input from 18).

    None when they are not constant, or absent (reduce all, or a no-op with
    noop_with_empty_axes=1): neither is a normalization over chosen axes.
    """
    if node.op == GLOBAL_AVERAGE_POOL:
        rank = ctx.rank(node.inputs[0])
        return tuple(range(2, rank)) if rank is not None and rank >= 3 else None
    if "axes" in node.attrs:
        axes = np.asarray(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.const(node.inputs[1])
        if axes is None:
            return None
    else:
        return None
    axes = tuple(int(a) for a in np.asarray(axes).reshape(-1))
    return axes or None


@functools.lru_cache(maxsize=None)
def chain_names(key: str) -> tuple[str, ...]:
    """The names ``reduction(..., key)`` gives the ops after its reduction, in order."""
    return tuple(f"{key}_c{i}" for i in range(1, CHAIN_DEPTH + 1))


def restored_mean(m: Match, key: str, node: gs.Node, ctx: Context, axes: tuple[int, ...]) -> Reject | None:
    """Why the reduction ``node`` and the ops after it (``key_c1``...) do not compute
    mean(t) over ``axes`` with the reduced axes kept as size 1, if they do not.

    Followed symbolically: keepdims=0 drops the axes, Reshape (only inserting or removing axes
    of size 1) and Unsqueeze put them back, Expand broadcasts, Identity passes; a ReduceSum must
    be divided by the number of elements it sums (known statically), a ReduceMean by nothing.
    """
    chain = [m.nodes[name] for name in chain_names(key) if name in m.nodes]
    keep = int(node.attrs.get("keepdims", 1)) == 1
    label = f"{node.op} {G.node_label(node)}"
    if not chain and keep and node.op != REDUCE_SUM:
        return None
    in_dims = ctx.symbolic_shape(node.inputs[0])
    if in_dims is None or any(not 0 <= a < len(in_dims) for a in axes):
        what = "has keepdims=0 and the" if not keep else "is reshaped, and the"
        return Reject(f"{label} {what} shape of its input is unknown", node)
    dims = [1 if i in axes else d for i, d in enumerate(in_dims)] if keep else \
        [d for i, d in enumerate(in_dims) if i not in axes]
    # ``slack``: how far the product of the constant factors may be from 1/N (or 1) only because
    # each was rounded to its dtype (float32(1/768) is 1/768 to within 2^-24 of it); no more.
    scale, slack, t = 1.0, 1e-12, node.outputs[0]
    for step in chain:
        new = _chain_step(step, t, dims, ctx)
        if isinstance(new, str):
            return Reject(f"{label} is followed by {G.node_label(step)}, which {new}", step)
        if isinstance(new, tuple):
            factor, bits = new
            scale *= factor
            slack += 2.0 ** -bits
        else:
            dims = new
        t = step.outputs[0]
    expected = [1 if i in axes else d for i, d in enumerate(in_dims)]
    if dims != expected:
        kept = " has keepdims=0 and" if not keep else ""
        return Reject(f"{label}{kept} gives shape {_show(dims)}, not the input's with the reduced axes as 1 "
                      f"{_show(expected)}", node)
    count = [in_dims[a] for a in axes]
    n = int(np.prod(count)) if all(isinstance(d, int) for d in count) else None
    if node.op == REDUCE_SUM and n is None:
        return Reject(f"{label} sums dims {_show(count)} of unknown size: its divisor cannot be checked", node)
    want = 1.0 / n if node.op == REDUCE_SUM else 1.0
    if abs(scale - want) <= slack * want:
        return None
    if key == "var" and n is not None and n > 1 and abs(scale - want * n / (n - 1)) <= 1e-6 * want:
        return Reject(f"the variance is multiplied by N/(N-1) = {n}/{n - 1}: Bessel's correction (torch.var with "
                      "correction=1), not the biased variance a normalization uses", node)
    what = "mean" if node.op != REDUCE_SUM else f"sum of {n} elements"
    return Reject(f"{label} is a {what} scaled by {scale:.9g}, not a mean", node)


def _chain_step(step: gs.Node, t: gs.Tensor, dims: list, ctx: Context):
    """The dims after ``step`` (a list), its constant scale factor with the precision (bits) of
    the constant's dtype (a tuple), or why it is not a step that keeps a mean a mean (a str)."""
    if step.inputs[0] is not t:
        return "does not read it first"
    if step.op == "Identity":
        return list(dims)
    if step.op in ("Div", "Mul"):
        value = ctx.const(step.inputs[1]) if len(step.inputs) == 2 else None
        if value is None or value.size != 1 or not is_float(value.dtype):
            return "is not a division or product by a float constant"
        if value.ndim > len(dims):
            return f"has a constant of rank {value.ndim}, more than the {len(dims)} of what it scales"
        factor = scalar(value)
        if step.op == "Div" and factor == 0:
            return "divides by 0"
        return (1.0 / factor if step.op == "Div" else factor), float_bits(value.dtype)
    if step.op == "Unsqueeze":
        axes = step.attrs.get("axes")
        if axes is None and len(step.inputs) == 2:
            axes = ctx.const(step.inputs[1])
        if axes is None:
            return "has axes unknown before run time"
        rank = len(dims) + np.size(axes)
        out = list(dims)
        for a in sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)):
            out.insert(a, 1)
        return out
    target = ctx.dims_value(step.inputs[1], {id(t): dims}) if len(step.inputs) == 2 else None
    if target is None:
        return "has a target shape unknown before run time"
    if step.op == "Expand":
        out = _broadcast(dims, target)
        return out if out is not None else f"expands to {_show(target)}, which need not broadcast with {_show(dims)}"
    out = _reshaped(dims, target, int(step.attrs.get("allowzero", 0)))
    if out is None or [d for d in out if d != 1] != [d for d in dims if d != 1]:
        return f"reshapes {_show(dims)} to {_show(target)}, not only adding or removing axes of size 1"
    return out


def _broadcast(a: list, b: list) -> list | None:
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + list(a), [1] * (n - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return out


def _reshaped(dims: list, target: list, allowzero: int) -> list | None:
    out = [dims[i] if d == 0 and not allowzero and i < len(dims) else d for i, d in enumerate(target)]
    if out.count(-1) == 1 and len(out) == len(dims) and \
            all(d == -1 or d == e for d, e in zip(out, dims)):
        return list(dims)  # every other dim kept in place: the -1 is the one left
    if out.count(-1) == 1:
        rest = [d for d in out if d != -1]
        if not all(isinstance(d, int) for d in rest + list(dims)):
            return None
        total, known = int(np.prod(dims)), int(np.prod(rest))
        if known == 0 or total % known:
            return None
        out = [total // known if d == -1 else d for d in out]
    return None if any(isinstance(d, int) and d < 0 for d in out) else out


def _show(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def through_cast(t: gs.Tensor) -> gs.Tensor:
    node = G.producer(t)
    return node.inputs[0] if node is not None and node.op == CAST and node.inputs else t
