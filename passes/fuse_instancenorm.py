"""Fuse decomposed instance normalization into InstanceNormalization.

For x of shape [N, C, D1, ..., Dk] (rank >= 3), with mean and variance taken per sample and
channel over every spatial axis (2 .. rank-1):

    y = gamma[c] * (x - mean(x)) / sqrt(var(x) + eps) + beta[c]
      = InstanceNormalization(x, gamma, beta, epsilon=eps)          (opset 6: never an upgrade)

Supported variants (the mean/variance core is the shared one of ``_norm``): Pow(d, 2) or
Mul(d, d); Div(d, std), Mul(d, Reciprocal(std)) or Mul(d, Div(1, std)); ReduceMean axes as an
attribute or an input, negative or not; Cast-wrapped cores (statistics in float32 for a float16
model); gamma / beta of shape [C, 1, ...], [1, C, 1, ...] or a scalar, through Unsqueeze or Cast
of a constant; either or both absent.

What is left to fuse-layernorm (returns "not a candidate", no skip record): a rank-3 core with no
per-channel scale or bias (on [B, S, D] reducing axis 2 it is a LayerNorm without affine, and
calling it an instance norm would mislead runtimes), and cores followed by a constant that varies
over spatial axes (LayerNorm over [H, W]). With a per-channel [C, 1, ...] parameter present, the
same near misses are skipped with a reason: reduction over some spatial axes only, a scale or
bias that is not per channel, an unknown channel count.

Emission keeps the precision of the original: InstanceNormalization has no stash_type, so it runs
in the wider of the core's compute type and the output type, with Casts around it when they
differ (a float16 model whose statistics were computed in float32 keeps them in float32).
``emit_normalization`` is shared with fuse-groupnorm.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.passes._norm import (Affine, float_bits, match_affine, match_normalized,
                                  normalize_axes, param_value)
from normopt.pattern import Match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass

INSTANCE_NORM = "InstanceNormalization"
CAST = "Cast"
DEFAULT_EPSILON = 1e-5  # InstanceNormalization's and GroupNormalization's default
# numpy float dtype per significand width (``Normalized.compute_bits``).
DTYPE_BY_BITS = {53: np.dtype(np.float64), 24: np.dtype(np.float32), 11: np.dtype(np.float16)}


# ------------------------------------------------------------------------------ shared with groupnorm

def channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    """The shape a per-channel parameter broadcasts to, for ``match_affine``: [C, 1, ...]."""
    return (channels,) + (1,) * (rank - 2)


def channel_affine(t: gs.Tensor, ctx: Context, channels: int | None, rank: int) -> Affine:
    """The constant per-channel Mul/Add after ``t`` (none when the channel count is unknown)."""
    if channels is None:
        return Affine(t)
    return match_affine(t, ctx, rank, channel_shape(channels, rank))


def varies_per_channel(tail: Affine, ctx: Context, channels: int | None, rank: int) -> bool:
    """Whether an absorbed parameter has a real channel axis ([C, 1, ...], C > 1), rather
    than a scalar: evidence that the tensor is channels-first [N, C, ...]."""
    if not channels or channels < 2:
        return False
    for node in tail.nodes:
        if node.op not in ("Mul", "Add"):
            continue
        for operand in node.inputs:
            value = param_value(operand, ctx.graph)
            if value is not None and rank - 1 <= value.ndim <= rank and value.shape[value.ndim - rank + 1] == channels:
                return True
    return False


def static_dim(shape, axis: int) -> int | None:
    if shape is None or len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def settle_dtype(ctx: Context, x: gs.Tensor, out: gs.Tensor, compute_bits: int | None,
                 op: str) -> np.dtype | Reject:
    """The type the fused op runs in, so that nothing is rounded more than in the original.

    GroupNormalization keeps its statistics in stash_type: the widest of input and output
    suffices. InstanceNormalization has no stash type: it also needs the core's compute type.
    Statistics computed in a type narrower than both input and output (float16 inside a
    float32 model) would be computed more precisely once fused, beyond the output's tolerance.
    """
    x_type, out_type = ctx.dtype(x), ctx.dtype(out)
    if float_bits(x_type) is None or float_bits(out_type) is None:
        unknown = x if float_bits(x_type) is None else out
        return Reject(f"dtype of '{unknown.name}' is unknown or not a float type")
    if compute_bits is not None and compute_bits < min(float_bits(x_type), float_bits(out_type)):
        return Reject(f"statistics are computed in {DTYPE_BY_BITS.get(compute_bits, compute_bits)}, narrower "
                      f"than input {np.dtype(x_type).name} and output {np.dtype(out_type).name}")
    types = [np.dtype(x_type), np.dtype(out_type)]
    if op == INSTANCE_NORM and compute_bits in DTYPE_BY_BITS:
        types.append(DTYPE_BY_BITS[compute_bits])
    return max(types, key=float_bits)


def affine_params(tail: Affine, channels: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """[C] scale and bias (ones / zeros where absent) in ``dtype``."""
    scale = np.ones(channels) if tail.scale is None else np.asarray(tail.scale).reshape(-1)
    bias = np.zeros(channels) if tail.bias is None else np.asarray(tail.bias).reshape(-1)
    # Widening a float parameter is exact; narrowing never happens (dtype is the widest involved).
    return scale.astype(dtype), bias.astype(dtype)


def emit_normalization(ctx: Context, op: str, attrs: dict, x: gs.Tensor, out: gs.Tensor,
                       scale: np.ndarray, bias: np.ndarray, work, base: str) -> list[gs.Node]:
    """``op(x, scale, bias)`` computed in ``work``, producing ``out``: Casts are added where
    ``x`` or ``out`` have another type."""
    nodes = []
    x_dtype, out_dtype = ctx.dtype(x), ctx.dtype(out)
    if x_dtype != work:
        cast_in = gs.Variable(ctx.names.fresh(f"{base}_input_cast"), dtype=work)
        nodes.append(_cast(ctx, base, x, cast_in, work))
        x = cast_in
    result = out
    if out_dtype != work:
        result = gs.Variable(ctx.names.fresh(f"{base}_normalized"), dtype=work)
    s = G.make_constant(ctx.names, f"{base}_scale", scale)
    b = G.make_constant(ctx.names, f"{base}_bias", bias)
    nodes.append(gs.Node(op, ctx.names.fresh(f"{base}/{op}"), attrs, [x, s, b], [result]))
    if result is not out:
        nodes.append(_cast(ctx, base, result, out, out_dtype))
    return nodes


def _cast(ctx: Context, base: str, src: gs.Tensor, dst: gs.Tensor, dtype) -> gs.Node:
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return gs.Node(CAST, ctx.names.fresh(f"{base}/Cast"), {"to": to}, [src], [dst])


# ------------------------------------------------------------------------------ the pass

@register_pass("fuse-instancenorm")
class FuseInstanceNorm(Pass):
    """Fuse decomposed instance normalization (statistics over all spatial axes) into InstanceNormalization."""

    anchor_ops = ("Div", "Mul")  # the last op of a normalization core
    opset = 6

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        t = node.outputs[0]
        rank = ctx.rank(t)
        if rank is None or rank < 3:
            return None
        channels = static_dim(ctx.shape(t), 1)
        tail = channel_affine(t, ctx, channels, rank)
        evidence = varies_per_channel(tail, ctx, channels, rank)
        if not evidence and (rank < 4 or tail.kept):
            return None  # LayerNorm-shaped: fuse-layernorm's
        core = match_normalized(t, ctx)
        if core is None or (isinstance(core, Reject) and not evidence):
            return None
        if isinstance(core, Reject):
            return core
        spatial = tuple(range(2, rank))
        axes = normalize_axes(core.axes, rank)
        if axes != spatial:
            # Over the channel axis it is a (channels-first) LayerNorm: fuse-layernorm's.
            if not evidence or axes is None or not set(axes) < set(spatial):
                return None
            return Reject(f"mean and variance are taken over axes {list(axes)}, "
                          f"not over all spatial axes {list(spatial)}", core.match["mean"])
        if tail.kept:
            return Reject(f"{tail.kept}: not per channel")
        if channels is None:
            return Reject(f"channel count of '{core.x.name}' is unknown")
        work = settle_dtype(ctx, core.x, tail.output, core.compute_bits, INSTANCE_NORM)
        if isinstance(work, Reject):
            return work
        m = Match(output=tail.output)
        for n in core.match.matched + tail.nodes:
            m.add(n)
        escapes = m.escapes(ctx.graph)
        if escapes:
            return Reject(f"intermediate {escapes[0]}")
        m.tensors["x"] = core.x
        m.values["scale"], m.values["bias"] = affine_params(tail, channels, work)
        m.info.update(epsilon=core.epsilon, channels=channels, rank=rank, dtype=work.name,
                      variant=core.variant + [f"{n.op} affine" for n in tail.nodes if n.op in ("Mul", "Add")])
        return m

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        return emit_normalization(ctx, INSTANCE_NORM, {"epsilon": float(m.info["epsilon"])}, m.tensors["x"],
                                  m.output, m.values["scale"], m.values["bias"], np.dtype(m.info["dtype"]),
                                  m.output.name)
