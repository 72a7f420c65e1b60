"""Fuse decomposed group normalization into GroupNormalization (opset 21, per-channel scale).

For x of shape [N, C, D1, ...] and G groups dividing C, a reshape to [N, G, ...] puts channels
g*C/G .. (g+1)*C/G - 1 of sample n (row-major) in row (n, g). Normalizing every row over all its
axes (2 ..) and reshaping back to x's shape is group normalization:

    y = gamma[c] * (x - mean_g(x)) / sqrt(var_g(x) + eps) + beta[c]
      = GroupNormalization-21(x, gamma[C], beta[C], num_groups=G, epsilon=eps, stash_type=1)

When G == C it is InstanceNormalization(x, gamma, beta), which is emitted instead (opset 6,
no upgrade, a native kernel in onnxruntime).

Supported variants (alternatives of one match):
* the group statistics as InstanceNormalization(s[G], b[G]) (TorchScript export of nn.GroupNorm
  at every opset, dynamo export below opset 21: s, b are ones / zeros; other constants are folded
  per channel, gamma[c] * s[g] and gamma[c] * b[g] + beta[c] for channel c in group
  g = c // (C/G)) or as the shared mean/variance core of ``_norm`` (hand-written and
  diffusers-style GroupNorm: Pow or Mul square, Div or Reciprocal, axes attribute or input), with
  an optional float Cast on either side of it;
* GroupNorm(C, C) whose reshape back the dynamo optimizer dropped: Reshape [0, C, -1] of a rank-3
  x (a no-op) -> InstanceNormalization -> per-channel Mul / Add (wav2vec2's feature extractor);
* Keras GroupNormalization (axis=-1, tf2onnx): x [N, ..., C] reshaped to [N, ..., G, C/G],
  statistics over every axis but N and G (tf.nn.moments, or Keras 3's E[x^2] - E[x]^2),
  x*s + (beta - mean*s) with s = gamma / sqrt(var + eps), gamma / beta [G, C/G], reshaped back
  by Shape(x) or tf2onnx's int32 arithmetic on the shape; emitted between a Transpose to
  channels first and one back, the first left out when x is tf2onnx's Transpose of an NCHW
  tensor (the two cancel: the op reads that tensor). With axis=1 ([N, G, C/G, ...], gamma /
  beta [G, C/G, 1, ...]) it is the plain channels-first op;
* the reshape to groups as [0, G, -1], [N, G, -1], [N, G, C/G, D1, ...], a Concat of
  Shape/Gather/Slice/Unsqueeze pieces, or [-1, G, ...] with static trailing dims;
* the reshape back from Shape(x), a constant, a Concat of x's dims, or 0 / -1 entries;
* gamma / beta per channel ([C, 1, ...], [1, C, 1, ...], a scalar, Unsqueeze of a [C] constant),
  either or both absent; a SiLU (Sigmoid, Mul) after it stays outside as it was, and so does a
  Mul / Add whose constant is not per channel (the per-channel part before it is absorbed).
* ONNX's own GroupNormalization-21 function body as onnx's inliner expands it: Cast(x) to the
  stash type reshaped to [N, G, C/G, D1, ...] then to [0, 0, -1] (the split is two Reshapes; the
  Cast goes with the match when it widens), E[x^2] - E[x]^2 statistics (``_norm``), reshaped
  back to Shape(Cast(x)), then to [N, C, -1] rows, Cast back, Mul / Add by scale and bias
  reshaped to [1, C, 1], Reshape to Shape(Cast(x)). The same affine on rows straight after the
  statistics ([N, G, -1] -> [N, C, -1] -> Mul / Add [C, 1] -> Reshape(Shape(x))) too. An
  affine on rows computed in a wider type than x and y makes the op run in that type;
* input rank 3 (audio), 4 (images), 5 (video), and any G dividing C.

Skipped with a reason: a reshape that does not keep the batch axis or does not make a constant
number of groups, G not dividing C, a reshape back that does not restore x's shape,
InstanceNormalization scale/bias that are not constants (or not one per group), statistics not
over whole groups, a Cast to an integer type inside the match, an epsilon the float32 attribute
cannot hold, a declared shape of x that contradicts inference, intermediates used elsewhere, a
reshape to [N, C, -1] rows straight after the statistics whose affine is not per channel or that
no reshape back to x's shape follows. After GroupNormalization-21's reshape back to x's shape, such
rows stay after the fused op as they were (the reason is the match's ``kept``).

Target op and opset: GroupNormalization-18 takes scale/bias per group and GroupNormalization-21
per channel (onnx/onnx#5466). Only the opset-21 form is emitted, with ``required_opset`` 21 (the
pipeline upgrades older models): the opset-18 form is deprecated and onnx's checker rejects it
at opsets 18-20 ("Op registered for GroupNormalization is deprecated"), so even where it would
be exact (per-group gamma/beta) it would make the model invalid.

Runtime cost: onnxruntime has no GroupNormalization kernel; it expands the ONNX function body
(bench/bench_groupnorm.py measures it against the TorchScript form, which runs onnxruntime's
InstanceNormalization kernel). The body computes var = mean(x^2) - mean(x)^2 in the stash type,
which loses precision when |mean| >> std within a group: on CPU, groups of 64 elements with
mean/std = 10 differ from a float64 reference by 3e-5 (1e-3 at 100), where the original
InstanceNormalization stays within 1.3e-6 (6.5e-6). Verification on real inputs flags it where it
exceeds the tolerances.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.passes._emit import INSTANCE_NORM, channel_work_dtype, emit_normalization
from normopt.passes._norm import (TF_CORE, Affine, affine_params, broadcast_param, cast_target, channel_affine,
                                  check_core, epsilon_miss, float_bits, is_float, match_normalized, normalize_axes,
                                  side_computations, sole_consumer, tf_scaled_alike)
from normopt.pattern import Match, match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass
from normopt.tensors import DimOf, static_dim

CAST = "Cast"
DEFAULT_EPSILON = 1e-5  # InstanceNormalization's and GroupNormalization's default
GROUP_NORM = "GroupNormalization"
RESHAPE = "Reshape"
GROUP_NORM_OPSET = 21  # per-channel scale/bias
INSTANCE_NORM_OPSET = 6
STASH_FLOAT, STASH_DOUBLE = 1, 11  # TensorProto.FLOAT / DOUBLE


# ------------------------------------------------------------------------------ shapes

def keeps_batch(grouped: list, x: gs.Tensor, ctx: Context) -> bool:
    """Whether the reshape to ``grouped`` keeps x's batch axis first."""
    if ctx.same_dim(grouped[0], x, 0):
        return True
    # [-1, G, ...] with every other dim static: the -1 is N when the sizes per sample agree.
    rest = [ctx.resolve(d) for d in grouped[1:]]
    shape = ctx.known_shape(x) or ()
    per_sample = [static_dim(shape, i) for i in range(1, len(shape))]
    return (grouped[0] == -1 and all(isinstance(d, int) and d > 0 for d in rest) and
            None not in per_sample and int(np.prod(rest)) == int(np.prod(per_sample)))


