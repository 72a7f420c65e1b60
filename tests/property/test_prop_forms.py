"""Property proof of exporter forms beyond the plain cores: TorchScript's mixed-precision LayerNorm
(the centred tensor cast to a wider float), ONNX's own function bodies as its inliner writes
them, and Keras' GroupNormalization (NHWC, and axis=1)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from helpers import make_model, op_counts
from propgen import (over_two, F16, F32, F64, INT32, NP, PROFILE, SLOW, SLOW_NEAR_MISS, BITS, Case, Net, NEAR_MISS,
                     fused_counts, prove_left_alone, prove_rewrite, seeds, shapes, spellings, tails, trailing_axes)

LN, RMS, GN, IN = "LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization"
# The default suite draws fewer examples of these forms than of the plain cores.
FORMS = settings(PROFILE, max_examples=12)


# ------------------------------------------------------------------------------ Sub -> Cast (mixed precision)

# Where the centred tensor d = x - mean is cast to the wider type W (every placement _norm accepts):
#   shared:         one Cast(d) feeds the square and the division (TorchScript float16 -> double)
#   variance_only:  Cast(d) -> square -> ... -> Sqrt -> Cast back; d itself is divided
#   separate:       one Cast(d) for the square, another for the division
#   numerator_only: d squared in the model's type, Cast(d) divided by Cast(std) in W
PLACEMENTS = ("shared", "variance_only", "separate", "numerator_only")
WIDER = [(F16, F32), (F16, F64), (F32, F64)]
CAST_MISSES = {
    "int_cast": "not of the centred input",        # d -> int32 -> W before the square
    "narrow": "narrower than the output",           # the variance computed in float16 for a float32 model
    "exponent": "Pow exponent is",                  # Pow(Cast(d), 3)
    "escape": "is also used by",                    # the cast centred tensor is also a graph output
}


@st.composite
def mixed_cast_cases(draw, miss: str | None = None) -> Case:
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    model_dtype, wide = draw(st.sampled_from(WIDER))
    placement = draw(st.sampled_from(PLACEMENTS))
    if miss == "narrow":
        model_dtype, wide, placement = draw(st.sampled_from([F32, F64])), F16, "variance_only"
    if miss in ("int_cast", "exponent", "escape") and placement == "numerator_only":
        placement = "variance_only"
    opset = draw(st.sampled_from([13, 14, 17, 18]))
    shape, n = draw(shapes(min_norm=1))
    rank = len(shape)
    sp = draw(spellings("mean"))
    axes = trailing_axes(rank - n, n, rank, sp.negative_axes)
    norm_shape = tuple(shape[rank - n:])
    sp = over_two(sp, int(np.prod(norm_shape)))
    net = Net(opset, model_dtype, draw(st.sampled_from(["initializer", "node"])))
    mean = net.mean("x", axes)
    d = net.op("Sub", "x", mean)
    dv = net.op("Sub", "x", mean) if sp.dup_sub else d
    num = d
    if placement == "shared":
        num = dv = net.op("Cast", d, to=wide)
    elif placement == "variance_only":
        dv = net.op("Cast", dv, to=wide)
    elif placement == "separate":
        num, dv = net.op("Cast", d, to=wide), net.op("Cast", dv, to=wide)
    else:
        num = net.op("Cast", d, to=wide)
    var_type = wide if placement != "numerator_only" else model_dtype
    num_type = wide if placement != "variance_only" else model_dtype
    if miss == "int_cast":
        dv = net.op("Cast", net.op("Cast", dv, to=INT32), to=var_type)
    if miss == "escape":
        net.expose(num if placement != "variance_only" else dv, wide)
    if sp.square == "mul" and miss != "exponent":
        square = net.op("Mul", dv, dv)
    else:
        square = net.op("Pow", dv, net.const(3.0 if miss == "exponent" else 2.0, var_type))
    var = net.mean(square, axes)
    eps = sp.eps
    if eps is not None:
        eps = float(np.float32(eps)) if var_type == F64 else eps   # the op's float32 attribute
        e = net.const(np.full(sp.eps_shape, eps), var_type)
        var = net.op("Add", *((e, var) if sp.eps_first else (var, e)))
    std = net.op("Sqrt", var)
    if var_type != num_type:
        std = net.op("Cast", std, to=num_type)
    if sp.divide == "div":
        t = net.op("Div", num, std)
    else:
        inv = net.op("Reciprocal", std) if sp.divide == "reciprocal" else net.op("Div", net.const(1.0, num_type), std)
        t = net.op("Mul", *((inv, num) if sp.mul_first else (num, inv)))
    tail = draw(tails(rank, norm_shape, model_dtype, num_type))
    trailing_cast = num_type != model_dtype and _cast_back_after_the_affine(tail)
    y, y_dtype = tail.build(net, t, rng, num_type)
    model = net.finish(y, shape, model_dtype, shape, y_dtype)
    spec = dict(seed=seed, dtype=(model_dtype, wide), placement=placement, opset=opset, shape=shape, axes=axes,
                spelling=sp, tail=tail.steps, miss=miss, trailing_cast=trailing_cast)
    if miss:
        return Case(model, "fuse-layernorm", reason=CAST_MISSES[miss], seed=seed, spec=spec)
    out_dtype, params, left = tail.absorbed(num_type)
    if trailing_cast:   # absorbed too: the fused op writes the model's type
        out_dtype = model_dtype
        left["Cast"] -= 1
        left = {k: v for k, v in left.items() if v}
    return Case(model, "fuse-layernorm", fused_counts(LN, model_dtype, out_dtype, params, left), seed=seed,
                spec=spec)


def _cast_back_after_the_affine(tail) -> bool:
    """Whether the Cast back to the model's type comes after the last Mul / Add (or there is
    none): it is then moved right after it (Identities after the Cast), where the fused op
    absorbs it as its output (the mean and d, computed in the model's narrower type, would
    otherwise be narrower than a wide output)."""
    steps = tail.steps
    cast = next(i for i, s in enumerate(steps) if s[0] == "cast")
    last = max((i for i, s in enumerate(steps) if s[0] in ("mul", "add")), default=-1)
    if cast < last:
        return False
    steps.insert(last + 1, steps.pop(cast))
    return True


@FORMS
@given(mixed_cast_cases())
def test_layernorm_centred_tensor_cast_wider_fuses_and_matches_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(CAST_MISSES))
@NEAR_MISS
@given(data=st.data())
def test_layernorm_centred_tensor_cast_near_misses_are_left_alone(miss, data):
    prove_left_alone(data.draw(mixed_cast_cases(miss=miss)))


# ------------------------------------------------------------------------------ ONNX function bodies

BODY_PASS = {LN: "fuse-layernorm", RMS: "fuse-rmsnorm", GN: "fuse-groupnorm"}
BODY_MISSES = {
    "escape": "is also used by",       # the body's standard deviation is also a graph output
    "eps_input": "is not a constant",  # the body's epsilon fed by a graph input
}


def _body_input_dtype_and_stash(draw, op):
    """float32 or float16, stashed in float32 (onnx has no body for a float64 stash type)."""
    return draw(st.sampled_from([F32, F16])), 1


@st.composite
def function_body_cases(draw, op: str | None = None, miss: str | None = None) -> Case:
    """``op`` as onnx's inliner expands it (its context-dependent function body: Flatten(x, a),
    the statistics over axis 1, Reshape back to Shape(x) for LayerNormalization; the axes as
    Range(rank + axis, rank) from Size(Shape(x)) for RMSNormalization-23; for
    GroupNormalization-21, Cast(x) reshaped to [N, G, C/G, D...] then [0, 0, -1], normalized,
    reshaped to Shape(Cast(x)), then to [0, 0, -1] rows, Cast back, scale and bias [1, C, 1],
    reshaped to Shape(Cast(x)))."""
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    op = op or draw(st.sampled_from([LN, RMS]))
    dtype, stash = _body_input_dtype_and_stash(draw, op)
    opset = {LN: draw(st.sampled_from([17, 18, 21])), RMS: 23, GN: 21}[op]
    shape, n = draw(shapes(min_norm=1))
    rank = len(shape)
    axis = rank - n if draw(st.booleans()) else -n
    norm = tuple(shape[rank - n:])
    size = int(np.prod(norm))
    # The function body's variance mean(x*x) - mean(x)^2 cancels in the original itself on
    # short rows of near-equal values; an epsilon of 0.1 keeps the comparison meaningful there.
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1])) if size >= 16 or op != LN else 0.1
    inits = {"S": rng.uniform(0.5, 1.5, norm).astype(NP[dtype])}
    inputs = ["x", "S"]
    if op == LN and draw(st.booleans()):
        inits["B"] = rng.standard_normal(norm).astype(NP[dtype])
        inputs.append("B")
    attrs = dict(axis=axis, epsilon=eps)
    if stash != 1 or draw(st.booleans()):   # float32 is the default
        attrs["stash_type"] = stash
    if op == GN:
        groups = draw(st.sampled_from([1, 2]))
        channels = groups * draw(st.integers(1, 3))
        spatial = draw(st.integers(1, 2))
        shape = [draw(st.sampled_from([1, 2, "N"])), channels, *[draw(st.integers(2, 4)) for _ in range(spatial)]]
        inits = {"S": rng.uniform(0.5, 1.5, channels).astype(NP[dtype]),
                 "B": rng.standard_normal(channels).astype(NP[dtype])}
        if (channels // groups) * int(np.prod(shape[2:])) < 16:
            # G == C fuses to InstanceNormalization, whose kernel does not cancel like the body.
            eps = 0.1
        inputs, attrs = ["x", "S", "B"], dict(num_groups=groups, epsilon=eps)
    node = helper.make_node(op, inputs, ["y"], **attrs)
    model = make_model([node], [("x", dtype, shape)], [("y", dtype, shape)], inits, opset=opset)
    model.graph.value_info.extend(helper.make_tensor_value_info(k, dtype, v.shape) for k, v in inits.items())
    model = onnx.inliner.inline_selected_functions(model, [("", op)], inline_schema_functions=True)
    assert op not in op_counts(model)
    spec = dict(seed=seed, op=op, dtype=dtype, opset=opset, shape=shape, attrs=attrs, miss=miss)
    if miss == "escape":
        sqrt = next(n for n in model.graph.node if n.op_type == "Sqrt")
        rank = 2 if op == LN else 3 if op == GN else len(shape)   # (the bodies' statistics of Flatten(x), [N, G, -1])
        model.graph.output.append(helper.make_tensor_value_info(sqrt.output[0], F32, [None] * rank))
    elif miss == "eps_input":   # Add(variance, Cast(Constant epsilon)) in both bodies: fed by an input instead
        add = next(n for n in model.graph.node if n.op_type == "Add" and any(
            p.op_type == "Sqrt" and p.input[0] == n.output[0] for p in model.graph.node))
        producers = {o: n for n in model.graph.node for o in n.output}
        cast = producers[add.input[1]]
        for dead in (cast, producers[cast.input[0]]):
            model.graph.node.remove(dead)
        model.graph.input.append(helper.make_tensor_value_info("eps_in", F32, []))
        add.input[1] = "eps_in"
    onnx.checker.check_model(model, full_check=True)
    if miss:
        return Case(model, BODY_PASS[op], reason=BODY_MISSES[miss], seed=seed, spec=spec)
    if op == GN:
        # G == C: InstanceNormalization, which has no stash type: a float16 one runs in float32.
        fused = {GN: 1} if groups < channels else {IN: 1} if dtype == F32 else {IN: 1, "Cast": 2}
        spec.update(groups=groups, channels=channels)
        return Case(model, BODY_PASS[op], fused, seed=seed, spec=spec)
    return Case(model, BODY_PASS[op], {op: 1}, seed=seed, spec=spec)


@FORMS
@given(function_body_cases())
def test_function_bodies_fuse_back_to_the_op_and_match_onnxruntime(case):
    out = prove_rewrite(case)
    node = out.graph.node[0]
    assert node.input[0] == "x" and node.output[0] == "y"
    got = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = case.spec["attrs"]["axis"]
    assert got["axis"] == (axis if axis < 0 else axis - len(case.spec["shape"]))
    assert got["epsilon"] == pytest.approx(case.spec["attrs"]["epsilon"], rel=1e-6)


@pytest.mark.parametrize("miss", sorted(BODY_MISSES))
@NEAR_MISS
@given(data=st.data())
def test_function_body_near_misses_are_left_alone(miss, data):
    prove_left_alone(data.draw(function_body_cases(op=data.draw(st.sampled_from([LN, RMS, GN])), miss=miss)))


@FORMS
@given(function_body_cases(op=GN))
def test_groupnorm21_function_body_fuses_back_to_the_op_and_matches_onnxruntime(case):
    """GroupNormalization-21's own body (rank 3 and 4, float32 and float16 stashed in float32,
    static or symbolic N) fuses back to one GroupNormalization on x with its num_groups,
    epsilon, stash_type and per-channel scale and bias (InstanceNormalization when G == C)."""
    out = prove_rewrite(case)
    node = next(n for n in out.graph.node if n.op_type in (GN, IN))
    producers = {o: n for n in out.graph.node for o in n.output}
    source = producers[node.input[0]].input[0] if node.input[0] in producers else node.input[0]
    assert source == "x"   # (through the Cast to float32 of a float16 InstanceNormalization)
    got = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert got["epsilon"] == pytest.approx(case.spec["attrs"]["epsilon"], rel=1e-6)
    if node.op_type == GN:
        assert node.output[0] == "y" and got["num_groups"] == case.spec["groups"] and got["stash_type"] == 1
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node
              if n.op_type == "Constant"}
    scale, bias = (inits.get(name, consts.get(name)) for name in node.input[1:3])
    original = {i.name: onnx.numpy_helper.to_array(i) for i in case.model.graph.initializer}
    np.testing.assert_array_equal(scale.astype(np.float64), original["S"].astype(np.float64))
    np.testing.assert_array_equal(bias.astype(np.float64), original["B"].astype(np.float64))


# ------------------------------------------------------------------------------ Keras GroupNormalization

KERAS_MISSES = {
    # moments over part of the group, or over the groups too (with axis=1 that is also no
    # channels-last grouping, which the pass then says)
    "some_axes": ("not over each whole group", "does not split the last axis"),
    "gamma_spatial": ("does not broadcast", "varies over non-normalized axes"),  # gamma varying over space
    "escape": "is also used by",                # the mean is also a graph output
}


@st.composite
def keras_groupnorm_cases(draw, miss: str | None = None) -> Case:
    """Keras GroupNormalization as tf2onnx writes it: x [N, ..., C] reshaped to [-1, ..., G, C/G]
    (axis=-1) or x [N, C, ...] to [-1, G, C/G, ...] (axis=1); tf.nn.moments (SquaredDifference
    as Sub, Mul) or Keras 3's E[x^2] - E[x]^2; x*s + (beta - mean*s) (Keras 3: x*s + ((-mean)*s
    + beta)), s = gamma / sqrt(var + eps), gamma / beta of the grouped shape; reshaped back."""
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    first = draw(st.booleans())
    groups, per = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    if groups * per == 1:
        per = 2
    c = groups * per
    spatial = [draw(st.integers(2, 4)) for _ in range(draw(st.integers(1, 3)))]
    rank = 2 + len(spatial)
    keras3 = draw(st.booleans()) and miss is None
    scale, center = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    if keras3:
        eps = 0.1   # E[x^2] - E[x]^2 cancels in the original itself on small groups
    batch = draw(st.sampled_from([1, 2, "N"]))
    net = Net(draw(st.sampled_from([13, 17, 18])), F32, draw(st.sampled_from(["initializer", "node"])))
    target = [-1, groups, per, *spatial] if first else [-1, *spatial, groups, per]
    xg = net.op("Reshape", "x", net.const(target, "int"))
    axes = [*range(2, rank + 1)] if first else [*range(1, rank - 1), rank]
    if miss == "some_axes":
        axes = draw(st.sampled_from([axes[1:], [1, *axes]] if first else [axes[:-1], [*axes[:-1], rank - 1, rank]]))
        axes = sorted(set(axes))
    mean = net.mean(xg, axes)
    if miss == "escape":
        net.expose(mean, F32)
    if keras3:
        var = net.op("Sub", net.mean(net.op("Mul", xg, xg), axes), net.op("Mul", mean, mean))
    else:
        dev = net.op("Sub", xg, mean)
        var = net.mean(net.op("Mul", dev, dev), axes)
    inv = net.op("Reciprocal", net.op("Sqrt", net.op("Add", var, net.const(eps))))
    gshape = [groups, per] + [1] * (rank - 2) if first else [groups, per]
    if draw(st.booleans()):
        gshape = [1] * (rank + 1 - len(gshape)) + gshape
    if miss == "gamma_spatial":
        scale = True
        gshape = [1, groups, per, *spatial] if first else [1, *spatial, groups, per]
        gshape[-1 if first else 1] = spatial[-1 if first else 0]
    s = net.op("Mul", inv, net.const(rng.uniform(0.5, 1.5, gshape))) if scale else inv
    xs = net.op("Mul", xg, s)
    if center:
        beta = net.const(rng.standard_normal(gshape if miss != "gamma_spatial" else [groups, per]))
        shift = (net.op("Add", net.op("Mul", net.op("Neg", mean), s), beta) if keras3
                 else net.op("Sub", beta, net.op("Mul", mean, s)))
        y = net.op("Add", xs, shift)
    else:
        y = net.op("Sub", xs, net.op("Mul", mean, s))
    y = net.op("Reshape", y, net.op("Shape", "x"))
    x_shape = [batch, c, *spatial] if first else [batch, *spatial, c]
    model = net.finish(y, x_shape, F32, x_shape, F32)
    spec = dict(seed=seed, channels_first=first, groups=groups, channels=c, spatial=spatial, keras3=keras3,
                scale=scale, center=center, eps=eps, gamma=gshape, miss=miss, batch=batch)
    if miss:
        return Case(model, "fuse-groupnorm", reason=KERAS_MISSES[miss], seed=seed, spec=spec)
    fused = IN if groups == c else GN
    return Case(model, "fuse-groupnorm", {fused: 1, "Identity": 1, **({} if first else {"Transpose": 2})},
                seed=seed, spec=spec)


@FORMS
@given(keras_groupnorm_cases())
def test_keras_groupnorm_fuses_and_matches_onnxruntime(case):
    prove_rewrite(case)


@pytest.mark.parametrize("miss", sorted(KERAS_MISSES))
@NEAR_MISS
@given(data=st.data())
def test_keras_groupnorm_near_misses_are_left_alone(miss, data):
    prove_left_alone(data.draw(keras_groupnorm_cases(miss=miss)))


# ------------------------------------------------------------------------------ campaigns

@pytest.mark.slow
@pytest.mark.parametrize("cases", [mixed_cast_cases, function_body_cases, lambda: function_body_cases(op=GN),
                                   keras_groupnorm_cases],
                         ids=["sub_cast", "function_body", "groupnorm21_body", "keras_groupnorm"])
@SLOW
@given(data=st.data())
def test_forms_campaign(cases, data):
    prove_rewrite(data.draw(cases()))


@pytest.mark.slow
@pytest.mark.parametrize("cases, miss", [(mixed_cast_cases, m) for m in sorted(CAST_MISSES)]
                         + [(keras_groupnorm_cases, m) for m in sorted(KERAS_MISSES)])
@SLOW_NEAR_MISS
@given(data=st.data())
def test_forms_near_misses_campaign(cases, miss, data):
    prove_left_alone(data.draw(cases(miss=miss)))


@pytest.mark.slow
@pytest.mark.parametrize("miss", sorted(BODY_MISSES))
@SLOW_NEAR_MISS
@given(data=st.data())
def test_function_body_near_misses_campaign(miss, data):
    prove_left_alone(data.draw(function_body_cases(op=data.draw(st.sampled_from([LN, RMS, GN])), miss=miss)))
