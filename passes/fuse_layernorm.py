"""Fuse decomposed layer normalization into the standard LayerNormalization (opset 17).

Over the trailing axes a.. of x (rank r, axis = a - r):

    y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta
      = LayerNormalization(x, gamma, beta, axis, epsilon)

Supported spellings (the core's own variants are listed in ``_norm``):

* PyTorch TorchScript below opset 17, dynamo, HF: ReduceMean, Sub, Pow 2, ReduceMean, Add eps,
  Sqrt, Div, then ``[Cast] Mul(gamma) [Cast] Add(beta)``, each optional. Without gamma the scale
  is ones; without beta the LayerNormalization has two inputs. A Mul/Add whose constant varies
  over non-normalized axes (a positional [S, D] Add) stays outside, after the fused op.
* TF/Keras (tf2onnx): ``s = gamma * 1/sqrt(var + eps)``, ``y = x*s + (beta - mean*s)``, and the
  Keras 3 ``x*s + ((-mean)*s + beta)``; gamma and beta optional.
* ONNX's function body of LayerNormalization: ``Flatten(x, a)``, the core over axis 1 with
  ``mean(x*x) - mean(x)^2``, ``Mul(Flatten(gamma))``, ``Add(Flatten(beta))`` or Identity, then
  ``Reshape(Shape(x))``: fused over x itself with axis a.
* dynamo's ``torch.var_mean`` / ``torch.var(unbiased=False)``: reductions with keepdims=0 put
  back by Reshape / Unsqueeze / Expand, the mean as ReduceSum / N (``_norm``); Bessel's N/(N-1)
  is a near miss.
* Normalized dims known only at run time: a constant gamma gives their size; without one the
  scale is ``ConstantOfShape(Shape(x)[axis:], 1)``. A gamma or beta computed at run time (a graph
  input, another node's output) is the op's input when its shape is exactly the normalized one
  (leading 1s squeezed).
* A mean or 1/std also used outside the pattern (or a graph output) becomes the op's ``Mean`` /
  ``InvStdDev`` output, cast from the stash type where the model's type differs.

Every mean subtracted from its own input that no such LayerNorm includes gets a skip record
naming what follows it.

The fused op runs in the widest type among input, output, gamma and beta (Casts added around it
where they differ), with stash_type float32 (float64 for float64), so mixed-precision exports
keep their output type and lose no precision. Reduced axes that are not the trailing ones
(ConvNeXt's channels-first LayerNorm over axis 1 of NCHW) are left alone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.pattern import Match, match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass
from normopt.passes import _emit as E, _norm as N, _sites as S

LAYER_NORMALIZATION = "LayerNormalization"

@register_pass("fuse-layernorm")
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm subgraphs (PyTorch, TF/Keras, ONNX function body) into LayerNormalization."""

    anchor_ops = ("Div", "Mul", "Add", "Sub") + N.MEAN_OPS
    late_ops = N.MEAN_OPS  # sites without a LayerNorm below them: only Rejects
    opset = 17

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        if not G.in_default_domain(node):
            return None
        if node.op in N.MEAN_OPS:
            return _unexplained_mean(node, ctx)
        if node.op in ("Div", "Mul"):
            norm = N.match_normalized(node.outputs[0], ctx, statistics=True)
            if norm is None or isinstance(norm, Reject):
                return norm
            where = N.trailing(norm, ctx)
            if isinstance(where, Reject):
                return where
            axis, shape = where
            m = N.plan(norm, ctx, axis, N.match_affine(norm.output, ctx, norm.rank, shape, tensors=True))
            m = _unflatten(m, ctx)
            cycle = _statistics_feed_params(m)
            if cycle:
                return cycle
        else:
            found = _match_tf(node, ctx)
            if found is None or isinstance(found, Reject):
                return found
            m, _ = found
        return E.settle_dtype(m, ctx)

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        return E.emit_over_axis(LAYER_NORMALIZATION, m, ctx, E.scope_of(m["mean"]) + LAYER_NORMALIZATION)


_ANCHORS = ("Div", "Mul", "Add", "Sub")


def _unexplained_mean(mean: gs.Node, ctx: Context) -> Reject | None:
    """A mean subtracted from its own input is normalization-shaped: when no LayerNorm this pass
    knows (matched at a node below, which then gets the record) includes it, say so."""
    sub = S.centred_by(mean)
    if sub is None or S.site_explained(mean, _ANCHORS, (N.MEAN_CORE, N.TF_CORE), ctx):
        return None
    return Reject(f"{mean.op} {G.node_label(mean)} is subtracted from its input ({G.node_label(sub)}), but what "
                  f"follows is no LayerNorm this pass knows: the centred tensor '{sub.outputs[0].name}' feeds "
                  f"{S.downstream_ops(sub.outputs[0])}", mean)