# ------------------------------------------------------------------------------ the statistics

@dataclass
class Core:
    """Normalization of the grouped tensor ``x`` over ``axes`` (None: every axis from 2)."""

    x: gs.Tensor
    epsilon: float
    nodes: list[gs.Node] = field(default_factory=list)
    axes: tuple[int, ...] | None = None
    compute_bits: int | None = None
    variant: list[str] = field(default_factory=list)
    # InstanceNormalization's own per-group scale and bias ([G]) when they are not ones / zeros.
    group_scale: np.ndarray | None = None
    group_bias: np.ndarray | None = None
    # TF / Keras form: gamma and beta of the grouped tensor (None where absent), else None.
    tf_params: dict | None = None
    tf_names: dict = field(default_factory=dict)
    # Per-channel scale and bias inside the reshapes ([C], float64), from the TF form's.
    channel_scale: np.ndarray | None = None
    channel_bias: np.ndarray | None = None


def group_core(t: gs.Tensor, ctx: Context) -> Core | Reject | None:
    node = G.producer(t)
    if node is not None and node.op == INSTANCE_NORM and G.in_default_domain(node):
        return _instance_norm_core(node, ctx)
    found = match_normalized(t, ctx)
    if found is None or isinstance(found, Reject):
        return found
    return Core(found.x, found.epsilon, list(found.match.matched), found.axes, found.compute_bits,
                found.variant)


