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
in the widest of the input, output and the core's compute type, with Casts around it where they
differ (a float16 model whose statistics were computed in float32 keeps them in float32).
The per-channel affine and the emission are the family's (``_affine``, ``_emit``), shared with
fuse-groupnorm.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normopt.passes._emit import INSTANCE_NORM, channel_work_dtype, emit_normalization
from normopt.passes._norm import (MEAN_CORE, Affine, Normalized, affine_params, channel_affine, epsilon_miss,
                                  match_normalized, normalize_axes)
from normopt.pattern import Match, plausible
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass
from normopt.tensors import static_dim


# ------------------------------------------------------------------------------ evidence of channels

def varies_per_channel(tail: Affine, ctx: Context, channels: int | None, rank: int) -> bool:
    """Whether an absorbed parameter has a real channel axis ([C, 1, ...], C > 1), rather
    than a scalar: evidence that the tensor is channels-first [N, C, ...]."""
    if not channels or channels < 2:
        return False
    for node in tail.nodes:
        if node.op not in ("Mul", "Add"):
            continue
        for operand in node.inputs:
            value = ctx.const(operand, from_shapes=False)
            if value is not None and rank - 1 <= value.ndim <= rank and value.shape[value.ndim - rank + 1] == channels:
                return True
    return False


# ------------------------------------------------------------------------------ the pass

@register_pass("fuse-instancenorm")
class FuseInstanceNorm(Pass):
    """Fuse decomposed instance normalization (statistics over all spatial axes) into InstanceNormalization."""

    anchor_ops = ("Div", "Mul")  # the last op of a normalization core
    opset = 6

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        t = node.outputs[0]
        if not plausible(MEAN_CORE, t):
            return None  # not the end of a normalization core: no shape lookups for it
        shape = ctx.checked_shape(t)
        if isinstance(shape, Reject):
            # Only a candidate when the core matches: then the axes cannot be placed.
            return shape if isinstance(match_normalized(t, ctx), Normalized) else None
        rank = None if shape is None else len(shape)
        if rank is None or rank < 3:
            return None
        channels = static_dim(shape, 1)
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
        miss = epsilon_miss(core.epsilon)
        if miss:
            return miss
        if channels is None:
            return Reject(f"channel count of '{core.x.name}' is unknown")
        m = Match(output=tail.output)
        for n in core.match.matched + tail.nodes:
            m.add(n)
        work = channel_work_dtype(ctx, core.x, tail.output, core.compute_bits, INSTANCE_NORM, m.matched)
        if isinstance(work, Reject):
            return work
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