def _match_tf(node: gs.Node, ctx: Context):
    m = match(N.TF_CORE, node.outputs[0], ctx.graph, ctx.const)
    if m is None:
        return None
    if not N.tf_scaled_alike(m):
        return None  # x and the mean scaled by different tensors: not one normalization
    norm = N.check_core(m, ctx, "mean", statistics=True)
    if isinstance(norm, Reject):
        return norm
    norm.variant.append("TF/Keras")
    where = N.trailing(norm, ctx)
    if isinstance(where, Reject):
        return where
    axis, shape = where
    tail = N.Affine(node.outputs[0])
    for key in ("gamma", "beta"):
        if key in m.values:
            shaped = N.broadcast_param(m.values[key], norm.rank, shape)
            if isinstance(shaped, str):
                return Reject(f"{key} '{m.tensors[key].name}' {shaped}", node)
            setattr(tail, "scale" if key == "gamma" else "bias", shaped)
    return N.plan(norm, ctx, axis, tail), norm


def _unflatten(m: Match, ctx: Context) -> Match:
    """ONNX's function body normalizes Flatten(x, a) over axis 1 and reshapes back to Shape(x):
    a new Match over x itself, axis a, up to the Reshape's output; else ``m`` as it is."""
    x2d = m.tensors["input"]
    if "stat_mean" in m.tensors or "stat_inv_std" in m.tensors:
        return m  # they are 2-D here: the LayerNormalization stays over the flattened input
    flatten = G.producer(x2d)
    if flatten is None or flatten.op != "Flatten" or not G.in_default_domain(flatten) \
            or m.info["axis"] != -1 or ctx.rank(x2d) != 2:
        return m
    passed, reshape = [], N.sole_consumer(m.output, ctx)
    while reshape is not None and reshape.op == "Identity":
        passed.append(reshape)
        reshape = N.sole_consumer(reshape.outputs[0], ctx)
    x = flatten.inputs[0]
    rank = ctx.rank(x)
    if reshape is None or reshape.op != "Reshape" or rank is None or not _is_shape_of(reshape.inputs[1], x, ctx):
        return m
    a = int(flatten.attrs.get("axis", 1))
    a = a + rank if a < 0 else a
    shape = N.static_dims(ctx, x, a - rank) if 0 <= a < rank else None
    inside = {id(n) for n in m.matched}
    if shape is None or "scale" not in m.values or int(np.prod(shape)) != m.values["scale"].size \
            or "bias" in m.tensors or G.other_uses(x2d, ctx.graph, inside):
        return m
    m = m.evolve(output=reshape.outputs[0])
    for node in [flatten, *passed, reshape]:
        m.add(node)
    m.tensors["input"] = x
    m.info["axis"] = a - rank
    for key in ("scale", "bias"):
        if key in m.values:
            m.values[key] = m.values[key].reshape(shape)
    m.info["variant"] = ", ".join(filter(None, [m.info.get("variant"), "function body"]))
    return m


def _is_shape_of(shape: gs.Tensor, x: gs.Tensor, ctx: Context) -> bool:
    node = G.producer(shape)
    if node is not None and node.op == "Shape" and G.in_default_domain(node):
        return node.inputs[0] is x and int(node.attrs.get("start", 0)) == 0 and "end" not in node.attrs
    value = ctx.const(shape)
    dims = ctx.shape(x)
    return value is not None and dims is not None and all(isinstance(d, int) for d in dims) \
        and [int(v) for v in value.reshape(-1)] == list(dims)


# Producers visited when checking that a scale/bias computed at run time does not read the
# mean or 1/std the fused op itself is to write (a cycle).
_ANCESTOR_LIMIT = 256


def _statistics_feed_params(m: Match) -> Reject | None:
    stats = [m.tensors[k] for k in ("stat_mean", "stat_inv_std") if k in m.tensors]
    params = [m.tensors[k] for k in ("scale", "bias") if k in m.tensors]
    if not stats or not params:
        return None
    seen, todo = set(), list(params)
    while todo:
        t = todo.pop()
        if any(t is s for s in stats):
            return Reject(f"a scale or bias computed at run time reads the normalization's own statistic "
                          f"'{t.name}'", m["mean"])
        node = G.producer(t)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _ANCESTOR_LIMIT:
            return Reject("a scale or bias computed at run time has too many producers to check that it does not "
                          "read the normalization's own mean or 1/std", m["mean"])
        todo.extend(node.inputs)
    return None