def tf_group_core(t: gs.Tensor, ctx: Context) -> Core | Reject | None:
    """The TF / Keras statistics of a grouped tensor, with its grouped gamma / beta."""
    m = match(TF_CORE, t, ctx.graph)
    if m is None:
        return None
    if not tf_scaled_alike(m):
        return None  # x and the mean scaled by different tensors: not one normalization
    norm = check_core(m, ctx, "mean")
    if isinstance(norm, Reject):
        return norm
    core = Core(norm.x, norm.epsilon, list(norm.match.matched), norm.axes, norm.compute_bits,
                norm.variant + ["TF/Keras"])
    core.tf_params = {k: m.values.get(k) for k in ("gamma", "beta")}
    core.tf_names = {k: m.tensors[k].name for k in ("gamma", "beta") if k in m.tensors}
    return core


def _instance_norm_core(node: gs.Node, ctx: Context) -> Core | Reject:
    """InstanceNormalization of the grouped tensor: statistics over every axis from 2, in its type."""
    # The per-group scale/bias multiply before the per-channel affine: fusing anything but an
    # identity would drop them (folding them is exact only in real arithmetic, not in float).
    params = []
    for index, name in ((1, "scale"), (2, "bias")):
        value = ctx.const(node.inputs[index], from_shapes=False)
        if value is None:
            return Reject(f"InstanceNormalization {name} '{node.inputs[index].name}' "
                          f"{G.not_constant(node.inputs[index], ctx.graph)}", node)
        if not is_float(value.dtype):
            return Reject(f"InstanceNormalization {name} has non-float dtype {value.dtype}", node)
        params.append(np.asarray(value))
    eps = float(node.attrs.get("epsilon", DEFAULT_EPSILON))
    core = Core(node.inputs[0], eps, [node], None, float_bits(ctx.dtype(node.inputs[0])), ["InstanceNormalization"])
    scale, bias = params
    if not (np.all(scale == 1.0) and np.all(bias == 0.0)):
        core.group_scale, core.group_bias = scale, bias
        core.variant.append("per-group scale/bias")
    return core


def _not_float_cast(cast: gs.Node | None, ctx: Context) -> Reject | None:
    """A Cast inside the match must be float to float: a Cast to an integer type rounds the
    normalized values, which the fused op would not."""
    if cast is None:
        return None
    source, target = ctx.dtype(cast.inputs[0]), cast_target(cast)
    for what, dtype in (("to", target), ("from", source)):
        if dtype is not None and not is_float(dtype):
            return Reject(f"Cast {G.node_label(cast)} {what} {np.dtype(dtype).name} inside the group "
                          "normalization is not a float cast", cast)
    return None


def _fold_group_params(core: Core, tail: Affine, channels: int, groups: int, work) -> tuple[np.ndarray, np.ndarray]:
    """[C] scale and bias of the fused op: the per-channel affine after the reshape back, with
    InstanceNormalization's per-group scale s[g] and bias b[g] folded in (float64 math):
    gamma[c] * (s[g(c)] * n + b[g(c)]) + beta[c], channel c in group g(c) = c // (C / G)."""
    gamma, beta = affine_params(tail, channels, np.float64)
    if core.channel_scale is not None:  # the TF form's gamma / beta, already per channel
        s, b = core.channel_scale, core.channel_bias
    elif core.group_scale is not None:
        per_group = channels // groups
        widen = (lambda v: np.repeat(np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (groups,)), per_group))
        s, b = widen(core.group_scale), widen(core.group_bias)
    else:
        return gamma.astype(work), beta.astype(work)
    return (gamma * s).astype(work), (gamma * b + beta).astype(work)


def _split_chain(split: gs.Node, back: gs.Node | None, ctx: Context, cast_ok: bool):
    """(x, first Reshape, float Cast of x before it or None) when the reshape to groups is two
    Reshapes of x that the reshape back restores: ONNX's GroupNormalization-21 body reshapes
    Cast(x, stash_type) to [N, G, C/G, D1, ...], then to [0, 0, -1] (reshapes in a row are the
    last one). None otherwise (the split alone is the reshape to groups)."""
    if back is None:
        return None
    t = split.inputs[0]
    inner = G.producer(t)
    if inner is None or inner.op != RESHAPE or not G.in_default_domain(inner) or sole_consumer(t, ctx) is not split:
        return None
    source = inner.inputs[0]
    x, cast = through_cast(source)
    if cast is not None:
        # Only a widening (or same-type) float Cast read by the reshape and by Shape goes with the
        # match: the fused op computes its statistics in stash_type from x itself.
        src_type, to = ctx.dtype(x), cast_target(cast)
        widening = is_float(src_type) and is_float(to) and float_bits(to) >= float_bits(src_type)
        readers = all(u is inner or (u.op == "Shape" and G.in_default_domain(u)) for u in source.outputs)
        if not (cast_ok and widening and readers) or G.is_graph_output(ctx.graph, source):
            x, cast = source, None
    shape = ctx.known_shape(x)
    if shape is None:
        return None
    dims = ctx.reshape_dims(inner, [DimOf(x, i) for i in range(len(shape))])
    grouped = None if dims is None else ctx.reshape_dims(split, dims)
    if grouped is None or not ctx.restores(ctx.reshape_dims(back, grouped), x):
        return None
    return x, inner, cast


