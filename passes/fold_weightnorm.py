"""Fold weight normalization, ``w = g * v / ||v||``, into one constant weight.

``torch.nn.utils.weight_norm`` and ``torch.nn.utils.parametrizations.weight_norm`` keep a
direction ``v`` and a gain ``g`` and recompute the weight on every call. Exports that do not
constant-fold (TorchScript with ``do_constant_folding=False``, dynamo with ``optimize=False``)
leave the computation in the graph, in front of every Conv / Gemm / MatMul that uses it:

    n = ||v||  over every axis but ``dim`` (keepdims)       w = g * v / n

With v and g constant, w is a constant: it is computed once, in float64, and cast back to the
type of the original w (exact up to that final rounding, which the original also does, step by
step). The result is a Constant node writing w's tensor, so the passes after this one
(fold-batchnorm) see a constant weight.

Accepted spellings:
* the norm as ``ReduceL2(v, axes)`` (axes as attribute or input, also computed from constants:
  dynamo's ``Reshape(Constant, Constant)``), ``Sqrt(ReduceSum(v^2))`` (Pow or Mul square),
  ``Sqrt(ReduceSumSquare(v))``, or
  ``LpNormalization(v, axis, p=2)`` (a norm over one axis: all axes but ``dim`` of a 2-D v);
* the product in any order and association of Mul, Div and Reciprocal: ``(v / n) * g``,
  ``v * (g / n)``, ``(v * g) / n``, ``v * g * Reciprocal(n)``, ...;
* ``dim`` any axis (wav2vec2's positional convolution uses dim=2), or no axis at all (the norm
  of the whole tensor, ``dim=None``).

Near misses, left alone with the reason: a norm over other axes than all-but-one, keepdims=0,
LpNormalization with p != 2, a gain that is not a constant or varies over other axes than
``dim``, a factor multiplied in and divided out again (``(v * c) / (n * c)``: a zero in c is
0/0 there, and a c of higher rank broadcasts the weight), a Pow exponent other than 2, v or an
intermediate also used elsewhere (v shared with another consumer that computes the same weight
norm is fine: each use is folded).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.pattern import Match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass

REDUCE_L2, SQRT, LP_NORM = "ReduceL2", "Sqrt", "LpNormalization"
PRODUCT_OPS = ("Mul", "Div", "Reciprocal")
MAX_STEPS = 4  # Mul / Div / Reciprocal nodes between the norm and the weight
# Monomial keys of the direction and its norm; a gain is keyed by its tensor's name (a string):
# tuples, so that no tensor name (a constant named "v", say) can be taken for either.
V, N = ("v",), ("n",)


@dataclass
class Norm:
    """``out = ||v||`` over ``axes`` (or, for LpNormalization, ``out = v / ||v||``)."""

    v: gs.Tensor
    value: np.ndarray
    axes: tuple[int, ...]
    nodes: list[gs.Node]
    out: gs.Tensor
    normalized: bool = False  # LpNormalization: the output is already v / ||v||
    keepdims: bool = True


@dataclass
class Site:
    norm: Norm
    output: gs.Tensor
    gain: gs.Tensor | None
    nodes: list[gs.Node] = field(default_factory=list)


def _float(dtype) -> bool:
    return dtype is not None and (np.dtype(dtype).kind == "f" or "bfloat16" in str(dtype))


def _axes(node: gs.Node, ctx: Context, rank: int) -> tuple[int, ...] | None:
    """Reduce axes as written (attribute, or constant input), every axis when absent."""
    if "axes" in node.attrs:
        axes = np.asarray(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.const(node.inputs[1], from_shapes=False)
        if axes is None:
            return None
    else:
        return tuple(range(rank)) if not int(node.attrs.get("noop_with_empty_axes", 0)) else ()
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if not axes:
        return tuple(range(rank)) if not int(node.attrs.get("noop_with_empty_axes", 0)) else ()
    if any(not -rank <= a < rank for a in axes):
        return None
    return tuple(sorted({a % rank for a in axes}))


def find_norm(node: gs.Node, ctx: Context) -> Norm | Reject | None:
    """The norm of a constant that ``node`` computes; None when it is no such norm."""
    if not G.in_default_domain(node) or not node.inputs:
        return None
    if node.op in (REDUCE_L2, LP_NORM):
        v = node.inputs[0]
        value = ctx.const(v, from_shapes=False)
        if value is None:
            return None
        if node.op == LP_NORM:
            p = int(node.attrs.get("p", 2))
            if p != 2:
                return Reject(f"LpNormalization of '{v.name}' has p={p}, not 2")
            axis = int(node.attrs.get("axis", -1))
            if not -value.ndim <= axis < value.ndim:
                return Reject(f"LpNormalization axis {axis} is out of range for '{v.name}'")
            return Norm(v, value, (axis % value.ndim,), [node], node.outputs[0], normalized=True)
        axes = _axes(node, ctx, value.ndim)
        if axes is None:
            return Reject(f"ReduceL2 of '{v.name}' has no constant axes")
        return Norm(v, value, axes, [node], node.outputs[0], keepdims=bool(int(node.attrs.get("keepdims", 1))))
    if node.op == SQRT:
        total = G.producer(node.inputs[0])
        if total is None or total.op not in ("ReduceSum", "ReduceSumSquare") or not G.in_default_domain(total):
            return None
        if total.op == "ReduceSumSquare":
            v = total.inputs[0]
            value = ctx.const(v, from_shapes=False)
            if value is None:
                return None
            axes = _axes(total, ctx, value.ndim)
            if axes is None:
                return Reject(f"ReduceSumSquare of '{v.name}' has no constant axes")
            return Norm(v, value, axes, [total, node], node.outputs[0],
                        keepdims=bool(int(total.attrs.get("keepdims", 1))))
        sq = G.producer(total.inputs[0])
        if sq is None or not G.in_default_domain(sq) or not sq.inputs:
            return None
        v = sq.inputs[0]
        if sq.op == "Mul" and len(sq.inputs) == 2 and sq.inputs[1] is v:
            pass
        elif sq.op == "Pow" and len(sq.inputs) == 2:
            value = ctx.const(v, from_shapes=False)
            exponent = ctx.const(sq.inputs[1], from_shapes=False)
            if value is None:
                return None
            if exponent is None or exponent.size != 1 or float(np.asarray(exponent, np.float64).reshape(-1)[0]) != 2.0:
                return Reject(f"Pow of '{v.name}' under the norm has exponent "
                              f"{'non-constant' if exponent is None else exponent.reshape(-1).tolist()}, not 2")
        else:
            return None
        value = ctx.const(v, from_shapes=False)
        if value is None:
            return None
        axes = _axes(total, ctx, value.ndim)
        if axes is None:
            return Reject(f"ReduceSum of '{v.name}' squared has no constant axes")
        return Norm(v, value, axes, [sq, total, node], node.outputs[0],
                    keepdims=bool(int(total.attrs.get("keepdims", 1))))
    return None


class _Monomials:
    """Tensors as products of powers of v, n and constant gains, through Mul / Div / Reciprocal."""

    def __init__(self, norm: Norm, ctx: Context):
        self.norm, self.ctx = norm, ctx
        self.known: dict[int, dict] = {id(norm.out): ({V: 1, N: -1} if norm.normalized else {N: 1})}
        self.nodes: list[gs.Node] = []
        self.leaves: dict[str, gs.Tensor] = {}
        self.missing: gs.Tensor | None = None  # a non-constant operand met
        self.cancelled: dict[int, str] = {}      # id(node) -> a factor whose powers cancel there

    def of(self, t: gs.Tensor, depth: int = 0) -> dict | None:
        if id(t) in self.known:
            return self.known[id(t)]
        if t is self.norm.v:
            return {V: 1}
        if self.ctx.const(t, from_shapes=False) is not None:
            self.leaves[t.name] = t
            return {t.name: 1}
        node = G.producer(t)
        if node is None or depth > MAX_STEPS or node.op not in PRODUCT_OPS or not G.in_default_domain(node):
            self.missing = self.missing or t
            return None
        parts = [self.of(i, depth + 1) for i in node.inputs[:2 if node.op != "Reciprocal" else 1]]
        if any(p is None for p in parts):
            return None
        out = _combine(node.op, parts)
        if node.op != "Reciprocal":
            sign = -1 if node.op == "Div" else 1
            for k, e in parts[1].items():
                if parts[0].get(k, 0) * sign * e < 0:   # c * v / (c * n): c's values still count there
                    self.cancelled[id(node)] = "v" if k == V else "||v||" if k == N else f"'{k}'"
        self.known[id(t)] = out
        self.nodes.append(node)
        return out


def _combine(op: str, parts: list[dict]) -> dict:
    if op == "Reciprocal":
        return {k: -e for k, e in parts[0].items()}
    sign = -1 if op == "Div" else 1
    out = dict(parts[0])
    for k, e in parts[1].items():
        out[k] = out.get(k, 0) + sign * e
    return {k: e for k, e in out.items() if e}


def _is_weight(mono: dict) -> bool:
    gains = [k for k in mono if k not in (V, N)]
    return mono.get(V) == 1 and mono.get(N) == -1 and len(gains) <= 1 and all(mono[k] == 1 for k in gains)


def find_site(norm: Norm, ctx: Context) -> Site | Reject:
    """Walk down from the norm through Mul / Div / Reciprocal to the last tensor that is
    ``g * v / n`` (or ``v / n``)."""
    monos = _Monomials(norm, ctx)
    t, best = norm.out, None
    if norm.normalized:
        best = (t, {V: 1, N: -1}, [])
    for _ in range(MAX_STEPS):
        if G.is_graph_output(ctx.graph, t) or len(t.outputs) != 1:
            if best is None and (G.is_graph_output(ctx.graph, t) or t.outputs):
                first = {id(t.outputs[0])} if t.outputs and t.outputs[0].op in PRODUCT_OPS else set()
                return Reject(f"intermediate '{t.name}' is also used by "
                              f"{', '.join(sorted(set(G.other_uses(t, ctx.graph, first))))}")
            break
        user = t.outputs[0]
        if user.op not in PRODUCT_OPS or not G.in_default_domain(user) or not user.outputs:
            break
        mono = monos.of(user.outputs[0])
        if mono is None:
            break
        t = user.outputs[0]
        if _is_weight(mono):
            best = (t, mono, list(monos.nodes))
    if best is None or (len(best[1]) == 2 and monos.missing is not None):
        if monos.missing is not None:
            return Reject(f"'{monos.missing.name}' multiplying the normalized weight is not a constant")
        return Reject(f"the norm of '{norm.v.name}' does not divide it into a weight g * v / ||v||")
    out, mono, nodes = best
    cancel = next((monos.cancelled[id(n)] for n in nodes if id(n) in monos.cancelled), None)
    if cancel is not None:
        # Dropping the factor would drop what it does: a zero in it makes 0/0 (NaN) there, and a
        # constant of higher rank broadcasts the weight to its shape.
        return Reject(f"{cancel} is multiplied in and divided out again on the way to '{out.name}': "
                      "not a plain weight norm g * v / ||v||")
    gains = [k for k in mono if k not in (V, N)]
    return Site(norm, out, monos.leaves[gains[0]] if gains else None, nodes)


@register_pass("fold-weightnorm")
class FoldWeightNorm(Pass):
    """Fold weight normalization g * v / ||v|| (constant v and g) into one constant weight."""

    anchor_ops = (REDUCE_L2, SQRT, LP_NORM)

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        norm = find_norm(node, ctx)
        if norm is None or isinstance(norm, Reject):
            return norm
        site = find_site(norm, ctx)
        if isinstance(site, Reject):
            return site
        found = self._check(site, ctx)
        if isinstance(found, Reject):
            return found
        dim, gain = found
        m = Match(output=site.output)
        for n in norm.nodes + site.nodes:
            m.add(n)
        escapes = m.escapes(ctx.graph)
        if escapes:
            return Reject(f"intermediate {escapes[0]}")
        shared = self._shared(site, m, ctx)
        if shared:
            return Reject(shared)
        dtype = ctx.dtype(site.output) or norm.value.dtype
        if not _float(dtype):
            return Reject(f"weight '{site.output.name}' has non-float dtype {np.dtype(dtype).name}")
        m.tensors["v"] = norm.v
        if site.gain is not None:
            m.tensors["g"] = site.gain
        m.values["v"], m.values["g"] = norm.value, gain
        m.info.update(dim=dim, axes=list(norm.axes), shape=list(norm.value.shape), dtype=np.dtype(dtype).name,
                      variant=[node.op] + ([] if site.gain is not None else ["no gain"]))
        return m

    @staticmethod
    def _check(site: Site, ctx: Context):
        """(dim, gain value) when the norm is over all axes but ``dim`` and g varies over dim only."""
        norm, rank = site.norm, site.norm.value.ndim
        if not _float(norm.value.dtype):
            return Reject(f"v '{norm.v.name}' has non-float dtype {norm.value.dtype}")
        # (LpNormalization normalizes one axis: that is all axes but one only for a 2-D v.)
        rest = sorted(set(range(rank)) - set(norm.axes))
        if len(rest) > 1:
            return Reject(f"the norm of '{norm.v.name}' {list(norm.value.shape)} is over axes {list(norm.axes)}, "
                          f"not all axes but one")
        dim = rest[0] if rest else None
        # keepdims=0 drops the reduced axes: the norms still line up with v's slices when
        # ``dim`` is the last axis (or there is none), not otherwise.
        if not norm.keepdims and dim not in (None, rank - 1):
            return Reject(f"the norm of '{norm.v.name}' has keepdims=0: its [{norm.value.shape[dim]}] values do not "
                          f"broadcast along dim {dim} of v")
        gain = np.ones(()) if site.gain is None else ctx.const(site.gain, from_shapes=False)
        if not _float(gain.dtype):
            return Reject(f"gain '{site.gain.name}' has non-float dtype {gain.dtype}")
        if gain.ndim > rank:
            return Reject(f"gain '{site.gain.name}' has rank {gain.ndim}, more than v's {rank}")
        aligned = (1,) * (rank - gain.ndim) + tuple(gain.shape)
        for axis, size in enumerate(aligned):
            if size != 1 and (axis != dim or size != norm.value.shape[axis]):
                return Reject(f"gain '{site.gain.name}' of shape {list(gain.shape)} varies over axis {axis} of v "
                              f"{list(norm.value.shape)}" + ("" if dim is None else f", not only over dim {dim}"))
        return dim, gain.reshape(aligned)

    @staticmethod
    def _shared(site: Site, m: Match, ctx: Context) -> str | None:
        """Why v cannot be folded here: another user of v that is not the same weight norm."""
        v = site.norm.v
        if G.is_graph_output(ctx.graph, v):
            return f"v '{v.name}' is also a graph output"
        inside = {id(n) for n in m.matched}
        for user in v.outputs:
            if id(user) in inside or _same_weight_norm(user, site, ctx):
                continue
            return f"v '{v.name}' is also used by {G.node_label(user)}, which is not the same weight norm"
        return None

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        v = np.asarray(m.values["v"], np.float64)
        axes = tuple(m.info["axes"])
        norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
        weight = (np.asarray(m.values["g"], np.float64) * v / norm).astype(np.dtype(m.info["dtype"]))
        const = G.make_constant(ctx.names, f"{m.output.name}_weightnorm", weight)
        name = ctx.names.fresh(f"{m.output.name}/weightnorm")
        return [gs.Node("Constant", name, {"value": const}, [], [m.output])]


def _same_weight_norm(user: gs.Node, site: Site, ctx: Context) -> bool:
    """Whether ``user`` of v belongs to another computation of the same weight (same v, same
    axes, same gain): each of them is folded on its own."""
    candidates = [user] + [G.producer(i) for i in user.inputs if G.producer(i) is not None]
    for out in user.outputs:
        candidates += [n for n in out.outputs]
    for node in candidates:
        if node is None or node.op not in (REDUCE_L2, SQRT, LP_NORM, "ReduceSum"):
            continue
        if node.op == "ReduceSum":
            node = next((n for n in node.outputs[0].outputs if n.op == SQRT), None)
            if node is None:
                continue
        if node in site.norm.nodes:
            continue
        norm = find_norm(node, ctx)
        if not isinstance(norm, Norm) or norm.v is not site.norm.v or norm.axes != site.norm.axes:
            continue
        other = find_site(norm, ctx)
        if isinstance(other, Site) and (other.gain is site.gain or (
                other.gain is not None and site.gain is not None and
                np.array_equal(ctx.const(other.gain, from_shapes=False), ctx.const(site.gain, from_shapes=False)))):
            return True
    return False
