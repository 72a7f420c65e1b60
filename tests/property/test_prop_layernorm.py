"""Property proof of fuse-layernorm over generated spellings, shapes, dtypes and near misses."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from propgen import (over_two, CORE_MISSES, F16, F32, F64, NEAR_MISS, PROFILE, SLOW, SLOW_NEAR_MISS, Case, Net, Tail, core,
                     fused_counts, param_shape, prove_left_alone, prove_rewrite, seeds, shapes, spellings, tails,
                     trailing_axes)

PASS = "fuse-layernorm"
LN = "LayerNormalization"
# model dtype, dtype the statistics are computed in (a Cast of x first when they differ)
PRECISIONS = [(F32, F32), (F64, F64), (F16, F16), (F16, F32)]
MISSES = {**CORE_MISSES, "non_trailing": "not its trailing axes"}




@st.composite
def layernorm_cases(draw, miss: str | None = None) -> Case:
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    model_dtype, core_dtype = draw(st.sampled_from(PRECISIONS))
    if miss == "narrow":  # x rounded to float16, statistics in float16, then back to a wider output
        model_dtype, core_dtype = draw(st.sampled_from([F32, F64])), F16
    opset = draw(st.sampled_from([13, 15, 17, 18, 21]))
    shape, n = draw(shapes(min_norm=1))
    if miss == "non_trailing":
        shape, n = draw(shapes(min_rank=3, min_norm=1).filter(lambda s: s[1] < len(s[0])))
    rank = len(shape)
    sp = draw(spellings("mean"))
    if miss in ("bessel", "int_cast", "var_axes", "exponent"):
        sp = replace(sp, fn_body=False)
    if miss == "exponent":
        sp = replace(sp, square="pow")
    miss_value = draw(st.sampled_from([3.0, 1.0, 0.5, 4.0])) if miss == "exponent" else draw(st.integers(0, 9))
    norm_shape = tuple(shape[rank - n:])
    sp = over_two(sp, int(np.prod(norm_shape)))
    first = rank - n - 1 if miss == "non_trailing" else rank - n
    axes = trailing_axes(first, n, rank, sp.negative_axes)
    var_axes = trailing_axes(rank - n - 1, n + 1, rank, sp.negative_axes) if n < rank else trailing_axes(rank - n + 1, n - 1, rank,
                                                                                             sp.negative_axes)
    tf = miss is None and sp.eps is not None and model_dtype == core_dtype and draw(st.integers(0, 4)) == 0
    net = Net(opset, core_dtype, draw(st.sampled_from(["initializer", "node"])))
    x = "x" if core_dtype == model_dtype else net.op("Cast", "x", to=core_dtype)
    spec = dict(seed=seed, dtype=(model_dtype, core_dtype), opset=opset, shape=shape, axes=axes, spelling=sp,
                miss=miss, miss_value=miss_value)
    if tf:
        return _tf_case(draw, net, x, rng, spec, shape, norm_shape, axes, sp, model_dtype)
    # LayerNormalization writes its Mean and InvStdDev: those used elsewhere are no escape
    t = core(net, x, axes, sp, "mean", core_dtype, miss, miss_value, int(np.prod(norm_shape)), var_axes,
             kept_outputs=("mean", "inverse"))
    lead = shape[rank - n - 1] if n < rank else None
    positional = (lead, *norm_shape) if isinstance(lead, int) and lead > 1 else None
    tail = draw(tails(rank, norm_shape, model_dtype, core_dtype, positional=positional))
    if miss == "narrow":  # the Cast back is absorbed with the Mul that follows it
        tail = Tail([("cast", model_dtype), ("mul", norm_shape, False)])
    spec["tail"] = tail.steps
    y, y_dtype = tail.build(net, t, rng, core_dtype)
    model = net.finish(y, shape, model_dtype, shape, y_dtype)
    if miss:
        return Case(model, PASS, reason=MISSES[miss], seed=seed, spec=spec)
    out_dtype, params, left = tail.absorbed(core_dtype)
    return Case(model, PASS, fused_counts(LN, model_dtype, out_dtype, params, left), seed=seed, spec=spec)


def _tf_case(draw, net, x, rng, spec, shape, norm_shape, axes, sp, dtype) -> Case:
    """The TF/Keras form: s = gamma / sqrt(var + eps); y = x*s + (beta - mean*s), or Keras 3's
    x*s + ((-mean)*s + beta), or without beta; gamma optional."""
    rank = len(shape)
    mean = net.mean(x, axes)
    d = net.op("Sub", x, mean)
    square = net.op("Mul", d, d) if sp.square == "mul" else net.op("Pow", d, net.const(2.0))
    var = net.mean(square, axes)
    eps = net.const(np.full(sp.eps_shape, float(np.float32(sp.eps)) if dtype == F64 else sp.eps))  # float32 attribute
    std = net.op("Sqrt", net.op("Add", *((eps, var) if sp.eps_first else (var, eps))))
    s = net.op("Reciprocal", std) if sp.divide != "div_one" else net.op("Div", net.const(1.0), std)
    gamma = param_shape(draw, rank, norm_shape)
    if gamma is not None:
        g = net.const(rng.uniform(0.5, 1.5, gamma))
        s = net.op("Mul", *((g, s) if sp.mul_first else (s, g)))
    xs = net.op("Mul", *((s, x) if sp.eps_first else (x, s)))
    beta = param_shape(draw, rank, norm_shape)
    form = draw(st.sampled_from(["sub_beta", "keras3", "neg", "sub"]))
    if beta is None and form in ("sub_beta", "keras3"):
        form = "sub"
    spec.update(tf=form, gamma=gamma, beta=beta)
    if form == "sub_beta":
        b = net.const(rng.standard_normal(beta))
        y = net.op("Add", xs, net.op("Sub", b, net.op("Mul", mean, s)))
    elif form == "keras3":
        b = net.const(rng.standard_normal(beta))
        y = net.op("Add", xs, net.op("Add", net.op("Mul", net.op("Neg", mean), s), b))
    elif form == "neg":
        y = net.op("Add", xs, net.op("Mul", net.op("Neg", mean), s))
    else:
        y = net.op("Sub", xs, net.op("Mul", mean, s))
    model = net.finish(y, shape, dtype, shape, dtype)
    return Case(model, PASS, {LN: 1, "Identity": 1}, seed=spec["seed"], spec=spec)


@PROFILE
@given(layernorm_cases())
def test_layernorm_positive_forms_fuse_and_match_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(MISSES))
@NEAR_MISS
@given(data=st.data())
def test_layernorm_near_misses_are_left_alone_with_a_reason(miss, data):
    prove_left_alone(data.draw(layernorm_cases(miss=miss)))


@pytest.mark.slow
@SLOW
@given(layernorm_cases())
def test_layernorm_positive_forms_campaign(case):
    prove_rewrite(case)


@pytest.mark.slow
@pytest.mark.parametrize("miss", sorted(MISSES))
@SLOW_NEAR_MISS
@given(data=st.data())
def test_layernorm_near_misses_campaign(miss, data):
    prove_left_alone(data.draw(layernorm_cases(miss=miss)))