def _per_channel_rows(dims: list | None, x: gs.Tensor, ctx: Context, rank: int) -> bool:
    """Whether a reshape of x to ``dims`` is [N, C, -1]: each channel's elements in one row."""
    if dims is None or len(dims) != 3 or not ctx.same_dim(dims[0], x, 0) or not ctx.same_dim(dims[1], x, 1):
        return False
    if dims[2] == -1 or (rank == 3 and ctx.same_dim(dims[2], x, 2)):
        return True
    shape = ctx.known_shape(x)
    spatial = [static_dim(shape, i) for i in range(2, rank)]
    return None not in spatial and ctx.resolve(dims[2]) == int(np.prod(spatial))


def _rows_affine(ctx: Context, x: gs.Tensor, back: gs.Node, channels: int, rank: int):
    """After the reshape back to x's shape: Reshape to [N, C, -1] -> [float Cast] -> per-channel
    Mul / Add ([C, 1] or [1, C, 1]) -> [float Cast] -> Reshape to x's shape (ONNX's
    GroupNormalization-21 body). (affine, its nodes in order, output); None when no such
    reshape to rows follows; a string (why) when one does but the rest is not that."""
    t = back.outputs[0]
    flat = sole_consumer(t, ctx)
    if flat is None or flat.op != RESHAPE or not G.in_default_domain(flat) or flat.inputs[0] is not t:
        return None
    rows = ctx.reshape_dims(flat, [DimOf(x, i) for i in range(rank)])
    if not _per_channel_rows(rows, x, ctx, rank):
        return None
    found = _rows_tail(ctx, x, flat, rows, channels)
    return f"reshape {G.node_label(flat)} to [N, C, -1] kept after the op: {found}" if isinstance(found, str) else found


def _rows_tail(ctx: Context, x: gs.Tensor, flat: gs.Node, rows: list, channels: int):
    """After ``flat``, a reshape to [N, C, -1] (dims ``rows``): [float Cast] -> per-channel
    Mul / Add -> [float Cast] -> Reshape to x's shape. (affine, nodes from ``flat`` on, output),
    or why not (a string)."""
    tail = channel_affine(flat.outputs[0], ctx, channels, 3)
    end, nodes = tail.output, [flat, *tail.nodes]
    nxt = sole_consumer(end, ctx)
    if nxt is not None and nxt.op == CAST and G.in_default_domain(nxt) and is_float(cast_target(nxt)) and \
            is_float(ctx.dtype(end)):
        nodes.append(nxt)
        end = nxt.outputs[0]
        nxt = sole_consumer(end, ctx)
    if nxt is None or nxt.op != RESHAPE or not G.in_default_domain(nxt) or nxt.inputs[0] is not end or \
            not ctx.restores(ctx.reshape_dims(nxt, rows), x):
        return tail.kept or (f"{G.node_label(nxt)} follows, not a reshape back to the shape of '{x.name}'"
                             if nxt is not None else f"no reshape back to the shape of '{x.name}' follows")
    nodes.append(nxt)
    return tail, nodes, nxt.outputs[0]


def through_cast(t: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None]:
    """(input of the float Cast producing ``t``, that Cast), or (t, None)."""
    node = G.producer(t)
    if node is not None and node.op == CAST and G.in_default_domain(node):
        return node.inputs[0], node
    return t, None


# ------------------------------------------------------------------------------ the pass

