"""Fuse decomposed RMS normalization into the standard RMSNormalization (opset 23).

Over the trailing axes a.. of x (rank r, axis = a - r):

    y = x / sqrt(mean(x^2) + eps) * w  =  RMSNormalization(x, w, axis, epsilon)

Supported spellings (the core's own variants are listed in ``_norm``):

* the square as ``Pow(x, 2)`` or ``Mul(x, x)``; ``Div(x, rms)``, ``Mul(x, Reciprocal(rms))`` or
  ``Mul(x, Div(1, rms))`` (HF LLaMA/T5 ``x * torch.rsqrt(var + eps)`` in TorchScript and dynamo);
* the weight Mul on either side, optional (the scale is then ones), reached through a Cast:
  ``[Cast] Mul(w)``; Gemma's ``(1 + w)`` with w constant is folded into a new constant;
* Cast-wrapped float16/bfloat16 (statistics in float32, Cast back before or after the weight);
* the mean of squares with keepdims=0 put back (dynamo), axes computed from the rank (ONNX's
  RMSNormalization-23 function body: ``Range(rank + axis, rank, 1)``), symbolic normalized dims,
  a weight computed at run time of exactly the normalized shape.

Every square feeding a mean that no such RMSNorm includes (and that is not a LayerNorm's
variance) gets a skip record naming what follows it.

The fused op runs in the widest type among input, output and weight, with stash_type float32
(float64 for float64). RMSNormalization exists from opset 23 only (``SimplifiedLayerNormalization``
is onnxruntime's contrib op, never emitted); older models are upgraded by the pipeline.

Not fused: a mean-centred input (that is a LayerNorm, left to fuse-layernorm, which runs first),
reductions over non-trailing axes, exponent other than 2, non-constant epsilon, and
intermediates used outside the pattern.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.pattern import Match
from normopt.pipeline import Context, Pass, Reject
from normopt.registry import register_pass
from normopt.passes import _emit as E, _norm as N, _sites as S

RMS_NORMALIZATION = "RMSNormalization"


@register_pass("fuse-rmsnorm")
class FuseRmsNorm(Pass):
    """Fuse decomposed RMSNorm subgraphs (LLaMA, T5, Gemma; Cast-wrapped fp16/bf16) into RMSNormalization."""

    anchor_ops = ("Div", "Mul", "Pow")
    late_ops = ("Pow",)  # a square no RMSNorm below explains: only Rejects
    opset = 23

    def match(self, node: gs.Node, ctx: Context) -> Match | Reject | None:
        if not G.in_default_domain(node):
            return None
        norm = N.match_rms_normalized(node.outputs[0], ctx) if node.op != "Pow" else None
        if norm is None:
            return _unexplained_square(node, ctx)
        if isinstance(norm, Reject):
            return norm
        centred = _mean_centred(norm.match.tensors["x"])
        if centred:
            return Reject(f"input '{centred}' is mean-centred (x - mean(x)): a LayerNorm, "
                          "left to fuse-layernorm", norm.match["var"])
        where = N.trailing(norm, ctx)
        if isinstance(where, Reject):
            return where
        axis, shape = where
        tail = N.match_affine(norm.output, ctx, N.least_rank(norm), shape, with_bias=False, tensors=True)
        return E.settle_dtype(N.plan(norm, ctx, axis, tail), ctx)

    def rewrite(self, m: Match, ctx: Context) -> list[gs.Node]:
        return E.emit_over_axis(RMS_NORMALIZATION, m, ctx, E.scope_of(m["var"]) + RMS_NORMALIZATION)


def _unexplained_square(square: gs.Node, ctx: Context) -> Reject | None:
    """A square feeding a mean is normalization-shaped: when no RMSNorm this pass knows (matched
    at a node below, which then gets the record) includes it, say so. The square of a
    mean-centred tensor is a variance: fuse-layernorm gives that site its record."""
    mean = S.squared_into_mean(square)
    if mean is None or _mean_centred(square.inputs[0]) or \
            S.site_explained(square, ("Div", "Mul"), (N.RMS_CORE,), ctx):
        return None
    return Reject(f"{square.op} {G.node_label(square)} squares '{square.inputs[0].name}' into {mean.op} "
                  f"{G.node_label(mean)}, but what follows is no RMSNorm this pass knows: the mean feeds "
                  f"{S.downstream_ops(mean.outputs[0])}", square)


def _mean_centred(x: gs.Tensor) -> str | None:
    """The name of ``x`` (or of what a Cast made it from) when it is ``x - mean(x)``."""
    for t in (x, *(p.inputs[0] for p in [G.producer(x)] if p is not None and p.op == N.CAST)):
        if S.centring_mean(t) is not None:
            return t.name
    return None
