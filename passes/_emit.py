"""The fused normalization op and the type it runs in, shared by every norm pass.

The fused op runs in the widest float type among the input, the output and any extra types a
pass names (absorbed scale/bias, InstanceNormalization's statistics): nothing is rounded more
than in the original graph, the input is only ever cast up (unless the original itself rounded
it with a narrowing Cast first), and a Cast after the op restores the output's type.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normopt import graph as G
from normopt.passes._norm import CAST, cast_target, float_bits, precision_miss, sole_consumer
from normopt.pattern import Match
from normopt.pipeline import Context, Reject


INSTANCE_NORM = "InstanceNormalization"
# numpy float dtype per significand width (``Normalized.compute_bits``).
DTYPE_BY_BITS = {53: np.dtype(np.float64), 24: np.dtype(np.float32), 11: np.dtype(np.float16)}


def work_dtype(ctx: Context, x: gs.Tensor, out: gs.Tensor, nodes: list[gs.Node], extra=(),
               input_cast: gs.Node | None = None) -> np.dtype | Reject:
    """The type the fused op computes in, or why no type is exact.

    Any of ``nodes`` computing in a type narrower than the output (float16 statistics in a
    float32 model, a float16 round trip before the affine) would be computed more precisely once
    fused, beyond the output's tolerance: a reject. A narrowing ``input_cast`` (float32 x
    rounded to float16 before the statistics) sets the input type: the fused op sees rounded x.
    """
    x_type, out_type = ctx.dtype(x), ctx.dtype(out)
    if float_bits(x_type) is None or float_bits(out_type) is None:
        unknown = x if float_bits(x_type) is None else out
        return Reject(f"dtype of '{unknown.name}' is unknown or not a float type")
    miss = precision_miss(nodes, ctx, out_type)
    if miss:
        return miss
    cast_type = ctx.dtype(input_cast.outputs[0]) if input_cast is not None else None
    if float_bits(cast_type) is not None and float_bits(cast_type) < float_bits(x_type):
        x_type = cast_type
    return max([np.dtype(x_type), np.dtype(out_type), *map(np.dtype, extra)], key=float_bits)


def emit_fused(ctx: Context, op: str, attrs: dict, x: gs.Tensor, out: gs.Tensor,
               params: dict[str, np.ndarray | gs.Tensor], work, base: str,
               statistics: tuple = (), stash=None) -> list[gs.Node]:
    """[Cast x to ``work``] -> ``op(x, *params)`` in ``work`` -> [Cast to out's type], writing ``out``.

    Every tensor written here carries its shape and dtype (a normalization keeps its input's
    shape), so that the passes that follow (an RMSNorm after a LayerNorm) still know them
    where shape inference could not tell."""
    work = np.dtype(work)
    name = ctx.names.fresh(base)
    nodes = []
    shape = ctx.shape(out) or ctx.shape(x)
    if ctx.dtype(x) != work:
        cast = gs.Variable(ctx.names.fresh(f"{x.name}_{work.name}"), dtype=work, shape=_dims(ctx.shape(x)))
        nodes.append(cast_node(ctx, f"{name}_input_cast", x, cast, work))
        x = cast
    constants = []
    for key, value in params.items():
        if not isinstance(value, gs.Tensor):
            constants.append(G.make_constant(ctx.names, f"{name}_{key}", value.astype(work)))
        elif ctx.dtype(value) != work:   # a scale/bias computed at run time, in another float type
            cast = gs.Variable(ctx.names.fresh(f"{value.name}_{work.name}"), dtype=work, shape=_dims(ctx.shape(value)))
            nodes.append(cast_node(ctx, f"{name}_{key}_cast", value, cast, work))
            constants.append(cast)
        else:
            constants.append(value)
    out_type = ctx.dtype(out)
    result = out if out_type == work else gs.Variable(ctx.names.fresh(f"{out.name}_{work.name}"), dtype=work,
                                                       shape=_dims(shape))
    keep_facts(out, shape, out_type)
    outputs, casts = [result], []
    for i, stat in enumerate(statistics):   # LayerNormalization's Mean, InvStdDev (in ``stash``)
        if stat is None:
            outputs.append(gs.Variable.empty())
        elif ctx.dtype(stat) == np.dtype(stash):
            outputs.append(stat)
        else:
            raw = gs.Variable(ctx.names.fresh(f"{stat.name}_{np.dtype(stash).name}"), dtype=np.dtype(stash),
                              shape=_dims(ctx.shape(stat)))
            outputs.append(raw)
            casts.append(cast_node(ctx, f"{name}_statistic_cast", raw, stat, ctx.dtype(stat)))
    nodes.append(gs.Node(op, name, attrs, [x, *constants], outputs))
    if result is not out:
        nodes.append(cast_node(ctx, f"{name}_output_cast", result, out, out_type))
    return nodes + casts


def keep_facts(tensor: gs.Tensor, shape, dtype) -> None:
    """Give a kept tensor the shape and dtype known before the rewrite, where it declares none."""
    if tensor.shape is None and shape is not None:
        tensor.shape = _dims(shape)
    if tensor.dtype is None and dtype is not None:
        tensor.dtype = np.dtype(dtype)


def _dims(shape) -> list | None:
    """A shape as graphsurgeon writes it: unknown dims as None."""
    return None if shape is None else [d if isinstance(d, (int, str)) and d != "" else None for d in shape]


def cast_node(ctx: Context, base: str, src: gs.Tensor, dst: gs.Tensor, dtype) -> gs.Node:
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return gs.Node(CAST, ctx.names.fresh(base), {"to": to}, [src], [dst])


# ------------------------------------------------------------------------------ over the trailing axes

def settle_dtype(m: Match, ctx: Context) -> Match | Reject:
    """``m`` with the type T the fused op runs in (``work_dtype``) as ``info["dtype"]`` (a new
    Match), or why no type is exact: absorbed scale and bias count too."""
    params = [m.values[k].dtype if k in m.values else ctx.dtype(m.tensors[k])
              for k in ("scale", "bias") if m.info.get(k)]   # absorbed ones only
    dtype = work_dtype(ctx, m.tensors["input"], m.output, m.matched, params)
    if isinstance(dtype, Reject):
        # TorchScript's float16 LayerNorm without affine: mean and d in float16, the rest in
        # double, then only a Cast back to float16. Part of the match is narrower than its
        # (double) output, but not than the Cast's: with the Cast inside, the fused op writes
        # the float16 output, computed at least as precisely as the original.
        cast = sole_consumer(m.output, ctx)
        narrower = cast is not None and cast.op == CAST and G.in_default_domain(cast) and \
            float_bits(cast_target(cast)) is not None and \
            float_bits(cast_target(cast)) < (float_bits(ctx.dtype(m.output)) or 0)
        if not narrower:
            return dtype
        m = m.evolve(output=cast.outputs[0])
        m.add(cast)
        dtype = work_dtype(ctx, m.tensors["input"], m.output, m.matched, params)
        if isinstance(dtype, Reject):
            return dtype
    return m.evolve(info={**m.info, "dtype": dtype.name})


def emit_over_axis(op: str, m: Match, ctx: Context, base: str) -> list[gs.Node]:
    """LayerNormalization / RMSNormalization of a match made by ``_norm.plan`` and ``settle_dtype``."""
    dtype = np.dtype(m.info["dtype"])
    attrs = {"axis": m.info["axis"], "epsilon": float(m.info["epsilon"]),
             "stash_type": onnx.TensorProto.DOUBLE if dtype == np.float64 else onnx.TensorProto.FLOAT}
    x, axis, nodes, params = m.tensors["input"], m.info["axis"], [], {}
    for key in ("scale", "bias"):
        if key in m.values:
            params[key] = m.values[key]
        elif key in m.tensors:
            params[key] = _squeezed(m.tensors[key], m.info.get(f"{key}_lead", 0), ctx, base, nodes)
        elif key == "scale":
            params[key] = _runtime_ones(x, axis, dtype, ctx, base, nodes)
    stats = tuple(m.tensors.get(k) for k in ("stat_mean", "stat_inv_std"))
    stats = stats if stats[1] is not None else stats[:1] if stats[0] is not None else ()
    stash = np.float64 if dtype == np.float64 else np.float32
    return nodes + emit_fused(ctx, op, attrs, x, m.output, params, dtype, base, stats, stash)


def _squeezed(t: gs.Tensor, lead: int, ctx: Context, base: str, nodes: list) -> gs.Tensor:
    """``t`` without its ``lead`` leading axes of size 1 (the fused op wants the normalized shape)."""
    if not lead:
        return t
    shape = ctx.shape(t)
    out = gs.Variable(ctx.names.fresh(f"{t.name}_squeezed"), dtype=ctx.dtype(t), shape=list(shape[lead:]))
    axes = G.make_constant(ctx.names, f"{base}_squeeze_axes", np.arange(lead, dtype=np.int64))
    nodes.append(gs.Node("Squeeze", ctx.names.fresh(f"{base}_squeeze"), {}, [t, axes], [out]))
    return out


def _runtime_ones(x: gs.Tensor, axis: int, dtype, ctx: Context, base: str, nodes: list) -> gs.Tensor:
    """A scale of ones over normalized dims known only at run time: ConstantOfShape(Shape(x)[axis:])."""
    dims = gs.Variable(ctx.names.fresh(f"{base}_normalized_shape"), dtype=np.int64, shape=[-axis])
    shape = ctx.shape(x)
    ones = gs.Variable(ctx.names.fresh(f"{base}_ones"), dtype=np.dtype(dtype),
                       shape=list(shape[axis:]) if shape is not None else None)   # None: x's rank unknown
    nodes.append(gs.Node("Shape", ctx.names.fresh(f"{base}_shape"), {"start": axis}, [x], [dims]))
    nodes.append(gs.Node("ConstantOfShape", ctx.names.fresh(f"{base}_ones"),
                         {"value": gs.Constant("value", np.ones(1, np.dtype(dtype)))}, [dims], [ones]))
    return ones


def scope_of(node: gs.Node) -> str:
    """``/layers.0/ln1/ReduceMean`` -> ``/layers.0/ln1/`` (exporters name nodes by module)."""
    name = node.name or ""
    return name.rsplit("/", 1)[0] + "/" if "/" in name else ""


# ------------------------------------------------------------------------------ per channel (group / instance norm)

def channel_work_dtype(ctx: Context, x: gs.Tensor, out: gs.Tensor, compute_bits: int | None, op: str,
                       nodes: list[gs.Node], input_cast: gs.Node | None = None, extra=()) -> np.dtype | Reject:
    """``work_dtype``: GroupNormalization keeps its statistics in stash_type, so input and output
    suffice; InstanceNormalization has no stash type and also needs the core's compute type;
    ``extra``: further types (an affine computed in a wider type than both)."""
    extra = list(extra) + ([DTYPE_BY_BITS[compute_bits]] if op == INSTANCE_NORM and compute_bits in DTYPE_BY_BITS
                           else [])
    return work_dtype(ctx, x, out, nodes, extra, input_cast)


def emit_normalization(ctx: Context, op: str, attrs: dict, x: gs.Tensor, out: gs.Tensor,
                       scale: np.ndarray, bias: np.ndarray, work, base: str) -> list[gs.Node]:
    """``op`` (GroupNormalization, InstanceNormalization) with per-channel ``scale`` and ``bias``."""
    return emit_fused(ctx, op, attrs, x, out, {"scale": scale, "bias": bias}, work, f"{base}/{op}")