@register_pass("fuse-groupnorm")
class FuseGroupNorm(Pass):
    """Fuse decomposed group normalization (reshape to groups, normalize, reshape back) into GroupNormalization."""

    # The reshape back to x's shape; InstanceNormalization for the form without one.
    anchor_ops = (RESHAPE, INSTANCE_NORM)
    opset = GROUP_NORM_OPSET

    def required_opset(self, m: Match) -> int:
        return GROUP_NORM_OPSET if m.info["op"] == GROUP_NORM else INSTANCE_NORM_OPSET

    def match(self, back: gs.Node, ctx: Context) -> Match | Reject | None:
        if back.op == INSTANCE_NORM:
            return self._match_unwrapped(back, ctx)
        normalized, cast_out = through_cast(back.inputs[0])
        core = group_core(normalized, ctx)
        if core is None:
            core = tf_group_core(normalized, ctx)
        if core is None or isinstance(core, Reject):
            return core
        grouped, cast_in = through_cast(core.x)
        if cast_in is not None and G.producer(grouped) is not None and G.producer(grouped).op == CAST:
            above, inner = through_cast(grouped)
            if G.producer(above) is not None and G.producer(above).op == RESHAPE:
                return _not_float_cast(inner, ctx) or _not_float_cast(cast_in, ctx) or Reject(
                    f"two Casts ({G.node_label(inner)}, {G.node_label(cast_in)}) between the reshape to groups "
                    "and the statistics", inner)
        split = G.producer(grouped)
        if split is None or split.op != RESHAPE or not G.in_default_domain(split):
            return None
        x = split.inputs[0]
        if core.tf_params is not None:
            first = self._tf_channels_first(ctx, x, split, back, core)
            if first is None:
                return self._match_channels_last(ctx, x, split, cast_in, core, cast_out, back)
            if isinstance(first, Reject):
                return first
            found, core = first
            return self._complete(ctx, x, split, cast_in, core, cast_out, back, found)
        chain = _split_chain(split, back, ctx, cast_in is None)
        inner = pre_cast = None
        if chain is not None:
            x, inner, pre_cast = chain
        found = self._groups(x, split, back, core, ctx, inner, rows=True)
        if found is None or isinstance(found, Reject):
            return found
        return self._complete(ctx, x, split, cast_in, core, cast_out, back, found[:3], inner, pre_cast, found[3])

    def _tf_channels_first(self, ctx: Context, x, split, back, core: Core):
        """Keras GroupNormalization(axis=1): x [N, C, ...] reshaped to [N, G, C/G, ...], gamma /
        beta [G, C/G, 1, ...] on the grouped tensor. ((channels, groups, rank), a copy of ``core``
        with the per-channel parameters); None when the reshape does not group axis 1 (channels last)."""
        found = self._groups(x, split, back, core, ctx)
        if not isinstance(found, tuple):
            return None
        channels, groups, rank = found
        grouped = ctx.reshape_dims(split, [DimOf(x, i) for i in range(rank)])
        if len(grouped) != rank + 1 or ctx.resolve(grouped[2]) != channels // groups:
            return None
        norm_shape = (groups, channels // groups) + (1,) * (rank - 2)
        params = {}
        for key, fill in (("gamma", 1.0), ("beta", 0.0)):
            value = core.tf_params.get(key)
            shaped = np.full(norm_shape, fill) if value is None else broadcast_param(value, rank + 1, norm_shape)
            if isinstance(shaped, str):
                return Reject(f"{key} '{core.tf_names[key]}' {shaped}", back)
            params[key] = np.asarray(shaped, np.float64).reshape(-1)
        return found, dataclasses.replace(core, channel_scale=params["gamma"], channel_bias=params["beta"])

    def _match_channels_last(self, ctx: Context, x, split, cast_in, core: Core, cast_out, back):
        """Keras GroupNormalization (axis=-1): x [N, ..., C] reshaped to [N, ..., G, C/G],
        statistics over every axis but N and G, gamma / beta [G, C/G] on the grouped tensor,
        reshaped back. Fused as Transpose to channels first -> the op -> Transpose back."""
        shape = ctx.checked_shape(x)
        if isinstance(shape, Reject):
            return Reject(shape.reason, split)
        if shape is None:
            return Reject(f"rank of '{x.name}' is unknown", split)
        if len(shape) < 3:
            # [rows, F] reshaped to [N, L, F] (tf2onnx's Tensordot for a Dense on rank 3) then a
            # LayerNorm over F: no channels to group here, the LayerNorm is fuse-layernorm's.
            return None
        rank = len(shape)
        channels = static_dim(shape, rank - 1)
        if channels is None:
            return Reject(f"channel count (last axis) of '{x.name}' is unknown", split)
        grouped = ctx.reshape_dims(split, [DimOf(x, i) for i in range(rank)])
        if grouped is None:
            return Reject(f"target shape of reshape {G.node_label(split)} is unknown", split)
        groups, per = (ctx.resolve(d) for d in grouped[-2:]) if len(grouped) == rank + 1 else (None, None)
        lead_ok = len(grouped) == rank + 1 and all(ctx.same_dim(grouped[i], x, i) for i in range(1, rank - 1)) and (
            ctx.same_dim(grouped[0], x, 0) or grouped[0] == -1)
        if not lead_ok or not isinstance(groups, int) or not isinstance(per, int) or groups * per != channels:
            return Reject(f"reshape {G.node_label(split)} does not split the last axis of '{x.name}' into "
                          f"[G, C/G] ([N, ..., G, C/G] expected)", split)
        declared = ctx.checked_shape(core.x)
        if isinstance(declared, Reject) or (declared is not None and len(declared) != rank + 1):
            return Reject(declared.reason if isinstance(declared, Reject) else
                          f"grouped tensor '{core.x.name}' has rank {len(declared)}, not {rank + 1}", split)
        wanted = tuple(range(1, rank - 1)) + (rank,)
        if normalize_axes(core.axes, rank + 1) != wanted:
            return Reject(f"statistics are taken over axes {list(core.axes)} of the grouped tensor, not over each "
                          f"whole group {list(wanted)}", split)
        if not ctx.restores(ctx.reshape_dims(back, grouped), x):
            return Reject(f"reshape {G.node_label(back)} does not restore the shape of '{x.name}'", back)
        for cast in (cast_in, cast_out):
            miss = _not_float_cast(cast, ctx)
            if miss:
                return miss
        miss = epsilon_miss(core.epsilon)
        if miss:
            return Reject(miss.reason, split)
        params = {}
        for key, fill in (("gamma", 1.0), ("beta", 0.0)):
            value = core.tf_params.get(key)
            shaped = np.full((groups, per), fill) if value is None else broadcast_param(value, rank + 1, (groups, per))
            if isinstance(shaped, str):
                return Reject(f"{key} '{core.tf_names[key]}' {shaped}", back)
            params[key] = np.asarray(shaped, np.float64).reshape(-1)
        return _grouped_match(ctx, x, back.outputs[0], core, [split, cast_in, *core.nodes, cast_out, back], cast_in,
                              (groups, channels, rank),
                              lambda work: (params["gamma"].astype(work), params["beta"].astype(work)),
                              {}, {"layout": "channels last", "variant": core.variant})

    def _match_unwrapped(self, inorm: gs.Node, ctx: Context) -> Match | Reject | None:
        """GroupNorm(C, C) with the reshape back dropped: onnxscript's optimizer (dynamo's
        default) removes Reshape(y, Shape(x)) when the reshape to groups [0, C, -1] left a
        rank-3 x as it was (wav2vec2's feature extractor), leaving Reshape -> InstanceNormalization
        -> per-channel Mul / Add."""
        out = inorm.outputs[0]
        for user in out.outputs:
            after = user.outputs[0] if user.op == CAST and user.outputs else None
            if user.op == RESHAPE or (after is not None and any(n.op == RESHAPE for n in after.outputs)):
                return None  # the reshape back is the anchor
        grouped, cast_in = through_cast(inorm.inputs[0])
        split = G.producer(grouped)
        if split is None or split.op != RESHAPE or not G.in_default_domain(split):
            return None
        core = _instance_norm_core(inorm, ctx)
        if isinstance(core, Reject):
            return core
        x = split.inputs[0]
        found = self._groups(x, split, None, core, ctx)
        if found is None or isinstance(found, Reject):
            return found
        return self._complete(ctx, x, split, cast_in, core, None, None, found)

    def _complete(self, ctx: Context, x: gs.Tensor, split: gs.Node, cast_in, core: Core, cast_out, back,
                  found: tuple[int, int, int], inner: gs.Node | None = None,
                  pre_cast: gs.Node | None = None, back_rows: list | None = None) -> Match | Reject:
        """The checks and the match common to both forms (``back`` None: no reshape back;
        ``inner``: a first reshape of the split, ``pre_cast`` a float Cast of x before it;
        ``back_rows``: the dims of a reshape back to [N, C, -1] rather than to x's shape)."""
        channels, groups, rank = found
        miss = epsilon_miss(core.epsilon)
        if miss:
            return Reject(miss.reason, split)
        if core.group_scale is not None and {core.group_scale.size, core.group_bias.size} != {groups}:
            return Reject(f"InstanceNormalization scale/bias have {core.group_scale.size}/{core.group_bias.size} "
                          f"elements, not one per group ({groups})", core.nodes[0])
        for cast in (pre_cast, cast_in, cast_out):
            miss = _not_float_cast(cast, ctx)
            if miss:
                return miss
        if back_rows is not None:
            # [N, G, -1] -> normalized -> [N, C, -1] -> per-channel affine -> x's shape.
            rows = _rows_tail(ctx, x, back, back_rows, channels)
            if isinstance(rows, str):
                return Reject(f"reshape {G.node_label(back)} does not restore the shape of '{x.name}' "
                              f"(to [N, C, -1]: {rows})", back)
            tail, after, out = rows
            rows = (tail, after[1:], out)   # back itself is in the match already
        else:
            rows = _rows_affine(ctx, x, back, channels, rank) if back is not None else None
        variant, extra = list(core.variant), ()
        if isinstance(rows, tuple):
            # ONNX's GroupNormalization-21 body: the affine on [N, C, -1] rows, then reshaped back.
            tail, after, out = rows
            variant.append("per-channel rows")
            # An affine computed in a wider type than the op's would be rounded more once fused.
            extra = tuple(ctx.dtype(n.outputs[0]) for n in tail.nodes if n.op in ("Mul", "Add") and
                          is_float(ctx.dtype(n.outputs[0])))
        else:
            if rows is not None and pre_cast is not None:
                # The flattened rows stay after the op, and so does Shape(Cast(x)) for their
                # reshape back: the op reads the cast tensor.
                x, pre_cast = pre_cast.outputs[0], None
            # A Mul / Add that is not per channel (a positional or spatial tensor) stays after the
            # fused op, as it was (tail.kept says which).
            tail = channel_affine((back or core.nodes[-1]).outputs[0], ctx, channels, rank)
            after, out = tail.nodes, tail.output
            if rows is not None and not tail.kept:
                tail.kept = rows
        return _grouped_match(ctx, x, out, core,
                              [pre_cast, inner, split, cast_in, *core.nodes, cast_out, back, *after],
                              pre_cast or cast_in, (groups, channels, rank),
                              lambda work: _fold_group_params(core, tail, channels, groups, work),
                              {"kept": tail.kept} if tail.kept else {},
                              {"variant": variant + [f"{n.op} affine" for n in tail.nodes if n.op in ("Mul", "Add")]},
                              extra)


    @staticmethod
    def _groups(x: gs.Tensor, split: gs.Node, back: gs.Node, core: Core, ctx: Context, inner: gs.Node | None = None,
                rows: bool = False):
        """(channels, groups, rank) when split (after ``inner``, when the split is two reshapes) /
        back really group x's channels, else a Reject (or None: not a grouping reshape at all).
        With ``rows``, a reshape back to [N, C, -1] is accepted too, and a fourth element gives
        its dims (None when back restores x's shape)."""
        shape = ctx.checked_shape(x)
        if isinstance(shape, Reject):
            return Reject(shape.reason, split)
        rank = None if shape is None else len(shape)
        if rank is None or rank < 2:
            return Reject(f"rank of '{x.name}' is unknown" if rank is None else f"'{x.name}' has rank {rank}", split)
        channels = static_dim(shape, 1)
        if channels is None:
            return Reject(f"channel count of '{x.name}' is unknown", split)
        dims = [DimOf(x, i) for i in range(rank)]
        if inner is not None:
            dims = ctx.reshape_dims(inner, dims)
            if dims is None:
                return Reject(f"target shape of reshape {G.node_label(inner)} is unknown", inner)
        grouped = ctx.reshape_dims(split, dims)
        if grouped is None:
            return Reject(f"target shape of reshape {G.node_label(split)} is unknown", split)
        if len(grouped) < 3:
            return None  # a LayerNorm over a flattened [rows, features] view: fuse-layernorm's
        groups = ctx.resolve(grouped[1])
        if not isinstance(groups, int) or groups < 1 or not keeps_batch(grouped, x, ctx):
            return Reject(f"reshape {G.node_label(split)} does not split the channels of '{x.name}' "
                          f"into groups ([N, G, ...] expected)", split)
        if channels % groups:
            return Reject(f"{groups} groups do not divide {channels} channels", split)
        whole = tuple(range(2, len(grouped)))
        if core.axes is not None and normalize_axes(core.axes, len(grouped)) != whole:
            return Reject(f"statistics are taken over axes {list(core.axes)} of the grouped tensor, "
                          f"not over each whole group {list(whole)}", split)
        if back is None:
            # No reshape back: only a reshape that leaves x as it was (G == C, rank 3) is one.
            return (channels, groups, rank) if groups == channels and ctx.restores(grouped, x) else None
        back_dims = ctx.reshape_dims(back, grouped)
        if ctx.restores(back_dims, x):
            return (channels, groups, rank, None) if rows else (channels, groups, rank)
        if rows and _per_channel_rows(back_dims, x, ctx, rank):
            return channels, groups, rank, back_dims
        return Reject(f"reshape {G.node_label(back)} does not restore the shape of '{x.name}'", back)

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        attrs = {"epsilon": float(m.info["epsilon"])}
        if m.info["op"] == GROUP_NORM:
            attrs.update(num_groups=int(m.info["groups"]), stash_type=int(m.info["stash_type"]))
        x, out = m.tensors["x"], m.output
        if m.info.get("layout") != "channels last":
            return emit_normalization(ctx, m.info["op"], attrs, x, out, m.values["scale"], m.values["bias"],
                                      np.dtype(m.info["dtype"]), out.name)
        rank = int(m.info["rank"])
        normed = gs.Variable(ctx.names.fresh(f"{out.name}_channels_first"), dtype=ctx.dtype(out))
        to_first = [0, rank - 1, *range(1, rank - 1)]
        to_last = [0, *range(2, rank), 1]
        nodes, first = [], _untransposed(x, to_first)
        if first is None:  # else x is a channels-first tensor moved to channels last (tf2onnx's NHWC): read that
            first = gs.Variable(ctx.names.fresh(f"{x.name}_channels_first"), dtype=ctx.dtype(x))
            nodes.append(gs.Node("Transpose", ctx.names.fresh(f"{out.name}/to_channels_first"), {"perm": to_first},
                                 [x], [first]))
        return [*nodes,
                *emit_normalization(ctx, m.info["op"], attrs, first, normed, m.values["scale"], m.values["bias"],
                                    np.dtype(m.info["dtype"]), out.name),
                gs.Node("Transpose", ctx.names.fresh(f"{out.name}/to_channels_last"), {"perm": to_last}, [normed],
                        [out])]


def _untransposed(x: gs.Tensor, perm: list[int]) -> gs.Tensor | None:
    """y when ``x = Transpose(y)`` and transposing x by ``perm`` gives y back (the two cancel)."""
    node = G.producer(x)
    if node is None or node.op != "Transpose" or not G.in_default_domain(node) or not node.inputs:
        return None
    inner = node.attrs.get("perm")
    inner = list(range(len(perm) - 1, -1, -1)) if inner is None else [int(p) for p in inner]
    return node.inputs[0] if len(inner) == len(perm) and all(inner[q] == j for j, q in enumerate(perm)) else None


def _grouped_match(ctx: Context, x: gs.Tensor, out: gs.Tensor, core: Core, nodes: list, cast_in,
                   sizes: tuple[int, int, int], params, before: dict, after: dict, extra=()) -> Match | Reject:
    """The match every grouped form ends with: its nodes, the work dtype (``extra``: further
    types it must hold), no intermediate used elsewhere (but by a side computation that only
    feeds the match: Shape(Cast(x)) of the GroupNormalization-21 body), and ``params(work)`` as
    (scale, bias)."""
    groups, channels, rank = sizes
    op = INSTANCE_NORM if groups == channels else GROUP_NORM
    if op == INSTANCE_NORM and rank is not None and rank < 3:
        # one channel per group of an [N, C] input: InstanceNormalization takes rank 3 and up
        # (onnxruntime refuses [N, C]), and each "group" is one element (the output is beta)
        return Reject(f"{groups} groups of {channels} channels on a rank-{rank} input: InstanceNormalization "
                      "needs rank 3 or more")
    m = Match(output=out)
    for n in nodes:
        if n is not None:
            m.add(n)
    work = channel_work_dtype(ctx, x, out, core.compute_bits, op, m.matched, cast_in, extra)
    if isinstance(work, Reject):
        return work
    for node in side_computations(m, ctx):
        m.add(node)
    escapes = m.escapes(ctx.graph)
    if escapes:
        return Reject(f"intermediate {escapes[0]}")
    m.tensors["x"] = x
    m.values["scale"], m.values["bias"] = params(work)
    m.info.update(before)
    m.info.update(op=op, groups=groups, channels=channels, rank=rank, epsilon=core.epsilon, dtype=work.name,
                  stash_type=STASH_DOUBLE if core.compute_bits == float_bits(np.float64) else STASH_FLOAT)
    m.info.update(after)
    return m
