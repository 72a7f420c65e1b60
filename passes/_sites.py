"""Normalization-shaped sites: a mean subtracted from its own input (fuse-layernorm) and a
square feeding a mean (fuse-rmsnorm). Each one ends applied or skipped with a reason: when no
pattern matched at a node below it includes it, the pass skips the site itself, naming what
follows it.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from normopt import graph as G, tensors as T
from normopt.passes._affine import CAST, scalar
from normopt.passes._reduce import CHAIN_DEPTH, CHAIN_OPS, MEAN_OPS, REDUCTIONS, through_cast
from normopt.pattern import match
from normopt.pipeline import Context

# How far below a normalization-shaped site its fused-op anchor may be (nodes visited).
_SITE_REACH = 24


def site_explained(site: gs.Node, anchors: tuple[str, ...], patterns, ctx: Context) -> bool:
    """Whether one of ``patterns`` matched at an ``anchors`` node below ``site`` includes it:
    that anchor then gets the site's record (applied, or skipped with a reason)."""
    seen, todo = set(), [site]
    while todo and len(seen) < _SITE_REACH:
        node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node is not site and node.op in anchors and G.in_default_domain(node) and node.outputs:
            for pattern in patterns:
                found = match(pattern, node.outputs[0], ctx.graph, ctx.const)
                if found is not None and any(n is site for n in found.matched):
                    return True
        for out in node.outputs:
            todo.extend(out.outputs)
    return False


def centred_by(mean: gs.Node) -> gs.Node | None:
    """The Sub that subtracts ``mean`` (through the ops of CHAIN_OPS) from the mean's own input."""
    x, t = mean.inputs[0] if mean.inputs else None, mean.outputs[0] if mean.outputs else None
    for _ in range(CHAIN_DEPTH + 1):
        if t is None:
            return None
        sub = next((u for u in t.outputs if u.op == "Sub" and len(u.inputs) == 2 and u.inputs[1] is t
                    and through_cast(u.inputs[0]) is through_cast(x)), None)
        if sub is not None:
            return sub
        chain = [u for u in t.outputs if u.op in CHAIN_OPS and u.inputs and u.inputs[0] is t]
        t = chain[0].outputs[0] if len(chain) == 1 and chain[0].outputs else None
    return None


def centring_mean(t: gs.Tensor) -> gs.Node | None:
    """The reduction ``m`` when ``t`` is ``Sub(a, m)`` with ``m`` a mean of ``a`` (through the
    ops of CHAIN_OPS, and Casts on either side), else None."""
    sub = G.producer(t)
    if sub is None or sub.op != "Sub" or len(sub.inputs) != 2:
        return None
    m = G.producer(sub.inputs[1])
    for _ in range(CHAIN_DEPTH + 1):
        if m is None or not m.inputs:
            return None
        if m.op in REDUCTIONS:
            return m if through_cast(m.inputs[0]) is through_cast(sub.inputs[0]) else None
        if m.op not in CHAIN_OPS + (CAST,):
            return None
        m = G.producer(m.inputs[0])
    return None


def squared_into_mean(node: gs.Node) -> gs.Node | None:
    """The ReduceMean that ``node`` (Pow(t, c) or Mul(t, t)) feeds, directly or through a Cast."""
    if node.op == "Mul" and (len(node.inputs) != 2 or node.inputs[0] is not node.inputs[1]):
        return None
    if node.op not in ("Mul", "Pow") or not node.outputs:
        return None
    if node.op == "Pow" and (len(node.inputs) != 2 or scalar_or_none(node.inputs[1]) != 2.0):
        return None
    users = list(node.outputs[0].outputs)
    users += [u for c in users if c.op == CAST for u in c.outputs[0].outputs]
    return next((u for u in users if u.op in MEAN_OPS and G.in_default_domain(u)), None)


def scalar_or_none(t: gs.Tensor) -> float | None:
    """The one value of a constant (through Cast), else None."""
    value = T.const_value(t)
    return scalar(value) if value is not None else None


def downstream_ops(t: gs.Tensor) -> str:
    return ", ".join(sorted({G.node_label(u) for u in t.outputs})) or "nothing"
