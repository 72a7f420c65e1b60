"""fold-weightnorm: g * v / ||v|| (v, g constant) folded into one constant weight.

``wn_model`` writes the computation as exporters leave it in front of a Conv (or a MatMul for
2-D weights): TorchScript without constant folding (ReduceL2 with a Constant axes input,
Div(v, n), Mul by g), dynamo with optimize=False (axes as Reshape(Constant, Constant)), and the
other spellings of the norm and of the product. onnxruntime (optimizations off) is the reference.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers import GraphBuilder, assert_equivalent, make_model, op_counts, run_pass, run_pipeline
from normopt import registry

PASS = "fold-weightnorm"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16}
BATCH, CIN, COUT, K, T = 2, 4, 6, 3, 8


def weight_norm(b, v, g, *, dim=0, norm="reducel2", product="div_mul", axes=None, keepdims=1, exponent=2.0,
                lp=2, rank=3):
    """g * v / ||v|| over every axis but ``dim`` (``axes`` overrides), spelled as asked."""
    axes = list(axes if axes is not None else [a for a in range(rank) if a != dim])
    if norm == "reducel2":  # TorchScript: the axes in a Constant node
        n = b.op("ReduceL2", v, b.op("Constant", value=numpy_helper.from_array(np.array(axes, np.int64))),
                 keepdims=keepdims)
    elif norm == "reducel2_reshape":  # dynamo optimize=False: axes = Reshape(Constant, Constant)
        n = b.op("ReduceL2", v, b.op("Reshape", b.const(axes, "int"), b.const([-1], "int")), keepdims=keepdims)
    elif norm == "reducel2_attr":
        n = b.op("ReduceL2", v, axes=axes, keepdims=keepdims)
    elif norm == "sqrt_sumsquare":
        n = b.op("Sqrt", b.op("ReduceSumSquare", v, b.const(axes, "int"), keepdims=keepdims))
    elif norm in ("sqrt_pow", "sqrt_mul"):
        sq = b.op("Pow", v, b.const(exponent)) if norm == "sqrt_pow" else b.op("Mul", v, v)
        n = b.op("Sqrt", b.op("ReduceSum", sq, b.const(axes, "int"), keepdims=keepdims))
    elif norm == "lp":
        (axis,) = axes
        unit = b.op("LpNormalization", v, axis=axis, p=lp)
        return b.op("Mul", unit, g)
    products = {
        "div_mul": lambda: b.op("Mul", b.op("Div", v, n), g),          # TorchScript, dynamo
        "g_first": lambda: b.op("Mul", g, b.op("Div", v, n)),
        "v_times_g_over_n": lambda: b.op("Mul", v, b.op("Div", g, n)),  # torch's decomposition
        "mul_div": lambda: b.op("Div", b.op("Mul", v, g), n),
        "reciprocal": lambda: b.op("Mul", b.op("Mul", v, g), b.op("Reciprocal", n)),
        "no_gain": lambda: b.op("Div", v, n),
    }
    return products[product]()


def wn_model(rng, *, dim=0, dtype=F32, opset=18, g_shape=None, g_input=False, extra=None, **kwargs):
    """X [BATCH, CIN, T] -> Conv1d(weight = weight_norm(v [COUT, CIN, K], g)) -> Y."""
    b = GraphBuilder(opset, dtype)
    shape = [COUT, CIN, K]
    v = b.const(rng.standard_normal(shape) * 0.3)
    g_shape = g_shape or [s if a == dim else 1 for a, s in enumerate(shape)]
    inputs = [("X", dtype, [BATCH, CIN, T])]
    if g_input:
        g = "g"
        inputs.append(("g", dtype, g_shape))
    else:
        g = b.const(rng.uniform(0.5, 1.5, g_shape))
    w = weight_norm(b, v, g, dim=dim, **kwargs)
    y = b.op("Conv", "X", w, b.const(rng.standard_normal(COUT)), pads=[1, 1])
    outputs = [("Y", dtype, [BATCH, COUT, T])]
    if extra:
        extra(b, locals(), outputs)
    b.nodes.append(helper.make_node("Identity", [y], ["Y"]))
    return make_model(b.nodes, inputs, outputs, b.inits, opset=opset)


def fold(model, expected, applied=1):
    out, result = run_pipeline(model, [PASS])
    rec = result.passes[0]
    assert op_counts(out) == expected, op_counts(out)
    assert len(rec.applied) == applied and not rec.skipped, rec.skipped
    assert_equivalent(model, out)
    return out, rec


FOLDED = {"Constant": 1, "Conv": 1, "Identity": 1}


def folded_weight(out):
    node = next(n for n in out.graph.node if n.op_type == "Constant" and n.output[0] in
                {i for c in out.graph.node if c.op_type in ("Conv", "MatMul") for i in c.input})
    return numpy_helper.to_array(node.attribute[0].t)


# ----------------------------------------------------------------------------- folds

@pytest.mark.parametrize("kwargs", [
    dict(),                                                   # TorchScript, do_constant_folding=False
    dict(norm="reducel2_reshape"),                            # dynamo, optimize=False
    dict(norm="reducel2_attr", opset=13),
    dict(norm="sqrt_pow"), dict(norm="sqrt_mul"), dict(norm="sqrt_sumsquare"),
    dict(product="g_first"), dict(product="v_times_g_over_n"), dict(product="mul_div"), dict(product="reciprocal"),
    dict(dim=2),                                              # wav2vec2's positional conv: dim=2
    dict(dim=1), dict(dim=2, norm="sqrt_pow", product="mul_div"),
    dict(dim=2, keepdims=0),                                  # a [K] norm still lines up with the last axis
    dict(product="no_gain"),
    dict(axes=[0, 1, 2], g_shape=[1]),                        # dim=None: the norm of the whole tensor
    dict(dtype=F16),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "torchscript")
def test_fold_weightnorm_spelling_is_folded(kwargs, rng):
    model = wn_model(rng, **kwargs)
    out, rec = fold(model, FOLDED)
    dim = kwargs.get("dim", 0) if "axes" not in kwargs else None
    assert rec.applied[0].info["dim"] == dim


def test_fold_weightnorm_weight_is_the_float64_formula(rng):
    model = wn_model(rng, dim=2, norm="reducel2_reshape")
    out, _ = fold(model, FOLDED)
    consts = [numpy_helper.to_array(i) for i in model.graph.initializer]
    v = next(c for c in consts if c.shape == (COUT, CIN, K)).astype(np.float64)
    g = next(c for c in consts if c.shape == (1, 1, K)).astype(np.float64)
    expected = (g * v / np.sqrt((v * v).sum(axis=(0, 1), keepdims=True))).astype(np.float32)
    np.testing.assert_array_equal(folded_weight(out), expected)


def test_fold_weightnorm_lpnormalization_of_2d_weight_is_folded(rng):
    """A Linear weight [out, in] with dim=0: the norm over axis 1 is LpNormalization(axis=1)."""
    b = GraphBuilder(17)
    v = b.const(rng.standard_normal((5, 6)))
    w = weight_norm(b, v, b.const(rng.uniform(0.5, 1.5, (5, 1))), norm="lp", axes=[1], rank=2)
    y = b.op("MatMul", "X", b.op("Transpose", w, perm=[1, 0]))
    b.nodes.append(helper.make_node("Identity", [y], ["Y"]))
    model = make_model(b.nodes, [("X", F32, [BATCH, 6])], [("Y", F32, [BATCH, 5])], b.inits)
    fold(model, {"Constant": 1, "Transpose": 1, "MatMul": 1, "Identity": 1})


def test_fold_weightnorm_same_weight_used_twice_is_folded_at_each_use(rng):
    """dynamo recomputes a parametrized weight at every call: two computations from one v and g."""
    def second_use(b, scope, outputs):
        w2 = weight_norm(b, scope["v"], scope["g"])
        b.nodes.append(helper.make_node("Conv", ["X", w2], ["Y2"], pads=[1, 1]))
        outputs.append(("Y2", F32, [BATCH, COUT, T]))
    model = wn_model(rng, extra=second_use)
    fold(model, {"Constant": 2, "Conv": 2, "Identity": 1}, applied=2)


def test_fold_weightnorm_runs_before_fold_batchnorm_which_then_folds(rng):
    b = GraphBuilder(18)
    v, g = b.const(rng.standard_normal((COUT, CIN, K)) * 0.3), b.const(rng.uniform(0.5, 1.5, (COUT, 1, 1)))
    y = b.op("Conv", "X", weight_norm(b, v, g), pads=[1, 1])
    y = b.op("BatchNormalization", y, b.const(rng.uniform(0.5, 1.5, COUT)), b.const(rng.standard_normal(COUT)),
             b.const(rng.standard_normal(COUT)), b.const(rng.uniform(0.5, 2.0, COUT)))
    b.nodes.append(helper.make_node("Identity", [y], ["Y"]))
    model = make_model(b.nodes, [("X", F32, [BATCH, CIN, T])], [("Y", F32, [BATCH, COUT, T])], b.inits, opset=18)
    names = list(registry.available())
    assert names.index(PASS) < names.index("fold-batchnorm")
    out, result = run_pipeline(model, [PASS, "fold-batchnorm"])
    assert op_counts(out) == {"Conv": 1, "Identity": 1}
    assert [len(p.applied) for p in result.passes] == [1, 1]
    assert_equivalent(model, out)


# ----------------------------------------------------------------------------- near misses

def _also_used(what):
    def extra(b, scope, outputs):
        if what == "v":
            b.nodes.append(helper.make_node("Relu", [scope["v"]], ["vr"]))
            outputs.append(("vr", F32, [COUT, CIN, K]))
        else:  # the norm itself is a graph output
            norm = next(n for n in b.nodes if n.op_type in ("ReduceL2", "Sqrt"))
            outputs.append((norm.output[0], F32, [COUT, 1, 1]))
    return extra


@pytest.mark.parametrize("kwargs, reason", [
    (dict(axes=[2]), "is over axes [2], not all axes but one"),
    (dict(keepdims=0, axes=[1, 2]), "has keepdims=0: its [6] values do not broadcast along dim 0"),
    (dict(norm="sqrt_pow", exponent=3.0), "has exponent [3.0], not 2"),
    (dict(g_input=True), "'g' multiplying the normalized weight is not a constant"),
    (dict(g_shape=[1, CIN, 1]), "varies over axis 1 of v [6, 4, 3], not only over dim 0"),
    (dict(g_shape=[COUT, 1, K]), "varies over axis 2"),
    (dict(extra=_also_used("v")), "is also used by Relu(vr), which is not the same weight norm"),
    (dict(extra=_also_used("norm")), "is also used by graph output"),
    (dict(extra=_also_used("norm"), norm="sqrt_pow"), "is also used by graph output"),
], ids=["axes_not_all_but_one", "keepdims_0", "pow_exponent_3", "g_not_constant", "g_over_other_axis",
        "g_over_two_axes", "v_used_elsewhere", "norm_is_output", "sqrt_norm_is_output"])
def test_fold_weightnorm_near_miss_is_left_unchanged(kwargs, reason, rng):
    model = wn_model(rng, **kwargs)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model)
    assert not rec.applied and any(reason in s.reason for s in rec.skipped), [s.reason for s in rec.skipped]
    if "keepdims" not in kwargs:  # a [C] norm of a [C, Cin, K] weight: onnxruntime refuses to broadcast it
        assert_equivalent(model, out)


def test_fold_weightnorm_lpnormalization_p1_is_left_unchanged(rng):
    b = GraphBuilder(17)
    v = b.const(rng.standard_normal((5, 6)))
    w = weight_norm(b, v, b.const(rng.uniform(0.5, 1.5, (5, 1))), norm="lp", axes=[1], rank=2, lp=1)
    b.nodes.append(helper.make_node("MatMul", ["X", b.op("Transpose", w, perm=[1, 0])], ["Y"]))
    model = make_model(b.nodes, [("X", F32, [BATCH, 6])], [("Y", F32, [BATCH, 5])], b.inits)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [f"LpNormalization of '{v}' has p=1, not 2"]


def test_fold_weightnorm_norm_of_an_activation_is_not_a_candidate(rng):
    """ReduceL2 of a tensor computed at run time is not a weight norm: no record."""
    b = GraphBuilder(18)
    n = b.op("ReduceL2", "X", b.const([1], "int"))
    b.nodes.append(helper.make_node("Div", ["X", n], ["Y"]))
    model = make_model(b.nodes, [("X", F32, [BATCH, 6])], [("Y", F32, [BATCH, 6])], b.inits, opset=18)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied and not rec.skipped
    onnx.checker.check_model(out)


def test_fold_weightnorm_norm_of_a_constant_used_otherwise_is_skipped_with_reason(rng):
    """Every ReduceL2 of a constant ends with a record: here the norm is added, not divided by."""
    b = GraphBuilder(18)
    v = b.const(rng.standard_normal((6, 4)))
    n = b.op("ReduceL2", v, b.const([1], "int"))
    b.nodes.append(helper.make_node("Add", ["X", n], ["Y"]))
    model = make_model(b.nodes, [("X", F32, [6, 1])], [("Y", F32, [6, 1])], b.inits, opset=18)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == [f"the norm of '{v}' does not divide it into a weight g * v / ||v||"]
    assert_equivalent(model, out)


@pytest.mark.parametrize("cancelled, c_shape, zero", [("c", (2, 1, 1), False), ("c", (1, 3), True),
                                                       ("c", (4, 1), False), ("v", (4, 1), False)])
def test_fold_weightnorm_a_factor_multiplied_in_and_divided_out_is_left_alone(rng, c_shape, zero, cancelled):
    """(v * c) / (||v|| * c) is v / ||v|| only where c is a nonzero number of v's shape: a zero is
    0/0 there, and a [2, 1, 1] c broadcasts the weight to [2, 4, 3]. v * v / (||v|| * v) likewise
    (a zero in v). Such a product is refused, whatever c is."""
    v = rng.standard_normal((4, 3)).astype(np.float32)
    c = rng.uniform(0.5, 2, c_shape).astype(np.float32)
    if zero:
        c.reshape(-1)[1] = 0.0
    factor = "c" if cancelled == "c" else "v"
    nodes = [helper.make_node("ReduceL2", ["v"], ["n"], axes=[1], keepdims=1),
             helper.make_node("Mul", ["v", factor], ["vc"]), helper.make_node("Mul", ["n", factor], ["nc"]),
             helper.make_node("Div", ["vc", "nc"], ["w"]), helper.make_node("Add", ["X", "w"], ["Y"])]
    model = make_model(nodes, [("X", F32, [4, 3])], [("Y", F32, [2, 4, 3] if factor == "c" and c.ndim == 3 else [4, 3])],
                       {"v": v, "c": c}, opset=17)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    what = "'c'" if cancelled == "c" else "v"
    assert [s.reason for s in rec.skipped] == [f"{what} is multiplied in and divided out again on the way to 'w': "
                                               "not a plain weight norm g * v / ||v||"]
    assert_equivalent(model, out)


@pytest.mark.parametrize("name", ["v", "n"])
def test_fold_weightnorm_a_constant_named_like_its_own_keys_is_no_direction(rng, name):
    """c / ||weight_v|| with a constant named 'v' (or 'n') is no weight norm of weight_v: names of
    tensors are never taken for the direction or the norm."""
    wv, c = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((6, 4, 3, 3))
    nodes = [helper.make_node("ReduceL2", ["weight_v"], ["norm"], axes=[1, 2, 3]),
             helper.make_node("Div", [name, "norm"], ["w"]), helper.make_node("Conv", ["X", "w"], ["Y"])]
    model = make_model(nodes, [("X", F32, [1, 4, 5, 5])], [("Y", F32, [1, 6, 3, 3])],
                       {"weight_v": wv.astype(np.float32), name: c.astype(np.float32)}, opset=17)
    out, rec = run_pass(PASS, model)
    assert op_counts(out) == op_counts(model) and not rec.applied
    assert [s.reason for s in rec.skipped] == ["the norm of 'weight_v' does not divide it into a weight g * v / ||v||"]
    assert_equivalent(model, out)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(),
       product=st.sampled_from(["div_mul", "g_first", "v_times_g_over_n", "mul_div", "reciprocal"]),
       norm=st.sampled_from(["reducel2", "reducel2_reshape", "sqrt_pow", "sqrt_mul", "sqrt_sumsquare"]))
def test_fold_weightnorm_any_shape_and_dim_matches_onnxruntime(shape, data, product, norm):
    """The folded weight is what onnxruntime computes from v and g, for any rank and dim."""
    rank = len(shape)
    dim = data.draw(st.one_of(st.none(), st.integers(0, rank - 1))) if rank > 1 else None
    rng = np.random.default_rng(len(shape) * 7 + (dim or 0))
    b = GraphBuilder(18)
    v = b.const(rng.standard_normal(shape) + 0.1)
    g_shape = [s if a == dim else 1 for a, s in enumerate(shape)]
    axes = [a for a in range(rank) if a != dim]
    w = weight_norm(b, v, b.const(rng.uniform(0.5, 1.5, g_shape)), axes=axes, norm=norm, product=product, rank=rank)
    b.nodes.append(helper.make_node("Add", ["X", w], ["Y"]))
    model = make_model(b.nodes, [("X", F32, shape)], [("Y", F32, shape)], b.inits, opset=18)
    out, rec = run_pass(PASS, model)
    assert len(rec.applied) == 1 and not rec.skipped and rec.applied[0].info["dim"] == dim
    assert op_counts(out) == {"Constant": 1, "Add": 1}
    assert_equivalent(model, out)
