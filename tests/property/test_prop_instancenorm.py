"""Property proof of fuse-instancenorm over generated spellings, shapes, dtypes and near misses."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from propgen import (over_two, CORE_MISSES, F16, F32, NEAR_MISS, PROFILE, SLOW, SLOW_NEAR_MISS, Case, Net, Tail, channel_param,
                     core, fused_counts, prove_left_alone, prove_rewrite, seeds, spellings)

PASS = "fuse-instancenorm"
IN = "InstanceNormalization"
# onnxruntime's CPU kernels: no float64 InstanceNormalization.
PRECISIONS = [(F32, F32), (F16, F16), (F16, F32)]
MISSES = {k: v for k, v in CORE_MISSES.items() if k != "narrow"}
MISSES.update(some_spatial="not over all spatial axes", spatial_param="not per channel")


@st.composite
def instancenorm_cases(draw, miss: str | None = None) -> Case:
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    model_dtype, core_dtype = draw(st.sampled_from(PRECISIONS))
    opset = draw(st.sampled_from([13, 17, 18, 21]))
    rank = draw(st.integers(4 if miss == "some_spatial" else 3, 5))
    channels = draw(st.integers(2, 5))
    spatial = [draw(st.one_of(st.integers(2, 5), st.just(f"s{i}"))) for i in range(rank - 2)]
    shape = [draw(st.sampled_from([1, 2, "N"])), channels, *spatial]
    sp = draw(spellings("mean"))
    if miss in ("bessel", "int_cast", "var_axes", "exponent"):
        sp = replace(sp, fn_body=False)
    if miss == "exponent":
        sp = replace(sp, square="pow")
    miss_value = draw(st.sampled_from([3.0, 1.0, 0.5, 4.0])) if miss == "exponent" else draw(st.integers(0, 9))
    axes = list(range(2, rank))
    if miss == "some_spatial":
        axes = sorted(draw(st.sets(st.sampled_from(axes), min_size=1, max_size=rank - 3)))
    var_axes = axes[1:] if miss == "var_axes" and len(axes) > 1 else [1, *axes]
    if sp.negative_axes:
        axes, var_axes = [a - rank for a in axes], [a - rank for a in var_axes]
    net = Net(opset, core_dtype, draw(st.sampled_from(["initializer", "node"])))
    x = "x" if core_dtype == model_dtype else net.op("Cast", "x", to=core_dtype)
    n_elems = int(np.prod([d if isinstance(d, int) else 8 for d in spatial]))
    sp = over_two(sp, n_elems)
    t = core(net, x, axes, sp, "mean", core_dtype, miss, miss_value, n_elems, var_axes)
    # Rank 3 and near misses need a per-channel parameter (C > 1): without one, a rank-3 core is
    # a LayerNorm (fuse-layernorm's) and a near miss is not even a candidate.
    evidence = rank == 3 or miss is not None
    steps = []
    gamma = channel_param(draw, rank, channels, per_channel=evidence) if evidence or draw(st.booleans()) else None
    if gamma is not None:
        steps.append(("mul", gamma, draw(st.booleans())))
    if draw(st.booleans()):
        steps.append(("identity",))
    if draw(st.booleans()) or miss == "spatial_param":
        beta = (1, 1, *[2] * (rank - 2)) if miss == "spatial_param" else channel_param(draw, rank, channels)
        steps.append(("add", beta, draw(st.booleans())))
        if miss == "spatial_param":
            shape[2:] = [2] * (rank - 2)
    if core_dtype != model_dtype:
        steps.insert(draw(st.integers(0, len(steps))), ("cast", model_dtype))
    tail = Tail(steps)
    y, y_dtype = tail.build(net, t, rng, core_dtype)
    model = net.finish(y, shape, model_dtype, shape, y_dtype)
    spec = dict(seed=seed, dtype=(model_dtype, core_dtype), opset=opset, shape=shape, axes=axes, spelling=sp,
                miss=miss, miss_value=miss_value, tail=steps)
    if miss:
        return Case(model, PASS, reason=MISSES[miss], seed=seed, spec=spec)
    out_dtype, params, left = tail.absorbed(core_dtype)
    # InstanceNormalization has no stash type: it also runs in the type the statistics were in.
    return Case(model, PASS, fused_counts(IN, model_dtype, out_dtype, params + [core_dtype], left), seed=seed,
                spec=spec)




@PROFILE
@given(instancenorm_cases())
def test_instancenorm_positive_forms_fuse_and_match_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(MISSES))
@NEAR_MISS
@given(data=st.data())
def test_instancenorm_near_misses_are_left_alone_with_a_reason(miss, data):
    prove_left_alone(data.draw(instancenorm_cases(miss=miss)))


@pytest.mark.slow
@SLOW
@given(instancenorm_cases())
def test_instancenorm_positive_forms_campaign(case):
    prove_rewrite(case)


@pytest.mark.slow
@pytest.mark.parametrize("miss", sorted(MISSES))
@SLOW_NEAR_MISS
@given(data=st.data())
def test_instancenorm_near_misses_campaign(miss, data):
    prove_left_alone(data.draw(instancenorm_cases(miss=miss)))
