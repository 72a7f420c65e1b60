"""Property proof of fuse-groupnorm over generated reshapes, statistics, shapes, dtypes and near misses."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from propgen import (over_two, CORE_MISSES, F16, F32, F64, NEAR_MISS, PROFILE, SLOW, SLOW_NEAR_MISS, Case, Net, Tail,
                     channel_param, core, fused_counts, prove_left_alone, prove_rewrite, seeds, spellings)

PASS = "fuse-groupnorm"
GN, IN = "GroupNormalization", "InstanceNormalization"
PRECISIONS = [(F32, F32), (F64, F64), (F16, F16), (F16, F32)]
MISSES = {k: v for k, v in CORE_MISSES.items() if k not in ("narrow", "int_cast")}
MISSES.update(some_axes="not over each whole group", int_cast="not of the centred input")


@st.composite
def groupnorm_cases(draw, miss: str | None = None) -> Case:
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    model_dtype, core_dtype = draw(st.sampled_from(PRECISIONS))
    opset = draw(st.sampled_from([13, 17, 18, 21]))
    rank = draw(st.integers(3, 5))
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    channels = groups * per_group
    spatial = [draw(st.integers(2, 4)) for _ in range(rank - 2)]
    batch = draw(st.sampled_from([1, 2, "N"]))
    x_shape = [batch, channels, *spatial]
    stats = draw(st.sampled_from(["instnorm", "core"]))
    if miss is not None:
        stats = "core"
    if groups == per_group == 1 and miss is None:
        per_group = 2 if draw(st.booleans()) else 1
        channels = per_group
        x_shape[1] = channels
    fused = IN if groups == channels else GN
    if model_dtype == F64 and (fused == IN or stats == "instnorm"):   # no float64 InstanceNormalization on CPU
        model_dtype = core_dtype = F32
    # the reshape to [N, G, ...]
    split = draw(st.sampled_from(["0G-1", "NG-1", "-1G", "full", "concat"]))
    if miss == "some_axes":
        split = "full"
    if split == "NG-1" and not isinstance(batch, int):
        split = "0G-1"
    group_elems = per_group * int(np.prod(spatial))
    target = {"0G-1": [0, groups, -1], "NG-1": [batch, groups, -1], "-1G": [-1, groups, group_elems],
              "full": [0, groups, per_group, *spatial]}.get(split)
    net = Net(opset, model_dtype, draw(st.sampled_from(["initializer", "node"])))
    if target is not None:
        grouped = net.op("Reshape", "x", net.const(target, "int"))
    else:  # Concat(Shape(x)[0:1], [G], [-1]), TorchScript without constant folding
        n = net.op("Gather", net.op("Shape", "x"), net.const(0, "int"), axis=0)
        shape = net.op("Concat", net.op("Unsqueeze", n, net.const([0], "int")) if opset >= 13 else
                       net.op("Unsqueeze", n, axes=[0]), net.const([groups], "int"), net.const([-1], "int"), axis=0)
        grouped = net.op("Reshape", "x", shape)
    g_rank = 3 if split != "full" else 3 + len(spatial)
    t = grouped if core_dtype == model_dtype else net.op("Cast", grouped, to=core_dtype)
    sp = draw(spellings("mean"))
    if miss in ("bessel", "int_cast", "var_axes", "exponent", "some_axes"):
        sp = replace(sp, fn_body=False)
    if miss == "exponent":
        sp = replace(sp, square="pow")
    miss_value = draw(st.sampled_from([3.0, 1.0, 0.5, 4.0])) if miss == "exponent" else draw(st.integers(0, 9))
    if stats == "instnorm":
        scale, bias = np.ones(groups), np.zeros(groups)
        if draw(st.booleans()):  # per-group scale / bias, folded into the per-channel ones
            scale, bias = rng.uniform(0.5, 1.5, groups), rng.standard_normal(groups)
        attrs = {"epsilon": draw(st.sampled_from([1e-5, 1e-6, 1e-3]))} if draw(st.booleans()) else {}
        t = net.op("InstanceNormalization", t, net.const(scale, core_dtype), net.const(bias, core_dtype), **attrs)
    else:
        axes = list(range(2, g_rank))
        if miss == "some_axes":
            axes = axes[1:]
        var_axes = [1, *axes]
        if sp.negative_axes:
            axes, var_axes = [a - g_rank for a in axes], [a - g_rank for a in var_axes]
        t = core(net, t, axes, over_two(sp, group_elems), "mean", core_dtype, miss, miss_value, group_elems, var_axes)
    if core_dtype != model_dtype:
        t = net.op("Cast", t, to=model_dtype)
    # the reshape back to x's shape
    back = draw(st.sampled_from(["shape", "const", "zeros"]))
    if back == "const" and not isinstance(batch, int):
        back = "shape"
    if back == "zeros" and split == "-1G":  # the 0 would copy a -1: not recognized (left alone, no harm)
        back = "shape"
    if back == "shape":
        y = net.op("Reshape", t, net.op("Shape", "x"))
    else:
        dims = [batch if back == "const" else 0, channels, *spatial]
        if back == "zeros":  # 0 copies N; one -1 stands for one dim
            dims[draw(st.integers(1, len(dims) - 1))] = -1
        y = net.op("Reshape", t, net.const(dims, "int"))
    steps = []
    gamma = channel_param(draw, rank, channels) if draw(st.booleans()) else None
    if gamma is not None:
        steps.append(("mul", gamma, draw(st.booleans())))
    if draw(st.booleans()):
        steps.append(("identity",))
    if draw(st.booleans()):
        steps.append(("add", channel_param(draw, rank, channels), draw(st.booleans())))
    if draw(st.integers(0, 3)) == 0:  # a spatial Add: not per channel, it stays after the fused op
        steps.append(("add", (1, 1, *spatial), draw(st.booleans()), "outside"))
    if draw(st.booleans()):  # SiLU after the affine stays outside
        steps.append(("silu",))
    tail = Tail([s for s in steps if s[0] != "silu"])
    y, _ = tail.build(net, y, rng, model_dtype)
    if ("silu",) in steps:
        y = net.op("Mul", y, net.op("Sigmoid", y))
    model = net.finish(y, x_shape, model_dtype, x_shape, model_dtype)
    spec = dict(seed=seed, dtype=(model_dtype, core_dtype), opset=opset, shape=x_shape, groups=groups, split=split,
                stats=stats, back=back, spelling=sp if stats == "core" else None, miss=miss, miss_value=miss_value,
                tail=steps)
    if miss:
        return Case(model, PASS, reason=MISSES[miss], seed=seed, spec=spec)
    _, _, left = tail.absorbed(model_dtype)
    if ("silu",) in steps:
        left.update(Mul=1, Sigmoid=1)
    # GroupNormalization keeps its statistics in stash_type: input and output set its type;
    # InstanceNormalization has none, so it also runs in the statistics' type.
    params = [core_dtype] if fused == IN else []
    return Case(model, PASS, fused_counts(fused, model_dtype, model_dtype, params, left), seed=seed, spec=spec)




@PROFILE
@given(groupnorm_cases())
def test_groupnorm_positive_forms_fuse_and_match_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(MISSES))
@NEAR_MISS
@given(data=st.data())
def test_groupnorm_near_misses_are_left_alone_with_a_reason(miss, data):
    prove_left_alone(data.draw(groupnorm_cases(miss=miss)))


@pytest.mark.slow
@SLOW
@given(groupnorm_cases())
def test_groupnorm_positive_forms_campaign(case):
    prove_rewrite(case)


@pytest.mark.slow
@pytest.mark.parametrize("miss", sorted(MISSES))
@SLOW_NEAR_MISS
@given(data=st.data())
def test_groupnorm_near_misses_campaign(miss, data):
    prove_left_alone(data.draw(groupnorm_cases(miss=miss)))
