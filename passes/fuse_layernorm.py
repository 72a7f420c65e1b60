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
  Keras 3 ``x*s + ((-mean)*s + beta)``; gamma and beta optional. On NHWC models tf2onnx moves
  the layout's Transposes through it: the statistics over axes A of the NCHW tensor x with
  Transpose(x, p) scaled, 1/std and -mean moved along by Reshapes, is fused on Transpose(x, p)
  over the axes p puts A at (the Transpose stays) when each Reshape is that Transpose of its
  statistic; over axes that are not trailing (Keras' LayerNormalization over C, now axis 1 of
  NCHW) the op runs between a Transpose that moves them last and one back.
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
(ConvNeXt's channels-first LayerNorm over axis 1 of NCHW) are left alone, except in the TF form.
"""
from __future__ import annotations

import dataclasses

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
            m = N.plan(norm, ctx, axis, N.match_affine(norm.output, ctx, N.least_rank(norm), shape, tensors=True))
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
        base = E.scope_of(m["mean"]) + LAYER_NORMALIZATION
        perm = m.info.get("perm")
        if perm is None:
            return E.emit_over_axis(LAYER_NORMALIZATION, m, ctx, base)
        # Normalized axes not trailing (tf2onnx's NCHW LayerNorm over channels): the op runs
        # between a Transpose that moves them last and the Transpose back.
        x, out = m.tensors["input"], m.output
        shape = ctx.shape(x)
        moved = None if shape is None else [shape[p] if isinstance(shape[p], (int, str)) and shape[p] != "" else None
                                            for p in perm]
        first = gs.Variable(ctx.names.fresh(f"{x.name}_normalized_last"), dtype=ctx.dtype(x), shape=moved)
        normed = gs.Variable(ctx.names.fresh(f"{out.name}_normalized_last"), dtype=ctx.dtype(out), shape=moved)
        inner = m.evolve(output=normed, tensors={**m.tensors, "input": first})
        back = [perm.index(i) for i in range(len(perm))]
        return [gs.Node("Transpose", ctx.names.fresh(f"{base}_to_last"), {"perm": list(perm)}, [x], [first]),
                *E.emit_over_axis(LAYER_NORMALIZATION, inner, ctx, base),
                gs.Node("Transpose", ctx.names.fresh(f"{base}_back"), {"perm": back}, [normed], [out])]


_ANCHORS = ("Div", "Mul", "Add", "Sub")


def _unexplained_mean(mean: gs.Node, ctx: Context) -> Reject | None:
    """A mean subtracted from its own input is normalization-shaped: when no LayerNorm this pass
    knows (matched at a node below, which then gets the record) includes it, say so."""
    sub = S.centred_by(mean)
    if sub is None or S.site_explained(mean, _ANCHORS, (N.MEAN_CORE, N.TF_VIEWED_CORE), ctx):
        return None
    return Reject(f"{mean.op} {G.node_label(mean)} is subtracted from its input ({G.node_label(sub)}), but what "
                  f"follows is no LayerNorm this pass knows: the centred tensor '{sub.outputs[0].name}' feeds "
                  f"{S.downstream_ops(sub.outputs[0])}", mean)


def _match_tf(node: gs.Node, ctx: Context):
    m = match(N.TF_VIEWED_CORE, node.outputs[0], ctx.graph, ctx.const)
    if m is None:
        return None
    if not N.tf_scaled_alike(m):
        return None  # x and the mean scaled by different tensors: not one normalization
    if m.has("x_view"):   # tf2onnx's Transpose of x stays (others may read it): the fused op reads its output
        m = m.evolve(matched=[n for n in m.matched if n is not m["x_view"]])
    norm = N.check_core(m, ctx, "mean", statistics=True)
    if isinstance(norm, Reject):
        return norm
    norm.variant.append("TF/Keras")
    viewed = _views(norm.match, norm, ctx)
    if isinstance(viewed, Reject):
        return viewed
    x, axes, perm = viewed
    rank = norm.rank
    if x is norm.x and perm is None:
        where = N.trailing(norm, ctx)
        if isinstance(where, Reject):
            return where
        axis, shape = where
    else:
        dims = ctx.shape(x)
        if dims is None or len(dims) != rank:
            return Reject(f"shape of '{x.name}', the tensor the LayerNorm scales, is unknown", node)
        order = perm or list(range(rank))
        axis, shape = -len(axes), tuple(dims[a] for a in order[rank - len(axes):])
    tail = N.Affine(node.outputs[0])
    for key in ("gamma", "beta"):
        if key in m.values:
            value = m.values[key]
            if perm is not None:
                value = _moved_param(value, rank, axes, perm)
                if isinstance(value, str):
                    return Reject(f"{key} '{m.tensors[key].name}' {value}", node)
            shaped = N.broadcast_param(value, norm.rank, shape)
            if isinstance(shaped, str):
                return Reject(f"{key} '{m.tensors[key].name}' {shaped}", node)
            setattr(tail, "scale" if key == "gamma" else "bias", shaped)
    if x is not norm.x:
        norm = dataclasses.replace(norm, x=x, variant=[*norm.variant, "transposed input"])
    if perm is not None:
        norm = dataclasses.replace(norm, variant=[*norm.variant, "normalized axes moved last"])
    out = N.plan(norm, ctx, axis, tail)
    if perm is not None:
        values = dict(out.values)
        if tail.scale is None:   # ones of the moved normalized dims (``plan`` took x's own last ones)
            values["scale"] = np.ones(shape, np.float32)
        out = out.evolve(values=values, info={**out.info, "perm": perm})
    return out, norm


def _views(m: Match, norm: N.Normalized, ctx: Context):
    """(the tensor the fused op normalizes, its normalized axes, the perm that moves them last or
    None when they are trailing), or why the TF form's views do not describe one normalization.

    tf2onnx's NHWC LayerNorm: the statistics over axes A of x, x scaled as x' = Transpose(x, p)
    (``x_view``), 1/std and -mean moved along by Reshapes (``inv_view``, ``neg_view``). Exact
    when every statistic that meets x' is that Transpose of it (the same shape, its kept axes in
    the same order: a Reshape then moves the same elements); x' is then normalized over the
    axes p puts A at. Axes that are not trailing are moved last by a Transpose around the fused
    op (the channels of an NCHW tensor)."""
    rank, y = norm.rank, norm.x
    views = [m[k] for k in ("x_view", "inv_view", "neg_view") if m.has(k)]
    if rank is None:
        return Reject(f"rank of input '{y.name}' is unknown")
    if views and any(k in m.tensors for k in ("stat_mean", "stat_inv_std")):
        return Reject("the mean or 1/std is also used outside the LayerNorm, and the normalized tensor is a "
                      f"transposed view of '{y.name}'", views[0])
    stats_used = any(k in m.tensors for k in ("stat_mean", "stat_inv_std"))
    p, x = list(range(rank)), y
    if m.has("x_view"):
        view = m["x_view"]
        given = view.attrs.get("perm")
        p = list(range(rank - 1, -1, -1)) if given is None else [int(a) for a in given]
        if sorted(p) != list(range(rank)):
            return Reject(f"Transpose {G.node_label(view)} has perm {p}, not one of rank {rank}", view)
        x = view.outputs[0]
    if views:
        dims = ctx.symbolic_shape(y)
        if dims is None:
            return Reject(f"shape of input '{y.name}' is unknown: the moved statistics cannot be checked", views[0])
        stat = [1 if i in norm.axes else d for i, d in enumerate(dims)]
        moved = [stat[a] for a in p]
        kept = [a for a in p if a not in norm.axes]
        # What meets x': 1/std and -mean (or the mean) through their Reshapes, or as they are.
        for key, what in (("inv_view", "1/std"), ("neg_view", "mean")):
            view = m.nodes.get(key)
            got = stat if view is None else _reshaped(
                stat, ctx.dims_value(view.inputs[1], {id(view.inputs[0]): stat}),
                int(view.attrs.get("allowzero", 0)))
            if got != moved or kept != sorted(kept):
                where = f"Reshape {G.node_label(view)} of the {what}" if view is not None else f"the {what}"
                return Reject(f"{where} is not the Transpose {p} that the input goes through (shape "
                              f"{_show(got)}, expected {_show(moved)})", view or m["mean"])
    axes = tuple(i for i in range(rank) if p[i] in norm.axes)
    if N.trailing_axis(axes, rank) is not None:
        return x, axes, None
    if stats_used:
        return Reject(f"normalizes axes {list(axes)} of a rank-{rank} input, not its trailing axes, and its mean or "
                      "1/std is also used outside: the op's Mean / InvStdDev would be in the moved layout", m["mean"])
    shape = ctx.shape(x)
    if shape is None or any(not isinstance(shape[a], int) for a in axes):
        return Reject(f"normalizes axes {list(axes)} of '{x.name}', not its trailing axes, and their sizes are not "
                      "static: the Transpose that would move them last cannot be checked", m["mean"])
    return x, axes, [i for i in range(rank) if i not in axes] + list(axes)


def _reshaped(dims: list, target: list | None, allowzero: int = 0) -> list | None:
    """The shape a Reshape of ``dims`` to ``target`` gives (0 copies a dim unless ``allowzero``,
    one -1 is inferred: by arithmetic on static dims, else by cancelling equal dims), None when it
    cannot be told."""
    if target is None:
        return None
    out = [dims[i] if d == 0 and not allowzero and i < len(dims) else d for i, d in enumerate(target)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        rest = [d for d in out if d != -1]
        if all(isinstance(d, int) for d in dims + rest):
            total, known = int(np.prod(dims)), int(np.prod(rest))
            if known <= 0 or total % known:
                return None
            out[out.index(-1)] = total // known
            return out
        pool = [d for d in dims if d != 1]
        for d in rest:
            if d == 1:
                continue
            if d not in pool:
                return None
            pool.remove(d)
        if all(isinstance(d, int) for d in pool):
            fill = int(np.prod(pool)) if pool else 1
        elif len(pool) == 1:
            fill = pool[0]
        else:
            return None
        out[out.index(-1)] = fill
    return out


def _show(shape) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _moved_param(value, rank: int, axes: tuple, perm: list):
    """A gamma/beta given in the layout of the tensor the fused op normalizes, moved by ``perm``
    (normalized ``axes`` last); why not when it varies over other axes."""
    value = np.asarray(value)
    if value.ndim > rank:
        return f"has rank {value.ndim}, more than the input's {rank}"
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(full.shape[i] != 1 for i in range(rank) if i not in axes):
        return f"of shape {list(value.shape)} varies over non-normalized axes"
    return np.transpose(full, perm)


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
