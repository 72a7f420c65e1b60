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
from normopt.passes._norm import CAST, float_bits, precision_miss
from normopt.pipeline import Context, Reject


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
